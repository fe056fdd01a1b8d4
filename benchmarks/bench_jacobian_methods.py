"""Median time of GradDrop, ConFIG, ExcessMTL (Jacobian aggregators), MoDo and SDMGrad
(cross-Gramian weightings), eager and compiled, next to TorchJD 0.18's classes.

Run from the repository root::

    python -m benchmarks.bench_jacobian_methods                  # m in {2, 8, 32}, n = 4096
    python -m benchmarks.bench_jacobian_methods --sizes 8 --n 1000 --repeats 5 --backend eager

Each timed call gets a new input from a pool made in advance: a Jacobian ``[m, n]`` (a
TensorDict of one leaf for ours, the matrix for TorchJD's classes) or a cross-Gramian
``A = J₁ J₂ᵀ`` ``[m, m]``. Ours is the pure ``update`` with a fixed state (TorchJD's stateful
classes advance their own state, which costs the same per call). "compiled" is
``torch.compile(update, fullgraph=True)`` with ``--backend`` (inductor by default), timed after
a warm-up; the three are timed in turn at every repeat; the ratios are TorchJD's time over ours
(above 1: ours is faster). CUDA calls are synchronised before the clock is read.
"""

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict

from torchjd_func.aggregation import (
    CrossWeighting,
    JacobianAggregator,
    config,
    excess_mtl,
    graddrop,
    modo,
    sdmgrad,
)

Call = Callable[[Any], Any]


def _medians_ms(
    fns: Sequence[Call], inputs: Sequence[Sequence[Any]], repeats: int, device: torch.device
) -> list[float]:
    """Median ms of each ``fns[j]`` on ``inputs[j]``, the functions timed in turn at every
    repeat (so that a load on the machine affects them alike)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for fn, values, out in zip(fns, inputs, times, strict=True):
            value = values[i % len(values)]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(value)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - start)
    return [1e3 * statistics.median(out) for out in times]


def _methods(m: int, n: int, dtype: torch.dtype, device: torch.device, pool: int) -> list[Any]:
    """``(name, ours, theirs, our inputs, their inputs)`` for each method."""
    import torchjd.aggregation as torchjd_aggregation

    gen = torch.Generator().manual_seed(m)
    matrices = [
        torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        for _ in range(pool)
    ]
    jacobians = [TensorDict({"matrix": matrix}, batch_size=[m]) for matrix in matrices]
    crosses = [matrix @ (matrix + 0.5 * torch.randn_like(matrix)).T for matrix in matrices]
    params = TensorDict({"matrix": torch.zeros(n, dtype=dtype, device=device)}, batch_size=[])
    out: list[Any] = []
    aggregators: list[tuple[str, JacobianAggregator[Any], Call]] = [
        ("GradDrop", graddrop(), torchjd_aggregation.GradDrop()),
        ("ConFIG", config(), torchjd_aggregation.ConFIG()),
        ("ExcessMTL", excess_mtl(), torchjd_aggregation.ExcessMTL()),
    ]
    for name, aggregator, theirs in aggregators:
        state = aggregator.init(params, m)
        out.append((name, _bind(aggregator.update, state), theirs, jacobians, matrices))
    weightings: list[tuple[str, CrossWeighting[Any], Call]] = [
        ("MoDo", modo(), torchjd_aggregation.MoDoWeighting()),
        ("SDMGrad", sdmgrad(), torchjd_aggregation.SDMGradWeighting()),
    ]
    for name, weighting, theirs in weightings:
        cross_state = weighting.init(m, dtype=dtype, device=device)
        out.append((name, _bind(weighting.update, cross_state), theirs, crosses, crosses))
    return out


class _bind:
    def __init__(self, update: Callable[..., Any], state: Any) -> None:
        self.update = update
        self.state = state

    def __call__(self, value: Any) -> Any:
        return self.update(value, self.state)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--n", type=int, default=4096, help="parameters (columns of J)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    lines = [
        f"n = {args.n}, {args.dtype}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats, backend {args.backend}",
        "",
        "| method | m | TorchJD | ours eager (×) | ours compiled (×) |",
        "|---|---|---|---|---|",
    ]
    for m in args.sizes:
        for name, ours, theirs, our_inputs, their_inputs in _methods(
            m, args.n, dtype, device, pool=4
        ):
            torch._dynamo.reset()
            compiled: Call = torch.compile(ours, fullgraph=True, backend=args.backend)
            with torch.no_grad():
                for _ in range(max(args.warmup, 1)):
                    for fn, values in [(theirs, their_inputs), (ours, our_inputs)]:
                        fn(values[0])
                    compiled(our_inputs[0])
                reference, eager, fast = _medians_ms(
                    [theirs, ours, compiled],
                    [their_inputs, our_inputs, our_inputs],
                    args.repeats,
                    device,
                )
            lines.append(
                f"| {name} | {m} | {reference:.3f} ms | {eager:.3f} ms ({reference / eager:.2f}×) "
                f"| {fast:.3f} ms ({reference / fast:.2f}×) |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print()
    print(text)
    return text


if __name__ == "__main__":
    main()
