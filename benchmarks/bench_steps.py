"""Median time and peak memory of whole training steps: plain SGD, our JD steps and TorchJD's.

Run from the repository root::

    python -m benchmarks.bench_steps                      # every configuration (CPU: ~15 min)
    python -m benchmarks.bench_steps --quick              # the smallest two, in-process (~1 min)
    python -m benchmarks.bench_steps --device cuda --out steps.md

For each configuration (model, batch, number of losses) four steps are measured in the same run:

* ``sgd``: the baseline, ``loss.sum()`` (MTL) or ``losses.mean()`` (IWRM, IWMTL) backward, then
  ``torch.optim.SGD.step()``;
* ``jd-eager`` and ``jd-compiled``: our step (``mtl_gramian_step`` for MTL, or ``mtl_step`` with
  ``--mtl-step jacobian``; ``gramian_step`` for IWRM and IWMTL; with ``upgrad()`` and the
  functional ``sgd``), eagerly and under ``torch.compile(fullgraph=True)``;
  the compile time (first call) is reported on its own and excluded from the step time;
* ``torchjd``: TorchJD's equivalent when it is importable, ``mtl_backward`` +
  ``jac_to_grad(..., UPGrad())`` (MTL) or autogram's ``Engine(model, batch_dim=0)`` +
  ``UPGradWeighting()`` + ``losses.backward(weights)`` (IWRM, IWMTL), then ``optimizer.step()``.

A ``weights-m128`` row times the UPGrad weighting alone (``upgrad_weights`` eager and compiled,
TorchJD's ``UPGradWeighting``) on ``[128, 128]`` Gramians, and a last table times the parts of our
eager step separately (Jacobian, Gramian, weights, update), to show where the time goes.

Each step runs on the same batch: a first call (the compilation, for the compiled step), then
``--warmup`` untimed steps, then ``--repeats`` timed ones (fewer when they would exceed
``--budget`` seconds: the count is then shown as ``[n=…]``). CUDA is synchronised around each
timed step. The median is reported, with its ratio to the SGD step of the same configuration.
By default every (configuration, step) runs in a fresh subprocess, so that steps share no
allocator, compile or thread-pool state, and one that hangs or runs out of memory is cut off after
``--timeout`` seconds and reported as such. ``--in-process`` (implied by ``--quick``) runs
everything in this process, faster to start, without the memory measurements.

Our UPGrad solver's memory (:func:`solver_gib`, 0.75 GiB for ``m = 1024``) is checked against
``--max-gib`` before our step runs; where it exceeds it, the table says so. Nothing is
extrapolated.

Memory is the peak *increase* during one step above what is held between steps (parameters,
optimizer state, data). CUDA: ``max_memory_allocated()`` after ``reset_peak_memory_stats()``,
minus ``memory_allocated()`` before. CPU (Linux): the peak resident set size ``VmHWM``, reset
through ``/proc/self/clear_refs``, minus ``VmRSS`` before; glibc's heap is trimmed and its mmap
threshold fixed at 64 KiB first, so that a freed tensor returns its pages to the OS and the next
one has to fault them in again (these steps are not the timed ones). It is an estimate of the
step's transient memory, not of the allocator's exact high-water mark.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import call, combine, flatten_gramian, gramian, params_of
from torchjd_func._jacobian import mtl_jacobian
from torchjd_func._probes import MTLGramian, value_and_mtl_gramian, value_and_per_sample_gramian
from torchjd_func.aggregation import upgrad, upgrad_weights
from torchjd_func.optim import sgd
from torchjd_func.step import StepFn, gramian_step, mtl_gramian_step, mtl_step

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 256
LR = 1e-3
METHODS = ("sgd", "jd-eager", "jd-compiled", "torchjd")
Kind = Literal["mtl", "iwrm", "iwmtl", "weights"]
Step = Callable[[], object]


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration."""

    name: str
    kind: Kind
    batch: int
    tasks: int
    target: float | None = None
    """The issue's target for the ratio of our step's median time to the SGD step's."""

    @property
    def n_losses(self) -> int:
        """Rows of the Jacobian (size of the Gramian)."""
        return self.tasks if self.kind in ("mtl", "weights") else self.batch * self.tasks

    @property
    def description(self) -> str:
        if self.kind == "mtl":
            return f"MTL, {self.tasks} heads, batch {self.batch}"
        if self.kind == "iwrm":
            return f"IWRM, batch {self.batch}"
        if self.kind == "iwmtl":
            return f"IWMTL, batch {self.batch} × {self.tasks} tasks"
        return f"UPGrad weights only, m = {self.tasks}"


