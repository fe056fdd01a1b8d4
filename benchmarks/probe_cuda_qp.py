"""Where the time of ``upgrad_weights`` goes on CUDA: a profile and variant timings.

Run from the repository root on a machine with a GPU (``--device cpu`` for a smoke test)::

    python -m benchmarks.probe_cuda_qp --sizes 32 128 --variants eager always+graphs
    python -m benchmarks.probe_cuda_qp --sizes 8 --enumerate-max-cuda 6   # PDAS instead at m = 8

Prints, for each ``m``, as it goes: the number of CUDA kernel launches and host synchronisations
of one eager call (``torch.profiler``), the top operators by host time, and the median time
(synchronised around each call, after the first calls) of ``upgrad_weights`` eagerly, compiled (``fullgraph=True``) in
the default mode and with ``mode="reduce-overhead"`` (CUDA graphs), of the fixed-trip
variant of the solver (``fallback="always"``) compiled with CUDA graphs, and of the unrolled PDAS
loop under the ``cudagraphs`` backend (CUDA graph trees without inductor, where ``torch.cond``
can become a conditional node of the graph).
"""

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from torchjd_func import _qp
from torchjd_func._qp import dual_cone_projection, normalize_regularize, solve_box_qp


def _gramians(m: int, count: int, device: torch.device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(m)
    out = []
    for _ in range(count):
        j = torch.randn(m, 2 * m, generator=gen, dtype=torch.float64)
        out.append((j @ j.T).to(device=device, dtype=torch.float32))
    return out


def _fixed_trip(gramian: Tensor) -> Tensor:
    """UPGrad weights through ``solve_box_qp(fallback="always")``: no data-dependent branch."""
    g = normalize_regularize(gramian.to(torch.float64))
    m = g.shape[-1]
    u = torch.eye(m, dtype=g.dtype, device=g.device) / m
    y = solve_box_qp(g, u @ g, fallback="always")
    return (u + y).sum(dim=-2).to(gramian.dtype)


def _upgrad(gramian: Tensor) -> Tensor:
    m = gramian.shape[-1]
    u = torch.eye(m, dtype=gramian.dtype, device=gramian.device) / m
    return dual_cone_projection(u, gramian).sum(dim=-2)


class Variant(NamedTuple):
    fn: Callable[[Tensor], Tensor]
    backend: str | None
    """None: eager; else torch.compile's backend."""
    mode: str | None = None
    loop: str | None = None
    """``_qp._COMPILED_LOOP`` while compiling and timing (None: unchanged)."""


VARIANTS: dict[str, Variant] = {
    "eager": Variant(_upgrad, None),
    "compiled": Variant(_upgrad, "inductor"),
    "compiled+graphs": Variant(_upgrad, "inductor", "reduce-overhead"),
    "always+graphs": Variant(_fixed_trip, "inductor", "reduce-overhead"),
    # CUDA graph trees without inductor: torch.cond as a conditional node (torch >= 2.11?), the
    # PDAS loop unrolled. Last: a failed capture can break later ones in the same process.
    "unroll+cudagraphs": Variant(_upgrad, "cudagraphs", None, "unroll"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[Tensor], Tensor], gramians: Sequence[Tensor], repeats: int) -> float:
    device = gramians[0].device
    times = []
    for i in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn(gramians[i % len(gramians)])
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _profile(fn: Callable[[Tensor], Tensor], gramian: Tensor) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn(gramian)
    _sync(gramian.device)
    activities = [ProfilerActivity.CPU]
    if gramian.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn(gramian)
        _sync(gramian.device)
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    launches = sum(c for k, c in counts.items() if "LaunchKernel" in k or "cuLaunch" in k)
    syncs = sum(c for k, c in counts.items() if "Synchronize" in k)
    scalars = counts.get("aten::_local_scalar_dense", 0)
    table = events.table(sort_by="self_cpu_time_total", row_limit=15)
    return f"launches {launches}, syncs {syncs}, item() {scalars}\n{table}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="to time"
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu for a smoke test")
    parser.add_argument(
        "--enumerate-max-cuda",
        type=int,
        default=None,
        help="override the largest m solved by enumeration on CUDA (e.g. 6 to time PDAS at m = 8)",
    )
    parser.add_argument(
        "--jacobi-sweeps", type=int, default=None, help="override PDAS's warm start"
    )
    parser.add_argument(
        "--compiled-unroll",
        action="store_true",
        help="compiled PDAS: unrolled steps instead of a while_loop (no host read per step)",
    )
    args = parser.parse_args(argv)
    if args.enumerate_max_cuda is not None:
        _qp._ENUMERATE_MAX_CUDA = args.enumerate_max_cuda
    if args.jacobi_sweeps is not None:
        _qp._JACOBI_SWEEPS = args.jacobi_sweeps
    if args.compiled_unroll:
        _qp._COMPILED_LOOP = "unroll"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # Printed as it goes: a run cut off by a time limit still shows what it measured.
    print(f"torch {torch.__version__}, {name}", flush=True)
    for m in args.sizes:
        gramians = _gramians(m, 8, device)
        if not args.no_profile:
            print(f"--- eager profile, m = {m}: " + _profile(_upgrad, gramians[0]), flush=True)
        reference = _upgrad(gramians[0].double())
        for name in args.variants:
            variant = VARIANTS[name]
            loop = _qp._COMPILED_LOOP
            if variant.loop is not None:
                _qp._COMPILED_LOOP = variant.loop  # type: ignore[assignment]
            start = time.perf_counter()
            try:
                fn = variant.fn
                if variant.backend is not None:
                    torch._dynamo.reset()
                    fn = torch.compile(
                        fn,
                        fullgraph=True,
                        dynamic=False,
                        backend=variant.backend,
                        mode=variant.mode,
                    )
                    for gramian in gramians[:4]:
                        fn(gramian)
                    _sync(device)
                first_s = time.perf_counter() - start
                error = (fn(gramians[0]).double() - reference).abs().max().item()
                ms = _median_ms(fn, gramians, args.repeats)
                line = f"{ms:8.3f} ms  max abs error {error:.0e}  compile+warm-up {first_s:.1f} s"
            except Exception as exc:
                line = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            finally:
                _qp._COMPILED_LOOP = loop
            print(f"m = {m:4d}  {name:<18} {line}", flush=True)


if __name__ == "__main__":
    main()
