"""The cost of a Gramian that requires grad: ``upgrad_weights`` detached (the default) next to
``differentiable=True`` (forward, and forward + backward), and the vmapped path.

Run from the repository root::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_differentiable            # m in {64, 128, 256}
    OMP_NUM_THREADS=1 python -m benchmarks.bench_differentiable --sizes 512 --repeats 3

Each configuration runs in a fresh subprocess, so that its peak resident memory (``ru_maxrss``,
minus the process's memory before the first call) is its own. The Gramian is ``J Jᵀ`` of a random
float32 ``J`` ``[m, 2m]`` that requires grad, as it does in a training step whose parameters do.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from torchjd_func.aggregation import upgrad_weights

MODES = ("detached", "differentiable", "differentiable+backward", "vmap detached")


def _run(m: int, mode: str, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(m)
    jacobian = torch.randn(m, 2 * m, generator=generator).requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gramian = jacobian @ jacobian.T
        if mode == "detached":
            upgrad_weights(gramian)
        elif mode == "differentiable":
            upgrad_weights(gramian, differentiable=True)
        elif mode == "differentiable+backward":
            weights = upgrad_weights(gramian, differentiable=True)
            torch.autograd.grad(weights.sum(), jacobian)
        else:
            torch.vmap(upgrad_weights)(gramian.unsqueeze(0))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_ms": 1e3 * statistics.median(times), "peak_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # m, mode: the subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_run(int(args.one[0]), args.one[1], args.repeats)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, CPU")
    print("| m | mode | median (ms) | peak RSS increase (MiB) |")
    print("|---|---|---|---|")
    for m in args.sizes:
        for mode in MODES:
            command = [sys.executable, "-m", "benchmarks.bench_differentiable"]
            command += ["--one", str(m), mode, "--repeats", str(args.repeats)]
            result = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
            print(f"| {m} | {mode} | {result['median_ms']:.1f} | {result['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