CONFIGS = {
    config.name: config
    for config in [
        Config("mtl-m2", "mtl", 64, 2, target=1.3),
        Config("mtl-m8", "mtl", 64, 8, target=1.3),
        Config("mtl-m32", "mtl", 64, 32, target=1.3),
        Config("iwrm-b32", "iwrm", 32, 1),
        Config("iwrm-b128", "iwrm", 128, 1, target=2.5),
        Config("iwrm-b1024", "iwrm", 1024, 1),
        Config("iwmtl-b32-m4", "iwmtl", 32, 4),
        Config("weights-m128", "weights", 0, 128),
    ]
}
QUICK = ("mtl-m2", "iwrm-b32")


@dataclass
class Cell:
    """The measurements of one (configuration, step)."""

    median_ms: float | None = None
    repeats: int = 0
    compile_s: float | None = None
    peak_mib: float | None = None
    skipped: str | None = None
    parts_ms: dict[str, float | str] | None = None


MTL_STEP = ["gramian"]
"""Our MTL step: ``mtl_step`` ("jacobian") or ``mtl_gramian_step`` ("gramian"), ``--mtl-step``."""

NOT_RUN = Cell(skipped="not run")
"""A step left out with ``--methods``."""


# ----------------------------------------------------------------------------------------------
# The steps


def _trunk() -> list[nn.Module]:
    """The MLP's layers: three hidden layers of width 256 on 256-d inputs."""
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return layers


def torchjd_missing() -> str | None:
    """Why TorchJD (with its quadprog extra) cannot be used, or ``None`` if it can."""
    try:
        from torchjd.aggregation import UPGradWeighting

        UPGradWeighting()  # raises ImportError without the quadprog extra
    except ImportError as error:
        return f"torchjd not importable: {error}"
    return None


