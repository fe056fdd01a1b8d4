"""UPGrad weights of 4 Gramians at m = 128: a Python loop, one batched call, and torch.vmap.

Run as ``python -m benchmarks.bench_vmap_qp`` (one thread, float64; medians of 3 calls).
"""

import time
from collections.abc import Callable

import torch

from torchjd_func.aggregation import upgrad_weights


def _median_seconds(fn: Callable[[], object]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = 128
    jacobians = torch.randn(4, m, 256, dtype=torch.float64)
    gramians = jacobians @ jacobians.mT
    loop = _median_seconds(lambda: [upgrad_weights(g) for g in gramians])
    batched = _median_seconds(lambda: upgrad_weights(gramians))
    vmapped = _median_seconds(lambda: torch.vmap(upgrad_weights)(gramians))
    print(
        f"m={m}, 4 Gramians: loop {loop * 1e3:.0f} ms, batched {batched * 1e3:.0f} ms, "
        f"torch.vmap {vmapped * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
