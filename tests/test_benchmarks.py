"""Smoke test of ``benchmarks/bench_steps.py``: it runs and reports numbers (no speed claims)."""

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_steps.py"
CONFIGS = ["mtl-m2", "iwrm-b32"]


def _load_script() -> ModuleType:
    # Loaded from its path, as a fresh module each time (its module-level state stays per test).
    spec = importlib.util.spec_from_file_location("bench_steps", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def _table(text: str, first_column: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header starts with ``first_column``, by name."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {first_column} |")))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].split(" ")[0]] = cells[1:]
    return rows


def _milliseconds(cell: str) -> float:
    match = re.fullmatch(r"([0-9.e+-]+) ms( \(([0-9.]+)×\))?( \[n=\d+\])?", cell)
    assert match is not None, cell
    value = float(match.group(1))
    assert math.isfinite(value)
    assert value > 0
    if match.group(3) is not None:
        assert math.isfinite(float(match.group(3)))
        assert float(match.group(3)) > 0
    return value


def test_quick_run_reports_every_step(tmp_path: Path) -> None:
    bench_steps = _load_script()
    out = tmp_path / "steps.md"
    # backend="eager": dynamo still traces the whole step with fullgraph=True, without the minutes
    # inductor would take; two timed steps keep the test short.
    options = ["--repeats", "2", "--warmup", "1", "--backend", "eager", "--out", str(out)]
    text: str = bench_steps.main(["--quick", "--configs", *CONFIGS, *options])
    assert out.read_text() == text

    times = _table(text, "config | losses")
    assert list(times) == CONFIGS
    for name, cells in times.items():
        n_losses, sgd_ms, eager, compiled, reference, target = cells
        assert int(n_losses) == bench_steps.CONFIGS[name].n_losses
        assert sgd_ms.endswith("(1.00×)")
        for cell in (sgd_ms, eager, compiled):
            _milliseconds(cell)
        if bench_steps.torchjd_missing() is None:
            _milliseconds(reference)
        assert target.startswith("≤ 1.3×") if name.startswith("mtl") else target == "none"

    memory = _table(text, "config | SGD")
    assert list(memory) == CONFIGS
    for cells in memory.values():
        assert cells[:4] == ["n/a"] * 4  # memory is only measured with a process per cell
        assert float(cells[4]) > 0  # compile + first step

    parts = _table(text, "config | Jacobian (incl. forward)")
    assert list(parts) == CONFIGS
    for cells in parts.values():
        # mtl_gramian_step and gramian_step have no Jacobian: the forward and backward passes are
        # in the Gramian.
        assert cells[0] == "n/a"
        assert all(math.isfinite(float(cell)) and float(cell) > 0 for cell in cells[1:])


def test_mtl_step_option_times_the_jacobian_part() -> None:
    bench_steps = _load_script()
    options = ["--repeats", "2", "--warmup", "1", "--methods", "jd-eager", "--mtl-step", "jacobian"]
    text: str = bench_steps.main(["--quick", "--configs", "mtl-m2", *options])
    assert "MTL step jacobian" in text
    cells = _table(text, "config | Jacobian (incl. forward)")["mtl-m2"]
    assert all(math.isfinite(float(cell)) and float(cell) > 0 for cell in cells)


def test_methods_option_runs_only_the_chosen_steps() -> None:
    bench_steps = _load_script()
    options = ["--repeats", "2", "--warmup", "1", "--no-parts", "--methods", "sgd", "jd-eager"]
    text: str = bench_steps.main(["--quick", "--configs", "mtl-m2", *options])
    _, sgd_ms, eager, compiled, reference, _ = _table(text, "config | losses")["mtl-m2"]
    _milliseconds(sgd_ms)
    assert _milliseconds(eager) > 0
    assert compiled == reference == "not run"
    assert "Parts of our eager step" not in text


def test_count_ops_counts_dispatched_operators() -> None:
    import torch

    from benchmarks.count_ops import count, count_by_operator

    x = torch.ones(3)
    # x + 1, then .sum(), then a view: three operators, whatever the device.
    assert count(lambda: (x + 1).sum().view(1)) == 3
    assert count_by_operator(lambda: x * x * x) == {"mul": 2}


def test_probe_cuda_qp_smoke_run_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.probe_cuda_qp import main

    main(["--device", "cpu", "--sizes", "3", "--repeats", "2", "--variants", "eager"])
    row = capsys.readouterr().out.splitlines()[-1]
    match = re.fullmatch(r"m =\s+3  eager\s+([0-9.]+) ms  max abs error (\S+)  .*", row)
    assert match is not None, row
    assert float(match.group(1)) > 0
    assert float(match.group(2)) < 1e-5  # float32 weights against the float64 reference


def test_backend_with_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    bench_steps = _load_script()
    seen: list[dict[str, object]] = []

    def fake_compile(fn: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    bench_steps.compile_with(abs, "inductor:reduce-overhead")
    bench_steps.compile_with(abs, "eager")
    assert seen == [
        {"fullgraph": True, "backend": "inductor", "mode": "reduce-overhead"},
        {"fullgraph": True, "backend": "eager", "mode": None},
    ]
