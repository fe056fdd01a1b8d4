"""Median time of ``upgrad_weights`` (eager and compiled), next to TorchJD's ``UPGradWeighting``.

Run from the repository root::

    python -m benchmarks.bench_qp                    # m in {2, 4, 8, 32, 128}, CPU (+ CUDA)
    python -m benchmarks.bench_qp --sizes 8 32 --repeats 50 --devices cpu

Each timed call gets a new Gramian ``J Jᵀ`` of random ``J`` ``[m, 2m]`` (drawn from a pool made
in advance), so that the time includes the data-dependent parts of the solver (its fallback runs
only when the active-set method has not converged). CUDA calls are synchronised before the clock
is read. TorchJD (``pip install torchjd[quadprog]``) is timed when it is importable; it is not a
dependency of this project.
"""

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchjd_func._qp import upgrad_weights

Weighting = Callable[[Tensor], Tensor]


def _torchjd_upgrad() -> Weighting | None:
    """TorchJD's ``UPGradWeighting()`` if TorchJD and its quadprog extra are installed."""
    try:
        from torchjd.aggregation import UPGradWeighting

        # Raises ImportError if TorchJD's optional quadprog dependencies are missing.
        weighting: Weighting = UPGradWeighting()
    except ImportError:
        return None
    return weighting


def _gramians(m: int, count: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(m)
    jacobians = [torch.randn(m, 2 * m, generator=gen, dtype=torch.float64) for _ in range(count)]
    return [(j @ j.T).to(device=device, dtype=dtype) for j in jacobians]


def _median_ms(fn: Weighting, gramians: Sequence[Tensor], repeats: int) -> float:
    device = gramians[0].device
    times = []
    for i in range(repeats):
        gramian = gramians[i % len(gramians)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(gramian)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_compiled(
    gramians: Sequence[Tensor], repeats: int, warmup: int, mode: str | None
) -> tuple[float, float]:
    """(compile + first call in s, median ms) of ``upgrad_weights`` compiled for this shape."""
    torch._dynamo.reset()
    compiled = torch.compile(upgrad_weights, fullgraph=True, dynamic=False, mode=mode)
    start = time.perf_counter()
    compiled(gramians[0])
    if gramians[0].device.type == "cuda":
        torch.cuda.synchronize(gramians[0].device)
    compile_s = time.perf_counter() - start
    for gramian in gramians[:warmup]:
        compiled(gramian)
    return compile_s, _median_ms(compiled, gramians, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per cell")
    parser.add_argument("--pool", type=int, default=8, help="distinct Gramians per size")
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="Gramian dtype"
    )
    parser.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu, and cuda if available"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    parser.add_argument(
        "--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead"'
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    has_torchjd = importlib.util.find_spec("torchjd") is not None
    # One fresh compile per size; more shapes than dynamo's default limit would fail.
    torch._dynamo.config.recompile_limit = max(64, len(args.sizes) + 8)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, Gramian {args.dtype}, "
        f"median of {args.repeats} calls; torchjd "
        + ("installed" if has_torchjd else "not installed"),
        flush=True,
    )
    rows: dict[tuple[str, int], list[str]] = {}
    for device_name in devices:
        device = torch.device(device_name)
        for m in args.sizes:
            gramians = _gramians(m, args.pool, dtype, device)
            for gramian in gramians[: args.warmup]:
                upgrad_weights(gramian)
            row = [f"{_median_ms(upgrad_weights, gramians, args.repeats):.3f}", "-", "-", "-"]
            if not args.no_compile:
                seconds, ms = _time_compiled(gramians, args.repeats, args.warmup, args.compile_mode)
                row[1:3] = [f"{ms:.3f}", f"{seconds:.1f}"]
            rows[device_name, m] = row
    # TorchJD is imported and timed last: once it (numpy, qpsolvers) has been imported and run,
    # torch's small multi-threaded LAPACK calls were measured up to 70x slower on the 2-core test
    # machine, which would bias the columns above.
    torchjd_upgrad = _torchjd_upgrad() if has_torchjd else None
    if torchjd_upgrad is not None:
        for device_name in devices:
            for m in args.sizes:
                gramians = _gramians(m, args.pool, dtype, torch.device(device_name))
                for gramian in gramians[: args.warmup]:
                    torchjd_upgrad(gramian)
                rows[device_name, m][3] = (
                    f"{_median_ms(torchjd_upgrad, gramians, args.repeats):.3f}"
                )

    header = (
        f"{'device':>6} {'m':>5} {'eager ms':>10} {'compiled ms':>12} {'compile s':>10} "
        f"{'torchjd ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for (device_name, m), (eager, compiled, compile_s, reference) in rows.items():
        print(f"{device_name:>6} {m:>5} {eager:>10} {compiled:>12} {compile_s:>10} {reference:>11}")


if __name__ == "__main__":
    main()
