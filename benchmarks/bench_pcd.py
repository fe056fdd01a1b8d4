"""Median time of PCD's weights (eager and compiled), next to TorchJD's ``PCDWeighting``.

Run from the repository root::

    python -m benchmarks.bench_pcd                     # m in {2, 8, 32}, CPU
    python -m benchmarks.bench_pcd --sizes 8 --repeats 50 --threads 1

Each timed call is one step of the stateful weighting: the EMA update and the weights
(``pcd().update`` here, ``PCDWeighting()(G)`` in TorchJD, which solves on the CPU in float64),
on a new float32 Gramian ``J Jᵀ`` per call, drawn from a pool made in advance. Two families:
``random`` (``J [m, 2m]`` Gaussian: few active constraints) and ``conflicting`` (the secondary
rows pulled against the primary one: many). Prints a markdown table; TorchJD is timed when it is
importable (it is not a dependency of this project).
"""

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from torchjd_func.aggregation import pcd

Step = Callable[[Tensor], object]


def _gramians(family: str, m: int, count: int, device: torch.device) -> list[Tensor]:
    generator = torch.Generator().manual_seed(m)
    out = []
    for _ in range(count):
        jacobian = torch.randn(m, 2 * m, generator=generator, dtype=torch.float64)
        if family == "conflicting":
            jacobian[1:] -= 2.0 * jacobian[0]
        out.append((jacobian @ jacobian.T).to(device=device, dtype=torch.float32))
    return out


def _median_ms(fn: Step, gramians: Sequence[Tensor], repeats: int) -> float:
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


def _call(update: Callable[..., object], gramian: Tensor, *, state: object) -> object:
    return update(gramian, state)


def _torchjd() -> Step | None:
    try:
        from torchjd.aggregation import PCDWeighting
    except ImportError:
        return None
    step: Step = PCDWeighting()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--families", nargs="+", default=["random", "conflicting"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    theirs = _torchjd()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    print()
    print(
        "| family | m | eager ms | compiled ms | compile s | TorchJD ms | TorchJD / eager "
        "| TorchJD / compiled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families:
        for m in args.sizes:
            gramians = _gramians(family, m, 16, device)
            weighting = pcd()
            state = weighting.init(m, device=device)

            eager = partial(_call, weighting.update, state=state)
            for gramian in gramians[:3]:
                eager(gramian)
            eager_ms = _median_ms(eager, gramians, args.repeats)

            compiled_ms, compile_s = float("nan"), float("nan")
            if not args.no_compile:
                torch._dynamo.reset()
                compiled = torch.compile(weighting.update, fullgraph=True, dynamic=False)
                start = time.perf_counter()
                compiled(gramians[0], state)
                compile_s = time.perf_counter() - start
                for gramian in gramians[:3]:
                    compiled(gramian, state)
                compiled_ms = _median_ms(
                    partial(_call, compiled, state=state), gramians, args.repeats
                )

            theirs_ms = float("nan")
            if theirs is not None:
                for gramian in gramians[:3]:
                    theirs(gramian)
                theirs_ms = _median_ms(theirs, gramians, args.repeats)
            print(
                f"| {family} | {m} | {eager_ms:.3f} | {compiled_ms:.3f} | {compile_s:.1f} | "
                f"{theirs_ms:.3f} | {theirs_ms / eager_ms:.2f}x | {theirs_ms / compiled_ms:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
