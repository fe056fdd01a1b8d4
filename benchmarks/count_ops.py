"""Operators dispatched per eager step: a device-independent proxy for GPU launch overhead.

Run from the repository root::

    python -m benchmarks.count_ops --configs mtl-m2 mtl-m32 iwrm-b32 --sizes 2 8 32 128

On a GPU, an eager step of a small model is bound by kernel launches and host overhead (about
17 µs per operator was seen on an H100 machine, `docs/benchmarks.md`), so the number of ATen
operators a step dispatches predicts its eager GPU time better than its FLOPs. This script counts
them on the CPU (a ``TorchDispatchMode`` sees every operator, views included) for the steps of
``bench_steps.py`` and for ``upgrad_weights`` alone, after two untimed calls, with the most
frequent operators of our steps.
"""

import argparse
import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_steps
from torchjd_func._qp import upgrad_weights


class _Counter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], object]) -> int:
    """The number of operators dispatched by the third call of ``fn``."""
    return sum(count_by_operator(fn).values())


def count_by_operator(fn: Callable[[], object]) -> collections.Counter[str]:
    """Operators dispatched by the third call of ``fn``, by name."""
    fn()
    fn()
    counter = _Counter()
    with counter:
        fn()
    return counter.counts


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--configs", nargs="+", choices=list(bench_steps.CONFIGS), default=["mtl-m2", "iwrm-b32"]
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--top", type=int, default=6, help="most frequent operators shown")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    lines = ["| step | SGD | ours (eager) | TorchJD | our most frequent |", "|---|---|---|---|---|"]
    for name in args.configs:
        config = bench_steps.CONFIGS[name]
        cells = []
        for method in ("sgd", "jd-eager", "torchjd"):
            if method == "torchjd" and bench_steps.torchjd_missing() is not None:
                cells.append("-")
                continue
            counts = count_by_operator(bench_steps.build(config, method, device, "inductor"))
            cells.append(str(sum(counts.values())))
            if method == "jd-eager":
                top = ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {top} |")
    lines += ["", "| UPGrad weights | operators |", "|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for m in args.sizes:
        jac = torch.randn(m, 2 * m, generator=gen)
        gramian = jac @ jac.T

        def weights(gramian: torch.Tensor = gramian) -> torch.Tensor:
            return upgrad_weights(gramian)

        lines.append(f"| m = {m} | {count(weights)} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