def solver_gib(m: int) -> float:
    """GiB that our UPGrad solver's PDAS steps hold at once for ``m`` losses (float64): the
    gathered ``[m, m // 2, m // 2]`` systems in chunks of at most 256 MiB (with their LU copy and
    int32 index: ×2.5), plus a few ``[m, m]`` matrices. (The interior-point fallback, which runs
    only when PDAS has not converged, factors ``[m, m, m]``.)"""
    systems = min(m * (m // 2) ** 2 * 8, 2**28)
    return (2.5 * systems + 16 * m * m * 8) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Functional:
    """A pure step with its (params, optimizer state, weighting state) threaded through."""

    def __init__(
        self, step: StepFn[Any, Any], params: TensorDict, n_losses: int, batch: Any
    ) -> None:
        self.step, self.batch = step, batch
        self.state = (params, sgd(LR).init(params), upgrad().init(n_losses))

    def __call__(self) -> Tensor:
        out = self.step(*self.state, self.batch)
        self.state = (out.params, out.opt_state, out.agg_state)
        return out.metrics["weights"]


def compile_with(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True)`` with ``backend``, or ``"BACKEND:MODE"`` (e.g.
    ``"inductor:reduce-overhead"`` for CUDA graphs)."""
    name, _, mode = backend.partition(":")
    return torch.compile(fn, fullgraph=True, backend=name, mode=mode or None)


def _jd(
    step: StepFn[Any, Any],
    params: TensorDict,
    config: Config,
    batch: Any,
    method: str,
    backend: str,
) -> Step:
    if method == "jd-compiled":
        torch._dynamo.reset()
        step = compile_with(step, backend)
    return _Functional(step, params, config.n_losses, batch)


def _parts(
    jacobian_fn: Callable[[], TensorDict], params: TensorDict, max_gib: float
) -> dict[str, Step | str]:
    """Zero-argument functions that each run one part of our eager step (or why not)."""
    jac = jacobian_fn()
    square = flatten_gramian(gramian(jac))
    m = square.shape[0]
    parts: dict[str, Step | str] = {
        "jacobian": jacobian_fn,
        "gramian": lambda: flatten_gramian(gramian(jac)),
    }
    if solver_gib(m) > max_gib:
        parts["weights"] = f"skipped: {solver_gib(m):.1f} GiB solves"
        weights = torch.full((m,), 1 / m, device=square.device)
    else:
        parts["weights"] = lambda: upgrad_weights(square)
        weights = upgrad_weights(square)
    optimizer = sgd(LR)
    opt_state = optimizer.init(params)
    shaped = weights.reshape(jac.batch_size)
    parts["update"] = lambda: optimizer.update(combine(jac, shaped), opt_state, params)
    return parts


def _mtl(config: Config, method: str, device: torch.device, backend: str) -> Step:
    trunk = nn.Sequential(*_trunk()).to(device)
    heads = nn.ModuleList([nn.Linear(WIDTH, 1) for _ in range(config.tasks)]).to(device)
    x = torch.randn(config.batch, WIDTH, device=device)
    y = torch.randn(config.batch, config.tasks, device=device)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=LR)

    def task_losses(features: Tensor) -> list[Tensor]:
        return [(head(features).squeeze(1) - y[:, i]).pow(2).mean() for i, head in enumerate(heads)]

    def sgd_step() -> object:
        optimizer.zero_grad()
        torch.autograd.backward(torch.stack(task_losses(trunk(x))).sum())
        return optimizer.step()

    if method == "sgd":
        return sgd_step
    if method == "torchjd":
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = UPGrad()

        def torchjd_step() -> object:
            features = trunk(x)
            mtl_backward(task_losses(features), features)
            jac_to_grad(trunk.parameters(), aggregator)
            optimizer.step()
            return optimizer.zero_grad()

        return torchjd_step
    params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)}).clone()
    if MTL_STEP[0] == "gramian":
        step = mtl_gramian_step(trunk, _task_fns(heads), upgrad(), sgd(LR))
    else:
        step = mtl_step(_trunk_fn(trunk), _heads_fn(heads), upgrad(), sgd(LR))
    return _jd(step, params, config, ((x,), (y,)), method, backend)


def _trunk_fn(trunk: nn.Module) -> Callable[[TensorDict, Tensor], Tensor]:
    def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
        features: Tensor = call(trunk, params, x)
        return features

    return trunk_fn


def _heads_fn(heads: nn.ModuleList) -> Callable[[TensorDict, Tensor, Tensor], Tensor]:
    def heads_fn(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return torch.stack(
            [
                (call(head, params[str(i)], features).squeeze(1) - y[:, i]).pow(2).mean()
                for i, head in enumerate(heads)
            ]
        )

    return heads_fn


def _task_fns(heads: nn.ModuleList) -> dict[str, Callable[[TensorDict, Tensor, Tensor], Tensor]]:
    """The tasks as ``{name: loss}``, each loss taking its own head's parameters only."""

    def task(i: int) -> Callable[[TensorDict, Tensor, Tensor], Tensor]:
        def loss(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
            prediction: Tensor = call(heads[i], params, features)
            return (prediction.squeeze(1) - y[:, i]).pow(2).mean()

        return loss

    return {str(i): task(i) for i in range(len(heads))}


def _mtl_parts(config: Config, device: torch.device, max_gib: float) -> dict[str, Step | str]:
    """The parts of our MTL step: ``mtl_step``'s (Jacobian, Gramian, weights, update), or
    ``mtl_gramian_step``'s (Gramian with the forward and backward passes, weights, update)."""
    trunk = nn.Sequential(*_trunk()).to(device)
    heads = nn.ModuleList([nn.Linear(WIDTH, 1) for _ in range(config.tasks)]).to(device)
    x = torch.randn(config.batch, WIDTH, device=device)
    y = torch.randn(config.batch, config.tasks, device=device)
    shared, head_params = params_of(trunk), params_of(heads)
    if MTL_STEP[0] == "gramian":
        tasks = _task_fns(heads)

        def mtl_gramian() -> MTLGramian:
            return value_and_mtl_gramian(trunk, shared, (x,), tasks, head_params, (y,))

        out = mtl_gramian()
        return _gramian_parts(
            lambda: mtl_gramian().gramian, out.gramian, out.combine, shared, max_gib
        )
    trunk_fn, heads_fn = _trunk_fn(trunk), _heads_fn(heads)

    def jacobian_fn() -> TensorDict:
        return mtl_jacobian(trunk_fn, heads_fn, shared, head_params, (x,), (y,)).jacobian

    return _parts(jacobian_fn, shared, max_gib)


def _per_sample_problem(
    config: Config, device: torch.device
) -> tuple[nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """The model (MLP + a linear output per task), a batch, and the losses of the batch."""
    model = nn.Sequential(*_trunk(), nn.Linear(WIDTH, config.tasks)).to(device)
    x = torch.randn(config.batch, WIDTH, device=device)
    y = torch.randn(
        (config.batch,) if config.kind == "iwrm" else (config.batch, config.tasks), device=device
    )

    def losses_fn(prediction: Tensor, y: Tensor) -> Tensor:
        # Per-sample losses: [B] (IWRM) or [B, m] (IWMTL).
        return (prediction.reshape(y.shape) - y) ** 2

    return model, x, y, losses_fn


def _per_sample(config: Config, method: str, device: torch.device, backend: str) -> Step:
    model, x, y, losses_fn = _per_sample_problem(config, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def sgd_step() -> object:
        optimizer.zero_grad()
        torch.autograd.backward(losses_fn(model(x), y).mean())
        return optimizer.step()

    if method == "sgd":
        return sgd_step
    if method == "torchjd":
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine

        engine, weighting = Engine(model, batch_dim=0), UPGradWeighting()

        def torchjd_step() -> object:
            losses = losses_fn(model(x), y)
            weights = weighting(engine.compute_gramian(losses)).reshape(losses.shape)
            optimizer.zero_grad()
            torch.autograd.backward(losses, weights)
            return optimizer.step()

        return torchjd_step
    step = gramian_step(model, losses_fn, upgrad(), sgd(LR))
    return _jd(step, params_of(model).clone(), config, ((x,), (y,)), method, backend)


def _per_sample_parts(
    config: Config, device: torch.device, max_gib: float
) -> dict[str, Step | str]:
    """The parts of ``gramian_step``: the Gramian (forward, backward, per-layer Gramians), the
    weights, and the update (one more backward + SGD)."""
    model, x, y, losses_fn = _per_sample_problem(config, device)
    params = params_of(model)

    def gramian_fn() -> Tensor:
        return value_and_per_sample_gramian(model, params, (x,), losses_fn, (y,)).gramian

    out = value_and_per_sample_gramian(model, params, (x,), losses_fn, (y,))

    def combine_fn(weights: Tensor) -> TensorDict:
        return out.combine(weights.reshape(out.losses.shape))

    return _gramian_parts(gramian_fn, out.gramian, combine_fn, params, max_gib)


def _gramian_parts(
    gramian_fn: Callable[[], Tensor],
    square: Tensor,
    combine_fn: Callable[[Tensor], TensorDict],
    params: TensorDict,
    max_gib: float,
) -> dict[str, Step | str]:
    """The parts of a step with no Jacobian: the Gramian ``[m, m]`` (with the forward and
    backward passes), the weights, and the closed-form update + SGD."""
    m = square.shape[0]
    parts: dict[str, Step | str] = {"jacobian": "n/a", "gramian": gramian_fn}
    if solver_gib(m) > max_gib:
        parts["weights"] = f"skipped: {solver_gib(m):.1f} GiB solves"
        weights = torch.full((m,), 1 / m, device=square.device)
    else:
        parts["weights"] = lambda: upgrad_weights(square)
        weights = upgrad_weights(square)
    optimizer = sgd(LR)
    opt_state = optimizer.init(params)
    parts["update"] = lambda: optimizer.update(combine_fn(weights), opt_state, params)
    return parts


def _weights(config: Config, method: str, device: torch.device, backend: str) -> Step:
    """UPGrad weights alone, on Gramians ``J Jᵀ`` of random ``J [m, 2m]`` (a pool, in turn)."""
    m = config.tasks
    jacobians = [torch.randn(m, 2 * m, device=device) for _ in range(8)]
    gramians = [j @ j.T for j in jacobians]
    if method == "torchjd":
        from torchjd.aggregation import UPGradWeighting

        weighting: Callable[[Tensor], Tensor] = UPGradWeighting()
    elif method == "jd-compiled":
        torch._dynamo.reset()
        weighting = compile_with(upgrad_weights, backend)
    else:
        weighting = upgrad_weights
    calls = iter(range(sys.maxsize))
    return lambda: weighting(gramians[next(calls) % len(gramians)])


def skip_reason(config: Config, method: str, max_gib: float) -> str | None:
    """Why a cell is not measured, decided before running it, or ``None``."""
    if method == "sgd" and config.kind == "weights":
        return "n/a"
    if method == "torchjd":
        return torchjd_missing()
    if method.startswith("jd") and config.kind != "weights" and method != "jd-parts":
        gib = solver_gib(config.n_losses)
        if gib > max_gib:
            return f"skipped: UPGrad solves need {gib:.1f} GiB > --max-gib {max_gib:g}"
    if method == "jd-parts" and config.kind == "weights":
        return "n/a"
    return None


def build(config: Config, method: str, device: torch.device, backend: str) -> Step:
    """The zero-argument step of ``method`` on ``config``."""
    torch.manual_seed(0)
    if config.kind == "mtl":
        return _mtl(config, method, device, backend)
    if config.kind == "weights":
        return _weights(config, method, device, backend)
    return _per_sample(config, method, device, backend)


# ----------------------------------------------------------------------------------------------
# Measurements


def _median_ms(step: Step, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_step(step: Step, device: torch.device, args: argparse.Namespace) -> Cell:
    """The first call's time (compilation included), then the median of the timed steps.

    After the first call, ``args.warmup`` untimed steps (only one once they have taken a third of
    ``args.budget``), then ``args.repeats`` timed steps, or as many as fit in ``args.budget``
    seconds at the last untimed step's pace (at least one).
    """
    first_s = 1e-3 * _median_ms(step, device, 1)
    last = spent = 0.0
    for i in range(args.warmup):
        if i > 0 and spent > args.budget / 3:
            break
        last = 1e-3 * _median_ms(step, device, 1)
        spent += last
    repeats = max(1, min(args.repeats, int(args.budget / max(last, 1e-9))))
    return Cell(median_ms=_median_ms(step, device, repeats), repeats=repeats, compile_s=first_s)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_freed_memory() -> None:
    """Make freed CPU memory leave the process (glibc), so that RSS follows live tensors."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: also disables its dynamic growth
    libc.malloc_trim(0)


def peak_mib(step: Step, device: torch.device, steps: int = 1) -> float | None:
    """Peak memory increase during ``steps`` steps, above what is held before (module doc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        _release_freed_memory()
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None  # not Linux/glibc: no measurement rather than a wrong one
    for _ in range(steps):
        step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _parts_ms(
    config: Config, device: torch.device, args: argparse.Namespace
) -> dict[str, float | str]:
    torch.manual_seed(0)
    if config.kind == "mtl":
        parts = _mtl_parts(config, device, args.max_gib)
    else:
        parts = _per_sample_parts(config, device, args.max_gib)
    result: dict[str, float | str] = {}
    for name, part in parts.items():
        if isinstance(part, str):
            result[name] = part
        else:
            result[name] = time_step(part, device, args).median_ms or math.nan
    return result


def run_cells(
    cells: Sequence[tuple[Config, str]], args: argparse.Namespace
) -> dict[tuple[str, str], Cell]:
    """Measures the cells in this process: all the times first, then all the memory peaks."""
    device = torch.device(args.device)
    results: dict[tuple[str, str], Cell] = {}
    steps: dict[tuple[str, str], Step] = {}
    for config, method in cells:
        key = (config.name, method)
        reason = skip_reason(config, method, args.max_gib)
        if reason is not None:
            results[key] = Cell(skipped=reason)
        elif method == "jd-parts":
            results[key] = Cell(parts_ms=_parts_ms(config, device, args))
        else:
            steps[key] = build(config, method, device, args.backend)
            results[key] = time_step(steps[key], device, args)
            if method != "jd-compiled":
                results[key].compile_s = None
    if args.memory:
        for key, step in steps.items():
            results[key].peak_mib = peak_mib(step, device)
    return results


def _run_child(config: Config, method: str, args: argparse.Namespace) -> Cell:
    """Measures one cell in a fresh Python process."""
    command = [sys.executable, "-m", "benchmarks.bench_steps", "--child", config.name, method]
    options = ("device", "repeats", "warmup", "budget", "max_gib", "backend", "threads", "mtl_step")
    for option in options:
        if getattr(args, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if not args.memory:
        command.append("--no-memory")
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return Cell(skipped=f"timed out (> {args.timeout:g} s)")
    if done.returncode != 0:
        if done.returncode < 0:
            return Cell(skipped=f"killed by signal {-done.returncode} (out of memory?)")
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return Cell(skipped=f"failed: {last[:80]}")
    return Cell(**json.loads(done.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------------------------
# Report


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _time_cell(cell: Cell, baseline: Cell | None, repeats: int) -> str:
    if cell.skipped is not None or cell.median_ms is None:
        return cell.skipped or "-"
    text = f"{_fmt_ms(cell.median_ms)} ms"
    if baseline is not None and baseline.median_ms:
        text += f" ({cell.median_ms / baseline.median_ms:.2f}×)"
    if cell.repeats < repeats:
        text += f" [n={cell.repeats}]"
    return text


def _verdict(config: Config, row: dict[str, Cell], device: torch.device) -> str:
    sgd_ms = row["sgd"].median_ms
    ours: dict[str, float] = {}
    for method in ("jd-eager", "jd-compiled"):
        ms = row[method].median_ms
        if ms is not None:
            ours[method] = ms
    if config.kind == "weights":
        if device.type != "cuda":
            return "≤ 1 ms on an H100: not checkable on CPU"
        best = min(ours.values(), default=None)
        name = torch.cuda.get_device_name(device)
        if best is None:
            return "≤ 1 ms on an H100: not measured"
        return f"≤ 1 ms on an H100: {'met' if best <= 1 else 'missed'} on {name} ({best:.3g} ms)"
    if config.name == "iwrm-b1024":
        return "feasible: " + ("met" if ours else "missed (our step could not be run)")
    limit = config.target
    if limit is None:
        return "none"
    if not ours or not sgd_ms:
        return f"≤ {limit}×: not measured"
    method, ms = min(ours.items(), key=lambda item: item[1])
    ratio = ms / sgd_ms
    word = "met" if ratio <= limit else "missed"
    return f"≤ {limit}×: {word} (best {ratio:.2f}×, {method.removeprefix('jd-')})"


def report(
    configs: Sequence[Config],
    results: dict[tuple[str, str], Cell],
    device: torch.device,
    header: str,
    repeats: int,
) -> str:
    """The markdown report: step times, memory, compile times, and the parts of our step."""
    lines = [header, ""]
    lines += [
        "| config | losses | SGD | JD eager | JD compiled | TorchJD | target (vs SGD) |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        row = {m: results.get((config.name, m), NOT_RUN) for m in METHODS}
        base = row["sgd"] if row["sgd"].median_ms else None
        cells = [_time_cell(row[m], base, repeats) for m in METHODS]
        lines.append(
            f"| {config.name} ({config.description}) | {config.n_losses} | "
            + " | ".join(cells)
            + f" | {_verdict(config, row, device)} |"
        )
    lines += ["", "Peak memory increase during a step (MiB), and compile time of our step:", ""]
    lines += [
        "| config | SGD | JD eager | JD compiled | TorchJD | compile + first step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for config in configs:
        row = {m: results.get((config.name, m), NOT_RUN) for m in METHODS}
        mems = [
            f"{c.peak_mib:.1f}" if c.peak_mib is not None else ("-" if c.skipped else "n/a")
            for c in row.values()
        ]
        compiled = row["jd-compiled"].compile_s
        lines.append(
            f"| {config.name} | "
            + " | ".join(mems)
            + f" | {f'{compiled:.1f}' if compiled is not None else '-'} |"
        )
    parts_rows = [
        (config, results[config.name, "jd-parts"].parts_ms)
        for config in configs
        if (config.name, "jd-parts") in results and results[config.name, "jd-parts"].parts_ms
    ]
    if parts_rows:
        lines += ["", "Parts of our eager step, each timed on its own (median ms):", ""]
        lines += [
            "| config | Jacobian (incl. forward) | Gramian (without a Jacobian: incl. forward, "
            "backward) | UPGrad weights | combine + SGD |",
            "|---|---|---|---|---|",
        ]
        for config, parts in parts_rows:
            assert parts is not None
            values = [
                _fmt_ms(v) if isinstance(v, float) else v
                for v in (parts[k] for k in ("jacobian", "gramian", "weights", "update"))
            ]
            lines.append(f"| {config.name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help=f"{', '.join(QUICK)}, 5 repeats, --in-process"
    )
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    parser.add_argument(
        "--mtl-step",
        choices=["jacobian", "gramian"],
        default="gramian",
        help="our MTL step: mtl_step (task Jacobian) or mtl_gramian_step (closed-form Gramian)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="steps to measure (default: all); the others show as 'not run'",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (≥ 1)")
    parser.add_argument(
        "--budget", type=float, default=30.0, help="seconds of timed steps per cell at most"
    )
    parser.add_argument(
        "--max-gib", type=float, default=4.0, help="skip our UPGrad when its solves need more"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per subprocess")
    parser.add_argument(
        "--backend",
        default="inductor",
        help='torch.compile backend, or "BACKEND:MODE", e.g. "inductor:reduce-overhead"',
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (also in subprocesses)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per cell (and no memory)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--no-parts", action="store_true", help="skip the parts of our step")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark and returns (and prints) its markdown report."""
    args = _parser().parse_args(argv)
    MTL_STEP[0] = args.mtl_step
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    args.warmup = max(1, args.warmup)
    args.in_process = args.in_process or args.quick
    # In one process the cells share the heap, and the memory pass changes malloc's settings
    # for what follows: memory is only measured in a fresh process per cell.
    args.memory = not args.no_memory and (args.child is not None or not args.in_process)
    if args.child is not None:
        config, method = CONFIGS[args.child[0]], args.child[1]
        cell = run_cells([(config, method)], args)[config.name, method]
        print(json.dumps(asdict(cell)))
        return ""

    names = args.configs or (QUICK if args.quick else list(CONFIGS))
    configs = [CONFIGS[name] for name in names]
    methods = (*args.methods, *(() if args.no_parts else ("jd-parts",)))
    # TorchJD last: once numpy has run in a process, torch's small LAPACK calls were measured
    # slower on a 2-core machine (see bench_qp.py), which would bias our columns in-process.
    cells = [(c, m) for m in methods if m != "torchjd" for c in configs]
    cells += [(c, "torchjd") for c in configs if "torchjd" in methods]
    load_before = os.getloadavg()
    start = time.perf_counter()
    if args.in_process:
        # A fresh compile per compiled cell; beyond dynamo's default limit it would fail.
        with torch._dynamo.config.patch(recompile_limit=max(64, 2 * len(cells))):
            results = run_cells(cells, args)
    else:
        results = {}
        for config, method in cells:
            reason = skip_reason(config, method, args.max_gib)
            cell = Cell(skipped=reason) if reason else _run_child(config, method, args)
            results[config.name, method] = cell
            print(f"  {config.name:>14} {method:<12} {cell}", flush=True)
    load_after = os.getloadavg()
    header = (
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads, "
        f"median of {args.repeats} steps after the first call and {args.warmup} untimed, "
        f"{'in one process' if args.in_process else 'one subprocess per cell'}, "
        f"memory {'measured' if args.memory else 'not measured'}, compile backend "
        f"{args.backend}, MTL step {args.mtl_step}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{time.perf_counter() - start:.0f} s"
    )
    text = report(configs, results, torch.device(args.device), header, args.repeats)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
