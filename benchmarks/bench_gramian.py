"""Median time and peak memory of per-sample (IWRM) Gramians: autogram's closed-form per-layer
Gramians against its generic per-sample path, TorchJD's autogram engine and the functional
per-sample Jacobian.

Run from the repository root::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_gramian            # B in {32, 128, 1024}
    OMP_NUM_THREADS=1 python -m benchmarks.bench_gramian --quick    # B in {32, 128}, 3 repeats
    python -m benchmarks.bench_gramian --device cuda

The model is an MLP on 256-d inputs with three hidden layers of width 256 (``Linear`` + ``ReLU``)
and a ``Linear(256, 1)`` output; the losses are per-sample squared errors ``[B]``. Each method is
timed from the batch to the Gramian ``[B, B]``, forward pass included:

* ``fast``: ``Engine(model, batch_dim=0)``, forward + ``compute_gramian(losses)``, with its
  closed-form per-layer Gramians (here the ghost way ``(A Aᵀ) ⊙ (D Dᵀ)`` for every layer);
* ``generic``: the same Engine with the closed forms switched off (``engine._fast_gramians =
  False``): every layer re-run per sample under ``vmap``, per-sample gradients materialised;
* ``torchjd``: ``torchjd.autogram.Engine(model, batch_dim=0)`` (when importable);
* ``functional``: ``torchjd_func.value_and_per_sample_jacobian`` + ``torchjd_func.gramian``
  (the whole per-sample Jacobian ``[B, n_params]`` in memory).

Each method runs ``--warmup`` times untimed, then up to ``--repeats`` times timed (fewer when that
would exceed ``--budget`` seconds; the count is shown); the median is reported with its ratio to
``fast``. A method whose per-sample Jacobian would exceed ``--max-gib`` is skipped and said so.
Memory is the peak increase above what is held before one call: on CUDA
``max_memory_allocated()``; on Linux CPUs an estimate from the peak resident set size (``VmHWM``
reset through ``/proc/self/clear_refs``, glibc's freed memory trimmed first). Every method's
Gramian is checked against ``fast``'s (largest relative difference shown).
"""

import argparse
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import call, gramian, params_of, value_and_per_sample_jacobian
from torchjd_func.autogram import Engine

WIDTH = 256
METHODS = ("fast", "generic", "torchjd", "functional")
BATCHES = (32, 128, 1024)
QUICK_BATCHES = (32, 128)


@dataclass
class Cell:
    median_ms: float | None = None
    repeats: int = 0
    peak_mib: float | None = None
    max_rel_diff: float | None = None
    skipped: str | None = None


def mlp(device: torch.device) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 1)).to(device)


def per_sample_gib(model: nn.Module, batch: int) -> float:
    """GiB of the per-sample gradients of all parameters (float32)."""
    return batch * sum(p.numel() for p in model.parameters()) * 4 / 2**30


def torchjd_missing() -> str | None:
    try:
        import torchjd.autogram  # noqa: F401
    except ImportError as error:
        return f"torchjd not importable: {error}"
    return None


def gramian_fn(method: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """A zero-argument function computing the ``[B, B]`` Gramian from the batch."""
    if method in ("fast", "generic"):
        engine = Engine(model, batch_dim=0)
        engine._fast_gramians = method == "fast"

        def ours() -> Tensor:
            losses = (model(x).squeeze(1) - y) ** 2
            return engine.compute_gramian(losses)

        return ours
    if method == "torchjd":
        from torchjd.autogram import Engine as TorchJDEngine

        theirs = TorchJDEngine(model, batch_dim=0)

        def torchjd() -> Tensor:
            losses = (model(x).squeeze(1) - y) ** 2
            result: Tensor = theirs.compute_gramian(losses)
            return result

        return torchjd
    params = params_of(model)

    def sample_loss(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        prediction: Tensor = call(model, params, x)
        return (prediction.squeeze(-1) - y) ** 2

    def functional() -> Tensor:
        jac = value_and_per_sample_jacobian(sample_loss, params, x, y).jacobian
        return gramian(jac)

    return functional


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], Tensor], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_mib(fn: Callable[[], Tensor], device: torch.device) -> float | None:
    """Peak memory increase during one call, above what is held before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed tensors leave the process
        libc.malloc_trim(0)
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024


def measure(batch: int, args: argparse.Namespace) -> dict[str, Cell]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(batch, WIDTH, device=device)
    y = torch.randn(batch, device=device)
    cells: dict[str, Cell] = {}
    fns: dict[str, Callable[[], Tensor]] = {}
    reference: Tensor | None = None
    for method in args.methods:
        # The same weights, but one model per method: the engines' hooks must not see each
        # other's forward passes.
        torch.manual_seed(1)
        model = mlp(device)
        gib = per_sample_gib(model, batch)
        if method == "torchjd" and (reason := torchjd_missing()) is not None:
            cells[method] = Cell(skipped=reason)
            continue
        if method != "fast" and gib > args.max_gib:
            cells[method] = Cell(skipped=f"per-sample Jacobian {gib:.1f} GiB > --max-gib")
            continue
        fn = gramian_fn(method, model, x, y)
        result = fn()
        cell = Cell()
        if reference is None:
            reference = result
        else:
            diff = (result.reshape(reference.shape) - reference).abs().max()
            cell.max_rel_diff = float(diff / reference.abs().max())
        first = _seconds(fn, device)
        for _ in range(args.warmup - 1):
            first = _seconds(fn, device)
        cell.repeats = max(1, min(args.repeats, int(args.budget / max(first, 1e-9))))
        times = [_seconds(fn, device) for _ in range(cell.repeats)]
        cell.median_ms = 1e3 * statistics.median(times)
        cells[method], fns[method] = cell, fn
    if not args.no_memory:
        for method, fn in fns.items():
            cells[method].peak_mib = peak_mib(fn, device)
    return cells


def table(results: dict[int, dict[str, Cell]]) -> str:
    lines = [
        "| B | method | median ms (repeats) | × fast | peak MiB | max rel. diff to fast |",
        "|---|---|---|---|---|---|",
    ]
    for batch, cells in results.items():
        fast = cells.get("fast")
        for method, cell in cells.items():
            if cell.skipped is not None or cell.median_ms is None:
                lines.append(f"| {batch} | {method} | {cell.skipped} | | | |")
                continue
            ratio = (
                f"{cell.median_ms / fast.median_ms:.1f}"
                if fast is not None and fast.median_ms
                else ""
            )
            peak = "n/a" if cell.peak_mib is None else f"{cell.peak_mib:.0f}"
            diff = "" if cell.max_rel_diff is None else f"{cell.max_rel_diff:.1e}"
            lines.append(
                f"| {batch} | {method} | {cell.median_ms:.2f} ({cell.repeats}) | {ratio} | "
                f"{peak} | {diff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B in {32, 128}, 3 repeats")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timing per cell")
    parser.add_argument("--max-gib", type=float, default=4.0)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    if "fast" in args.methods:  # the reference of the ratios and of the checks
        args.methods = ["fast", *(m for m in args.methods if m != "fast")]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    print(
        f"torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    )
    results = {batch: measure(batch, args) for batch in batches}
    print(table(results))


if __name__ == "__main__":
    main()
