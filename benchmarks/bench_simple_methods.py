"""Median time of the IMTL-G, Aligned-MTL, Krum and CR-MOGM weightings, next to TorchJD's.

Run from the repository root::

    python -m benchmarks.bench_simple_methods                 # m in {2, 8, 32}, CPU
    python -m benchmarks.bench_simple_methods --device cuda --repeats 50
    python -m benchmarks.bench_simple_methods --no-compile --threads 1

"ours eager" is the :class:`PureWeighting`'s ``update`` (kernel, checks and non-finite guard:
what a training step calls), "ours compiled" the same function under ``torch.compile(fullgraph=
True)``, "TorchJD" its class (``IMTLGWeighting()``, ...) called on the same Gramians. The state
of CR-MOGM (which wraps IMTL-G on both sides) is carried from call to call. Each timed call gets
one of ``--pool`` Gramians ``J Jᵀ`` of random ``J`` ``[m, 2m]``; CUDA is synchronised before the
clock is read. Prints a markdown table; the ratios are TorchJD's time over ours.
"""

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjd_func.aggregation import PureWeighting, aligned_mtl, crmogm, imtlg, krum

Fn = Callable[[Tensor], Tensor]


class _Carried:
    """``update`` as a function of the Gramian alone, its state carried from call to call."""

    def __init__(self, update: Callable[[Tensor, Any], tuple[Tensor, Any]], state: Any) -> None:
        self.update = update
        self.state = state

    def __call__(self, gramian: Tensor) -> Tensor:
        weights, self.state = self.update(gramian, self.state)
        return weights


def _methods(m: int) -> dict[str, tuple[PureWeighting[Any], Callable[[], Fn]] | None]:
    """``{name: (ours, a maker of TorchJD's)}``; ``None`` where the method does not apply."""

    def theirs(name: str, *args: Any, **kwargs: Any) -> Callable[[], Fn]:
        def make() -> Fn:
            import torchjd.aggregation as torchjd_aggregation

            weighting: Fn = getattr(torchjd_aggregation, name)(*args, **kwargs)
            return weighting

        return make

    def crmogm_theirs() -> Fn:
        import torchjd.aggregation as torchjd_aggregation

        weighting: Fn = torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.IMTLGWeighting())
        return weighting

    n_byzantine = max(0, (m - 3) // 4)
    return {
        "IMTL-G": (imtlg(), theirs("IMTLGWeighting")),
        "Aligned-MTL": (aligned_mtl(), theirs("AlignedMTLWeighting")),
        "Aligned-MTL median": (
            aligned_mtl(scale_mode="median"),
            theirs("AlignedMTLWeighting", scale_mode="median"),
        ),
        f"Krum f={n_byzantine}": (
            (krum(n_byzantine), theirs("KrumWeighting", n_byzantine)) if m >= 3 else None
        ),
        "CR-MOGM(IMTL-G)": (crmogm(imtlg()), crmogm_theirs),
    }


def _gramians(m: int, count: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(m)
    jacobians = [torch.randn(m, 2 * m, generator=gen, dtype=torch.float64) for _ in range(count)]
    return [(j @ j.T).to(device=device, dtype=dtype) for j in jacobians]


def _median_ms(fn: Fn, gramians: Sequence[Tensor], repeats: int, warmup: int) -> float:
    device = gramians[0].device
    for gramian in gramians[:warmup]:
        fn(gramian)
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


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per cell")
    parser.add_argument("--pool", type=int, default=8, help="distinct Gramians per size")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    has_torchjd = importlib.util.find_spec("torchjd") is not None
    torch._dynamo.config.recompile_limit = 64

    rows: dict[tuple[str, int], list[float | None]] = {}
    for m in args.sizes:
        gramians = _gramians(m, args.pool, dtype, device)
        for name, pair in _methods(m).items():
            if pair is None:
                continue
            ours = pair[0]
            state = ours.init(m, dtype=dtype, device=device)
            eager = _median_ms(_Carried(ours.update, state), gramians, args.repeats, args.warmup)
            compiled = None
            if not args.no_compile:
                torch._dynamo.reset()
                update = torch.compile(ours.update, fullgraph=True, dynamic=False)
                compiled = _median_ms(_Carried(update, state), gramians, args.repeats, args.warmup)
            rows[name, m] = [eager, compiled, None]
    # TorchJD last, as in bench_qp: once its dependencies are imported, torch's small LAPACK
    # calls were measured slower on the 2-core machine, which would bias our columns.
    if has_torchjd:
        for m in args.sizes:
            gramians = _gramians(m, args.pool, dtype, device)
            for name, pair in _methods(m).items():
                if pair is not None:
                    reference = pair[1]()
                    rows[name, m][2] = _median_ms(reference, gramians, args.repeats, args.warmup)

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def ratio(theirs: float | None, ours: float | None) -> str:
        return "-" if theirs is None or ours is None else f"{theirs / ours:.1f}×"

    lines = [
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, Gramian "
        f"{args.dtype}, median of {args.repeats} calls (ms)",
        "",
        "| method | m | ours eager | ours compiled | TorchJD | TorchJD / eager | "
        "TorchJD / compiled |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, m), (ours_ms, compiled_ms, theirs_ms) in rows.items():
        lines.append(
            f"| {name} | {m} | {cell(ours_ms)} | {cell(compiled_ms)} | {cell(theirs_ms)} | "
            f"{ratio(theirs_ms, ours_ms)} | {ratio(theirs_ms, compiled_ms)} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
