"""Batched, torch-native solvers for the quadratic programs behind UPGrad, DualProj and MGDA.

All three aggregators reduce to one problem, the bound-constrained QP ``min ½yᵀGy + cᵀy s.t.
y ≥ 0``, i.e. the linear complementarity problem (LCP)

    ``y ≥ 0,  w = Gy + c ≥ 0,  yᵀw = 0``,

with one Gramian ``G`` ``[..., m, m]`` shared by ``k`` linear terms ``c`` ``[..., k, m]``:

* UPGrad (https://arxiv.org/abs/2406.16232): the dual-cone projection
  ``v = argmin vᵀG'v s.t. v ≥ u`` of each row ``u`` of ``diag(pref)`` is ``v = u + y`` with
  ``c = G'u`` (``k = m``); the weights are ``Σ_i v_i``.
* DualProj: the same projection of ``u = pref`` (``k = 1``).
* MGDA: ``min αᵀGα s.t. α ≥ 0, Σα = 1`` is the LCP with ``c = −1``, then ``α = y / Σy``.

Algorithm (details and measurements in ``docs/qp.md``): a primal-dual active-set method (PDAS,
i.e. semismooth Newton on ``min(y, w) = 0``) with a bounded number of iterations, best-iterate
tracking and an early exit once every problem has converged; each iteration solves, for every
problem, one linear system of size ``min(|F|, |A|) ≤ m // 2`` (the free set ``F`` through ``G``, or
the active set ``A`` through ``G⁻¹``), gathered into one batched factorisation. Then, only for
problems that have not converged (PDAS can cycle), a Mehrotra predictor-corrector interior-point
method followed by a few PDAS "polish" steps, selected with :func:`torch.cond`. Everything runs in
float64 on the input's device with bounded trip counts (no ``.item()``, no numpy), so the solvers
compile with ``torch.compile(fullgraph=True)`` and work under :func:`torch.vmap`. (On CPUs, for
``128 ≤ m ≤ 256``, the problems that the warm start did not help first run PDAS in float32 to a
loose tolerance, which only chooses the float64 PDAS's starting point.)
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from torchjd_func._torch_compat import is_batchedtensor, scan, while_loop

__all__ = [
    "check_eps",
    "check_pref",
    "dual_cone_projection",
    "dualproj_weights",
    "mgda_weights",
    "normalize_regularize",
    "solve_box_qp",
    "upgrad_weights",
]

# Float32 solves lose about four digits on these problems (κ up to ~1e4 after the
# regularisation; 1.5e-4 relative error of UPGrad's weights was measured), so every solve runs
# in float64 and only the result is cast back.
_SOLVE_DTYPE = torch.float64
_EPS = torch.finfo(_SOLVE_DTYPE).eps
_CHUNK_BYTES = 256 * 2**20
"""Largest batch of gathered float64 systems factored at once by the PDAS steps."""
_ENUMERATE_MAX = 6
"""Up to this m, every active set is tried (2^m candidates; measured faster than PDAS eagerly on
CPU up to m = 7, and compiled up to m = 6; at m = 8 the 2^m systems start to cost more flops
than PDAS saves)."""
_ENUMERATE_MAX_CUDA = 8
"""The same bound on CUDA devices, where the 256 systems of m = 8 are a few small batched kernels
and, unlike PDAS, the enumeration never synchronises with the host (PDAS reads one boolean per
iteration, and its compiled loop and fallback run on the host). Chosen from operator counts and
the absence of host synchronisation, not from GPU timings (none yet for m = 7, 8)."""
_JACOBI_SWEEPS = 20
_JACOBI_DAMPING = 0.67
"""Their step, relative to ``1 / diag(G)`` (0.5, 0.67 and 0.8 did about equally well on the test
families; 0.67 measured 10-20% faster than 0.5 at m = 128)."""
"""Damped projected Jacobi sweeps that choose PDAS's starting point (:func:`_jacobi_start`)."""
_COMPILED_LOOP: Literal["while_loop", "unroll"] = "while_loop"
"""How PDAS loops under torch.compile: a ``while_loop`` that stops once every problem has
converged (its predicate is read on the host at each iteration), or ``pdas_iters`` unrolled steps
(no host read, more work). A knob for measurements on GPUs (``benchmarks/probe_cuda_qp.py``)."""
_FLOAT32_STAGE_MIN = 128
_FLOAT32_STAGE_MAX = 256
"""On CPUs, for m in this range, problems that the Jacobi sweeps did not help (every problem on
the per-sample Gramians of an MLP, whose gradients are nearly colinear) first run PDAS in float32
to ``_FLOAT32_RTOL`` (:func:`_float32_stage`): LAPACK's float32 factorisations, gathers and
copies cost less, and the float64 PDAS then usually needs one step. Measured with one thread on
IWRM Gramians: 8-26% less time eagerly at m = 128 and 256, ~10% compiled at m = 128 (solve
alone); slower at m = 64, and compiled at m = 512, where the float64 PDAS after it still takes
one full step and the compiled loops cannot skip converged problems (docs/qp.md). The values are
those of the float64 PDAS alone (tested)."""
_FLOAT32_RTOL = 1e-3
"""Float32 reaches ~1e-6 on these problems, but not on every one beyond m = 256 (rounding makes
a few cycle): a loose tolerance ends the stage as soon as the active sets are about right."""
_FLOAT32_ITERS = 5
"""At most this many float32 steps (4 sufficed at m = 128 and 256 on IWRM Gramians), which
bounds the time lost where float32 cannot converge (e.g. an unregularised, ill-conditioned G)."""
_COMPACT_ELEMENTS = 2**16
"""Eagerly, PDAS steps gather only the unconverged problems when all the systems together hold at
least this many elements (e.g. k = m ≥ 64)."""


def _tiny(x: Tensor) -> float:
    """Smallest positive normal number of ``x``'s dtype, a guard against division by zero."""
    # Not a module-level float: under torch.compile(dynamic=True) dynamo turns global floats into
    # symbolic inputs, which the scans of the fallback cannot take.
    return torch.finfo(x.dtype).tiny


def check_eps(value: object, name: str, *, positive: bool = False) -> float:
    """Checks a finite, non-negative (or positive) float hyperparameter and returns it.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is negative (or zero with ``positive``), NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}.")
    # Comparisons rather than math.isfinite, which symbolic floats (torch.compile(dynamic=True))
    # do not support.
    if value != value or value == math.inf or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"`{name}` must be a finite {kind} float, got {value}.")
    return float(value)


def _check_floating(gramian: object) -> Tensor:
    if not isinstance(gramian, Tensor) or not gramian.is_floating_point():
        kind = gramian.dtype if isinstance(gramian, Tensor) else type(gramian).__name__
        raise TypeError(f"Expected a floating-point Gramian Tensor [..., m, m], got {kind}.")
    return gramian


def _min_eigenvalue(sym: Tensor) -> Tensor:
    """Smallest eigenvalue ``[...]`` of symmetric ``[..., m, m]`` (closed form for ``m ≤ 2``)."""
    m = sym.shape[-1]
    if m == 1:
        return sym[..., 0, 0]
    if m == 2:
        a, b, d = sym[..., 0, 0], sym[..., 0, 1], sym[..., 1, 1]
        return 0.5 * (a + d) - torch.hypot(0.5 * (a - d), b)
    eigenvalues: Tensor = torch.linalg.eigvalsh(sym)
    return eigenvalues[..., 0]


def _screen(gramian: Tensor, *, differentiable: bool) -> Tensor:
    """The float64 Gramian the kernels solve with, or NaN for a Gramian they must reject.

    Rounding makes a computed Gramian ``J Jᵀ`` slightly non-symmetric or indefinite (float32
    Gramians of two nearly opposite gradients have eigenvalues down to ~−2e-8·tr(G)). With
    ``τ = √eps`` of ``gramian``'s dtype, relative to ``t = max(tr(G), 0)``:

    * any NaN or ±Inf entry, ``max|G − Gᵀ| > τ·t``, or ``λ_min(sym G) < −τ·t``: all NaN (only for
      that Gramian of the batch);
    * otherwise the symmetric part ``(G + Gᵀ)/2``, shifted by ``max(0, −λ_min)·I``: the
      smallest diagonal shift that makes it PSD (no change for a PSD input), so rounding-level
      indefiniteness gets the answer of a PSD Gramian.

    Element-wise selections only (no host synchronisation). Detached unless ``differentiable``;
    the screening itself is never differentiated.
    """
    g = (gramian if differentiable else gramian.detach()).to(_SOLVE_DTYPE)
    tolerance = math.sqrt(torch.finfo(gramian.dtype).eps)
    with torch.no_grad():
        x = g.detach()
        finite = x.isfinite().all(dim=-1).all(dim=-1)
        x = torch.where(finite[..., None, None], x, torch.zeros_like(x))
        scale = tolerance * x.diagonal(dim1=-2, dim2=-1).sum(dim=-1).clamp_min(0.0)
        asymmetry = (x - x.mT).abs().amax(dim=-1).amax(dim=-1)
        smallest = _min_eigenvalue(0.5 * (x + x.mT))
        rejected = ~finite | (asymmetry > scale) | (smallest < -scale)
        shift = (-smallest).clamp_min(0.0)
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    screened = 0.5 * (g + g.mT) + shift[..., None, None] * eye
    return torch.where(rejected[..., None, None], torch.full_like(screened, torch.nan), screened)


def normalize_regularize(
    gramian: Tensor, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> Tensor:
    """TorchJD's normalisation and regularisation of Gramians: ``G / tr(G) + reg_eps·I``.

    A Gramian whose trace is below ``norm_eps`` (or not positive) is replaced by zeros before the
    regularisation, like TorchJD's ``normalize`` (selected with :func:`torch.where`: no host
    synchronisation). Afterwards the eigenvalues of a PSD input lie in ``[reg_eps, 1 + reg_eps]``,
    whatever the scale of the gradients.

    Args:
        gramian: PSD matrices ``[..., m, m]``.
        norm_eps: Traces below this value count as zero.
        reg_eps: Added to the diagonal after the normalisation.

    Returns:
        A Tensor ``[..., m, m]`` of the dtype and device of ``gramian``. A NaN or ±Inf entry
        makes the whole matrix NaN.

    Example:
        >>> import torch
        >>> normalize_regularize(torch.tensor([[3.0, 1.0], [1.0, 1.0]]), reg_eps=0.0)
        tensor([[0.7500, 0.2500],
                [0.2500, 0.2500]])
    """
    trace = gramian.diagonal(dim1=-2, dim2=-1).sum(dim=-1)[..., None, None]
    # `trace <= 0` keeps a zero Gramian finite when norm_eps = 0 (TorchJD would divide 0 by 0).
    negligible = (trace < norm_eps) | (trace <= 0)
    # Dividing by 1 where the trace is negligible keeps the unselected branch (and its gradient)
    # finite.
    safe_trace = torch.where(negligible, torch.ones_like(trace), trace)
    normalized = torch.where(negligible, torch.zeros_like(gramian), gramian / safe_trace)
    # Without this, a −Inf diagonal (trace −Inf, "negligible") would become a zero Gramian.
    finite = gramian.isfinite().all(dim=-1).all(dim=-1)[..., None, None]
    normalized = torch.where(finite, normalized, torch.full_like(normalized, torch.nan))
    eye = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    return normalized + reg_eps * eye


def _residual(gramian: Tensor, c: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Slack ``w = Gy + c`` ``[..., k, m]`` and relative natural residual ``[..., k]``.

    The natural residual ``‖min(y, w)‖∞`` is zero exactly at the solution. It is divided by
    ``‖c‖∞ + max_i Σ_j |G_ij y_j|``, the magnitude of the terms of ``w``, which bounds its rounding
    error: so a tolerance means the same for every scale of ``G``, ``c`` and ``y``.
    """
    w = y @ gramian + c
    natural = torch.minimum(y, w).abs().amax(dim=-1)
    scale = c.abs().amax(dim=-1) + (y.abs() @ gramian.abs()).amax(dim=-1)
    return w, natural / scale.clamp_min(_tiny(scale))


def _cholesky(matrices: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` ``[..., m, m]`` (``A = UᵀU``), without raising on failure.

    (The upper factor measured ~7% faster than the lower one on CPU for ``[128, 128, 128]``.)
    """
    factor: Tensor = torch.linalg.cholesky_ex(matrices, upper=True)[0]
    return factor


def _cholesky_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``A⁻¹ rhs`` for ``A = UᵀU``, U ``[..., m, m]``, rhs ``[..., m]``.

    Two triangular solves rather than ``torch.cholesky_solve``, which cannot be captured in CUDA
    graphs.
    """
    half = torch.linalg.solve_triangular(factor.mT, rhs[..., None], upper=False)
    solution: Tensor = torch.linalg.solve_triangular(factor, half, upper=True)
    return solution[..., 0]


def _masked_solve(gramian: Tensor, c: Tensor, free: Tensor, rows: Tensor | None = None) -> Tensor:
    """Solve ``G_FF y_F = −c_F``, ``y = 0`` off F, for the free set F of each row.

    Args:
        gramian: ``[..., m, m]``.
        c: ``[..., k, m]``.
        free: Boolean mask of the free sets ``[..., k, m]``.
        rows: Ignored (every problem is solved); for the signature of :data:`Solve`.

    Returns:
        ``[..., k, m]``.
    """
    # D G D + (I − D) is positive definite whenever G is, and keeps every row's system the same
    # size, so that the k systems are one batched factorisation. Off F its rows are those of I,
    # decoupled from F, so the solve is right on F whatever the right-hand side is off F.
    both_free = free[..., :, None] & free[..., None, :]
    # diag_embed rather than torch.eye(m): no Python int from a shape in the fallback branch,
    # which torch.cond would lift to an operand, and which its vmap rule rejects.
    bound = torch.diag_embed((~free).to(c.dtype))
    system = torch.where(both_free, gramian[..., None, :, :], bound)
    return torch.where(free, _cholesky_solve(_cholesky(system), -c), torch.zeros_like(c))


def _inverse(gramian: Tensor) -> Tensor:
    """``G⁻¹`` ``[..., m, m]`` of a positive definite ``G``, symmetric by construction.

    ``G = UᵀU`` gives ``G⁻¹ = U⁻¹U⁻ᵀ``: one Cholesky factorisation, one triangular solve and one
    product (all capturable in CUDA graphs, unlike ``torch.cholesky_inverse``).
    """
    factor = _cholesky(gramian)
    eye = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    inverse_factor = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=True)
    inverse: Tensor = inverse_factor @ inverse_factor.mT
    return inverse


def _padded_pair(gramian: Tensor, inverse: Tensor) -> Tensor:
    """``[blockdiag(G⁻¹, I), blockdiag(G, I)]`` for every Gramian, all flattened: ``[B·8m²]``.

    :func:`_reduced_solve` reads its systems from here by flat index: index ``m + j`` addresses
    the identity block, which pads every system to the same size without a :func:`torch.where`.
    """
    m = gramian.shape[-1]
    zeros = torch.zeros_like(gramian)
    eye = torch.eye(m, dtype=gramian.dtype, device=gramian.device).expand_as(gramian)
    bottom = torch.cat([zeros, eye], dim=-1)
    blocks = [
        torch.cat([torch.cat([x, zeros], dim=-1), bottom], dim=-2) for x in (inverse, gramian)
    ]
    return torch.stack(blocks, dim=-3).reshape(-1)


def _gathered_solve(pair: Tensor, row_offset: Tensor, column: Tensor, rhs: Tensor) -> Tensor:
    """Gather the systems ``pair[row_offset_i + column_j]`` ``[..., cap, cap]`` and solve them."""
    # int64 offsets: an int32 index was converted inside the gather (3× slower in isolation,
    # 3-4% of the whole solve at m = 128 with page faults tuned away, ~10% without).
    systems = torch.take(pair, row_offset[..., :, None] + column[..., None, :])
    if systems.device.type == "cpu":
        # LAPACK's batched LU measured 15-30% faster than its Cholesky here (which also clears a
        # triangle); on CUDA, Cholesky + triangular solves can be captured in CUDA graphs. The
        # systems are symmetric: their transposed view is the column-major copy LAPACK wants.
        solution: Tensor = torch.linalg.solve_ex(systems.mT, rhs)[0]
        return solution
    return _cholesky_solve(_cholesky(systems), rhs)


def _reduced_solve(
    gramian: Tensor,
    inverse: Tensor,
    pair: Tensor,
    c: Tensor,
    free: Tensor,
    rows: Tensor | None = None,
) -> Tensor:
    """:func:`_masked_solve` through systems of size at most ``m // 2`` instead of ``m``.

    With ``A`` the complement of the free set ``F`` and ``H = G⁻¹``, the solution of
    ``G_FF y_F = −c_F`` (``y_A = 0``) is ``y = H r`` with ``r_F = −c_F`` and ``r_A = s`` such that
    ``(H r)_A = 0``, i.e. ``H_AA s = H_AF c_F`` (block elimination: ``G_FF⁻¹ = H_FF −
    H_FA H_AA⁻¹ H_AF``). So each problem solves either with ``G_FF`` (when ``|F| ≤ |A|``) or with
    ``H_AA``, a system of size ``min(|F|, |A|) ≤ m // 2``: the k systems are gathered into one
    ``[..., k, m // 2, m // 2]`` batch (padded with identity), an eighth of the flops of the masked
    ``[..., k, m, m]`` factorisation. The ``H`` route multiplies rounding errors by up to
    ``κ(G)``, which the convergence test of the caller catches (``κ ≤ ~1e4`` after
    :func:`normalize_regularize`).

    Args:
        gramian: ``G`` ``[..., m, m]``, positive definite.
        inverse: ``G⁻¹`` ``[..., m, m]``.
        pair: :func:`_padded_pair` of both.
        c: ``[..., k, m]``.
        free: Boolean mask of the free sets ``[..., k, m]``.
        rows: Optional boolean mask ``[..., k]``: only these problems are solved (the others get
            an arbitrary finite result). Eager only (data-dependent shapes).

    Returns:
        ``[..., k, m]``.
    """
    m = gramian.shape[-1]
    cap = max(m // 2, 1)
    n_free = free.sum(dim=-1, keepdim=True)
    use_gramian = 2 * n_free <= m
    solved = torch.where(use_gramian, free, ~free)
    n_solved = torch.where(use_gramian, n_free, m - n_free)
    # A stable partition of 0..m-1, the solved set first: position of each index, then inverted.
    position = torch.where(
        solved, solved.cumsum(dim=-1) - 1, n_solved + (~solved).cumsum(dim=-1) - 1
    )
    ordinal = torch.arange(m, device=c.device).expand_as(position)
    order = torch.zeros_like(position).scatter(-1, position, ordinal)[..., :cap]
    slots = torch.arange(cap, device=c.device)
    index = torch.where(slots < n_solved, order, m + slots)

    c_free = torch.where(free, c, torch.zeros_like(c))
    rhs = torch.where(use_gramian, -c, c_free @ inverse)
    rhs = torch.cat([rhs, torch.zeros_like(rhs[..., :cap])], dim=-1).gather(-1, index)
    # Flat offsets into `pair`: the Gramian's block of 8m², then H (route A) or G (route F), then
    # the row.
    batch = torch.arange(c.shape[:-2].numel(), device=c.device).reshape(*c.shape[:-2], 1, 1)
    row_offset = batch * (8 * m * m) + use_gramian.long() * (4 * m * m) + index * (2 * m)
    column = index
    if rows is not None:
        row_offset, column, rhs = row_offset[rows], column[rows], rhs[rows]
    n_systems = rhs.shape[:-1].numel()
    if n_systems * cap * cap * 8 <= _CHUNK_BYTES:
        solution = _gathered_solve(pair, row_offset, column, rhs)
    else:
        # Bounded memory for large m (k = m = 1024: 2 GiB of systems at once otherwise).
        flat = [t.reshape(-1, cap) for t in (row_offset, column, rhs)]
        chunk = max(1, _CHUNK_BYTES // (8 * cap * cap))
        parts = [
            _gathered_solve(pair, *(t[start : start + chunk] for t in flat))
            for start in range(0, n_systems, chunk)
        ]
        solution = torch.cat(parts).reshape(rhs.shape)
    if rows is not None:
        solution = torch.zeros_like(index, dtype=c.dtype).index_put((rows,), solution)
    scattered = c.new_zeros((*c.shape[:-1], m + cap)).scatter(-1, index, solution)[..., :m]
    y = torch.where(use_gramian, scattered, (scattered - c_free) @ inverse)
    return torch.where(free, y, torch.zeros_like(y))


Solve = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``solve(c, free, rows) -> y``: ``G_FF y_F = −c_F``, ``y = 0`` off F (see :func:`_reduced_solve`)."""


def _reduced_solver(gramian: Tensor) -> Solve:
    """:func:`_reduced_solve` bound to ``G``, its inverse and their padded pair."""
    inverse = _inverse(gramian)
    return partial(_reduced_solve, gramian, inverse, _padded_pair(gramian, inverse))


def _repeat(
    step: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]],
    carry: tuple[Tensor, ...],
    iters: int,
    *,
    unroll: bool,
) -> tuple[Tensor, ...]:
    """Apply ``step`` ``iters`` times, unrolled or as one :func:`scan`.

    Unrolled is the cheapest eagerly. A scan is traced once instead of ``iters`` times, which
    divides the time dynamo takes to trace the fallback (on the first call of each input
    signature, even eagerly, since :func:`torch.cond` traces its branches) and the time inductor
    takes to compile it, by about three.
    """
    if unroll or iters == 0:
        for _ in range(iters):
            carry = step(carry)
        return carry

    def body(state: tuple[Tensor, ...], _: Tensor) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        # A scan's carry may not alias its inputs.
        return tuple(t.clone() for t in step(state)), []

    ticks = torch.zeros(iters, device=carry[0].device)
    final, _ = scan(body, tuple(t.clone() for t in carry), ticks)
    return tuple(final)


def _pdas_step(
    gramian: Tensor,
    c: Tensor,
    solve: Solve,
    rtol: Tensor,
    carry: tuple[Tensor, ...],
    *,
    compact: bool = False,
) -> tuple[Tensor, ...]:
    """One PDAS step on ``(y, w, best_y, best_res)``; problems already converged stay frozen.

    With ``compact`` (eager only), only the unconverged problems are solved.
    """
    y, w, best_y, best_res = carry
    # Newton on min(y, w) = 0: where w < y the equation is w_i = 0 (free), elsewhere y_i = 0.
    y = solve(c, y > w, best_res > rtol if compact else None)
    w, res = _residual(gramian, c, y)
    # PDAS can cycle (for P-matrices of order ≥ 3), so the last iterate is not always the best
    # one; a NaN residual (failed factorisation) never compares as better. A converged problem
    # keeps its iterate bit for bit, so that stopping early changes nothing.
    better = (res < best_res) & (best_res > rtol)
    best_y = torch.where(better[..., None], y, best_y)
    best_res = torch.where(better, res, best_res)
    return y, w, best_y, best_res


def _pdas(
    gramian: Tensor,
    c: Tensor,
    y: Tensor,
    w: Tensor,
    best_y: Tensor,
    best_res: Tensor,
    iters: int,
    *,
    solve: Solve,
    rtol: Tensor,
    loop: Literal["unroll", "scan", "early_exit"],
) -> tuple[Tensor, Tensor]:
    """``iters`` PDAS steps from ``(y, w)``; returns the best iterate seen and its residual.

    ``rtol`` ``[..., k]``: the tolerance of each problem, a tensor because under
    ``torch.compile(dynamic=True)`` a float becomes a symbolic value, which the bodies of scan,
    while_loop and cond cannot take. ``loop``: ``"unroll"`` (a Python loop of fixed length), ``"scan"`` (one
    :func:`torch._higher_order_ops.scan`), or ``"early_exit"``: stop as soon as every problem has
    converged (residual ≤ ``rtol``); a Python loop eagerly, reading one boolean per iteration, and a
    :func:`torch._higher_order_ops.while_loop` under :func:`torch.compile`. All three give the same
    values, because converged problems are frozen.
    """
    step = partial(_pdas_step, gramian, c, solve, rtol)
    carry: tuple[Tensor, ...] = (y, w, best_y, best_res)
    compiling = torch.compiler.is_compiling()
    if loop != "early_exit" or (compiling and _COMPILED_LOOP == "unroll"):
        carry = _repeat(step, carry, iters, unroll=loop != "scan")
    elif compiling:

        def unfinished(count: Tensor, *state: Tensor) -> Tensor:
            return (count < iters) & (state[3] > rtol).any()

        def body(count: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
            # A while_loop's outputs may not alias its inputs.
            return (count + 1, *(t.clone() for t in step(state)))

        count = torch.zeros((), dtype=torch.long, device=c.device)
        # Cloned: the initial carry holds the same tensor twice (y and best_y).
        start = (count, *(t.clone() for t in carry))
        # (while_loop is not annotated in torch 2.13.)
        carry = tuple(while_loop(unfinished, body, start)[1:])  # type: ignore[no-untyped-call]
    else:
        # Skipping the converged problems pays off only for large systems (it costs a few
        # indexing operations per iteration).
        compact = c.shape[:-1].numel() * max(c.shape[-1] // 2, 1) ** 2 >= _COMPACT_ELEMENTS
        for _ in range(iters):
            if bool((carry[3] <= rtol).all()):
                break
            carry = step(carry, compact=compact)
    return carry[2], carry[3]


def _step_to_boundary(x: Tensor, dx: Tensor) -> Tensor:
    """Largest ``α`` with ``x + α·dx ≥ 0`` per row, ``[..., k, 1]`` (huge where ``dx ≥ 0``)."""
    return (x / (-dx).clamp_min(_tiny(dx))).amin(dim=-1, keepdim=True)


def _ipm(gramian: Tensor, c: Tensor, iters: int, *, unroll: bool) -> Tensor:
    """Mehrotra predictor-corrector for ``y, z > 0``, ``z = Gy + c``, ``yᵀz → 0``.

    Each iteration factors ``G + diag(z/y)`` once, for two solves (predictor and corrector). A
    row whose step would give a non-finite or non-positive iterate is frozen.

    Returns:
        The last interior iterate ``y`` ``[..., k, m]``.
    """

    def step(carry: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        y, z = carry
        primal = y @ gramian + c - z
        mu = (y * z).mean(dim=-1, keepdim=True)
        factor = _cholesky(gramian[..., None, :, :] + torch.diag_embed(z / y))
        # Substituting dz = G dy + primal into Z dy + Y dz = rhs: (G + Z/Y) dy = rhs/Y − primal.
        dy_aff = _cholesky_solve(factor, -z - primal)
        dz_aff = dy_aff @ gramian + primal
        alpha_aff = torch.minimum(
            _step_to_boundary(y, dy_aff), _step_to_boundary(z, dz_aff)
        ).clamp_max(1.0)
        mu_aff = ((y + alpha_aff * dy_aff) * (z + alpha_aff * dz_aff)).mean(dim=-1, keepdim=True)
        sigma = (mu_aff / mu.clamp_min(_tiny(mu))).clamp(0.0, 1.0) ** 3
        dy = _cholesky_solve(factor, -z - primal + (sigma * mu - dy_aff * dz_aff) / y)
        dz = dy @ gramian + primal
        to_boundary = torch.minimum(_step_to_boundary(y, dy), _step_to_boundary(z, dz))
        # 0.99 of the step to the boundary left a few hard problems unconverged, 0.995 none.
        alpha = (0.995 * to_boundary).clamp_max(1.0)
        new_y = y + alpha * dy
        new_z = z + alpha * dz
        interior = (new_y > 0) & (new_z > 0) & new_y.isfinite() & new_z.isfinite()
        ok = interior.all(dim=-1, keepdim=True)
        return torch.where(ok, new_y, y), torch.where(ok, new_z, z)

    y = torch.ones_like(c)
    # The LCP is homogeneous in c (y and z scale with it): starting z at the scale of c saves
    # about five iterations on badly scaled problems (gradient norms 1e±4 apart) and changes
    # nothing when ‖c‖∞ ≈ 1.
    z = c.abs().amax(dim=-1, keepdim=True).clamp_min(_tiny(c)).expand_as(c).clone()
    y, _ = _repeat(step, (y, z), iters, unroll=unroll)
    return y


def _enumerate_small(gramian: Tensor, c: Tensor) -> Tensor:
    """Exact LCP solution for ``m ≤ 2``: every active set in closed form, the best one kept.

    The candidates (``y = 0``; each coordinate alone, ``y_i = −c_i / G_ii``; both, by Cramer's
    rule) are compared by their natural residual (non-finite ones never win): a handful of
    element-wise operations instead of the PDAS machinery, which matters for two-task MTL steps.
    """
    zero = torch.zeros_like(c[..., 0])
    diagonal = gramian.diagonal(dim1=-2, dim2=-1)[..., None, :]  # [..., 1, m]
    alone = -c / diagonal
    if gramian.shape[-1] == 1:
        options = [zero[..., None], alone]
    else:
        a, d = diagonal[..., 0], diagonal[..., 1]
        b = gramian[..., 0, 1, None]
        c1, c2 = c[..., 0], c[..., 1]
        det = a * d - b * b
        both = torch.stack([(b * c2 - d * c1) / det, (b * c1 - a * c2) / det], dim=-1)
        options = [
            torch.stack([zero, zero], dim=-1),
            torch.stack([alone[..., 0], zero], dim=-1),
            torch.stack([zero, alone[..., 1]], dim=-1),
            both,
        ]
    candidates = torch.stack(options, dim=-2)  # [..., k, 2^m, m]
    _, res = _residual(gramian[..., None, :, :], c[..., None, :], candidates)
    res = torch.where(res.isnan(), torch.full_like(res, torch.inf), res)
    best = res.argmin(dim=-1)[..., None, None].expand(*candidates.shape[:-2], 1, c.shape[-1])
    return candidates.gather(-2, best)[..., 0, :]


def _enumerate_all(gramian: Tensor, c: Tensor) -> Tensor:
    """Exact LCP solution for small ``m``: all ``2^m`` free sets solved at once, the best kept.

    One batched Cholesky factorisation of the ``2^m`` masked matrices ``D G D + (I − D)`` (shared
    by the ``k`` problems), two triangular solves, and the candidate with the smallest natural
    residual per problem (a failed factorisation gives a non-finite candidate, which never wins).
    A fixed, small number of operations: cheaper than PDAS for small ``m``, eagerly and on GPUs.
    """
    m = gramian.shape[-1]
    codes = torch.arange(2**m, device=c.device)
    free = ((codes[:, None] >> torch.arange(m, device=c.device)) & 1).bool()  # [S, m]
    both = free[:, :, None] & free[:, None, :]
    bound = torch.diag_embed((~free).to(c.dtype))
    factor = _cholesky(torch.where(both, gramian[..., None, :, :], bound))  # [..., S, m, m]
    rhs = torch.where(free[:, None, :], -c[..., None, :, :], torch.zeros_like(c[..., None, :, :]))
    half = torch.linalg.solve_triangular(factor.mT, rhs.mT, upper=False)
    y = torch.linalg.solve_triangular(factor, half, upper=True).mT  # [..., S, k, m]
    y = torch.where(free[:, None, :], y, torch.zeros_like(y))
    _, res = _residual(gramian[..., None, :, :], c[..., None, :, :], y)  # [..., S, k]
    res = torch.where(res.isnan(), torch.full_like(res, torch.inf), res)
    best = res.argmin(dim=-2)[..., None, :, None].expand(*y.shape[:-3], 1, *y.shape[-2:])
    return y.gather(-3, best)[..., 0, :, :]


def _keep(
    gramian: Tensor, c: Tensor, y: Tensor, res: Tensor, converged: Tensor, rtol: Tensor
) -> Tensor:
    """The :func:`torch.cond` branch taken when every problem has converged."""
    # A cond branch may not return one of its inputs.
    return y.clone()


def _fallback(
    gramian: Tensor,
    c: Tensor,
    y: Tensor,
    res: Tensor,
    converged: Tensor,
    rtol: Tensor,
    *,
    ipm_iters: int,
    polish_iters: int,
    unroll: bool,
) -> Tensor:
    """Interior point + PDAS polish; replaces the unconverged rows of ``y`` where it does better.

    The polish solves the full masked systems (:func:`_masked_solve`), which stay accurate on
    ill-conditioned Gramians where the reduced solve of the main loop may lose digits.
    """
    ipm_y = _ipm(gramian, c, ipm_iters, unroll=unroll)
    ipm_w, ipm_res = _residual(gramian, c, ipm_y)
    polished, polished_res = _pdas(
        gramian,
        c,
        ipm_y,
        ipm_w,
        ipm_y,
        ipm_res,
        polish_iters,
        solve=partial(_masked_solve, gramian),
        rtol=rtol,
        loop="unroll" if unroll else "scan",
    )
    # Converged rows are kept bit for bit, so "cond" and "always" (and vmap, which runs both
    # branches of a batched cond) agree exactly.
    better = (polished_res < res) & ~converged
    return torch.where(better[..., None], polished, y)


def _jacobi_start(gramian: Tensor, c: Tensor, sweeps: int) -> tuple[Tensor, Tensor]:
    """A starting point for PDAS: ``sweeps`` damped projected Jacobi steps from ``y = 0``.

    ``y ← max(0, y − ω (Gy + c) / diag(G))``, ``ω = 0.67``: one product with ``G`` per sweep for all
    problems.
    Only the free set of the result matters to PDAS (its first step re-solves from it). On
    Gramians of random gradients it identifies most of the active set, which divided the rows
    PDAS had to solve by ~4 at m = 128 (``docs/qp.md``); where it does not help it costs the
    sweeps only. Problems whose objective ``½yᵀGy + cᵀy`` did not decrease below that of ``y = 0``
    (the damped iteration can diverge when the gradients are nearly colinear) start from 0.

    Returns:
        The starting points ``[..., k, m]``, and which problems start from the sweeps rather than
        from 0 ``[..., k]``.
    """
    # In float32: only the free set matters, and the products cost half.
    g32, c32 = gramian.float(), c.float()
    step = -_JACOBI_DAMPING / g32.diagonal(dim1=-2, dim2=-1)[..., None, :]
    y = torch.zeros_like(c32)
    for _ in range(sweeps):
        y = torch.addcmul(y, y @ g32 + c32, step).clamp_min(0.0)
    objective = (y * (0.5 * (y @ g32) + c32)).sum(dim=-1, keepdim=True)
    accepted = objective < 0
    return torch.where(accepted, y, torch.zeros_like(y)).to(c.dtype), accepted[..., 0]


def _no_stage(
    gramian: Tensor, c: Tensor, y0: Tensor, w0: Tensor, res0: Tensor, accepted: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The :func:`torch.cond` branch without :func:`_float32_stage`: ``y0``, its slack and
    residual."""
    # A cond branch may not return one of its inputs.
    return y0.clone(), w0.clone(), res0.clone()


def _float32_stage(
    gramian: Tensor,
    c: Tensor,
    y0: Tensor,
    w0: Tensor,
    res0: Tensor,
    accepted: Tensor,
    *,
    iters: int,
    loop: Literal["unroll", "early_exit"],
) -> tuple[Tensor, Tensor, Tensor]:
    """PDAS in float32 to a loose tolerance, for the problems that the Jacobi sweeps did not help
    (``~accepted``); the others keep ``y0``. A cheaper identification of the active sets, whose
    result starts the float64 PDAS (returns its ``y, w, residual`` in float64; ``w0`` and
    ``res0``, those of ``y0``, are unused: :func:`_no_stage` takes the same operands)."""
    g32, c32 = gramian.float(), c.float()
    reduced = _reduced_solver(g32)
    w32, _ = _residual(g32, c32, y0.float())
    # Problems started from the sweeps count as converged here: they are frozen at y0. So are
    # those whose Gramian float32 cannot factor (nearly singular: it would only yield NaN).
    factored = torch.linalg.cholesky_ex(g32)[1] == 0
    frozen = accepted | ~factored[..., None]
    unsolved = torch.where(frozen, 0.0, torch.inf).to(c32.dtype)
    tolerance = torch.full_like(unsolved, _FLOAT32_RTOL)
    y32, _ = _pdas(
        g32,
        c32,
        y0.float(),
        w32,
        y0.float(),
        unsolved,
        min(iters, _FLOAT32_ITERS),
        solve=reduced,
        rtol=tolerance,
        loop=loop,
    )
    y = y32.to(c.dtype)
    w, res = _residual(gramian, c, y)
    return y, w, res


def _search(
    g_search: Tensor,
    c_search: Tensor,
    pdas_iters: int,
    ipm_iters: int,
    polish_iters: int,
    rtol: float,
    fallback: str,
) -> Tensor:
    """PDAS, then the fallback where needed (see :func:`solve_box_qp`), without autograd."""
    with torch.no_grad():
        y0, accepted = _jacobi_start(g_search, c_search, _JACOBI_SWEEPS)
        w0, res0 = _residual(g_search, c_search, y0)
        tolerance = torch.full_like(res0, rtol)
        # Under vmap the convergence test is batched: there is no early exit, and torch.cond
        # would run both branches and select (its batching rule), so running the fallback
        # directly gives the same values. It also avoids that rule, which rejects the SymInt
        # operands of dynamic shapes, and the scans, whose batching rule fails on symbolic sizes
        # under torch.compile (torch 2.13).
        vmapped = is_batchedtensor(res0)
        loop: Literal["unroll", "early_exit"] = (
            "unroll" if fallback == "always" or vmapped else "early_exit"
        )
        if (
            g_search.device.type == "cpu"
            and _FLOAT32_STAGE_MIN <= g_search.shape[-1] <= _FLOAT32_STAGE_MAX
        ):
            # With the early exit, skipped when the sweeps helped every problem (one more host
            # read): compiled, its set-up alone measured ~25% of the solve on such Gramians at
            # m = 128. With unrolled loops it always runs (no host read), so that every mode
            # gives the same values (the problems it does not solve keep y0 exactly).
            stage = partial(_float32_stage, iters=pdas_iters, loop=loop)
            if loop == "unroll":
                y0, w0, res0 = stage(g_search, c_search, y0, w0, res0, accepted)
            elif torch.compiler.is_compiling():
                stage_operands = (g_search, c_search, y0, w0, res0, accepted)
                y0, w0, res0 = torch.cond(accepted.all(), _no_stage, stage, stage_operands)
            elif not bool(accepted.all()):
                y0, w0, res0 = stage(g_search, c_search, y0, w0, res0, accepted)
        reduced = _reduced_solver(g_search)
        # The starting point is not a candidate: only a PDAS solve gives an exact solution (the
        # Jacobi iterate can have a small residual and still be ~κ·rtol away from it).
        unsolved = torch.full_like(res0, torch.inf)
        y, res = _pdas(
            g_search,
            c_search,
            y0,
            w0,
            y0,
            unsolved,
            pdas_iters,
            solve=reduced,
            rtol=tolerance,
            loop=loop,
        )
        converged = res <= rtol
        operands = (g_search, c_search, y, res, converged, tolerance)
        run_fallback = partial(
            _fallback, ipm_iters=ipm_iters, polish_iters=polish_iters, unroll=vmapped
        )
        if fallback == "always" or vmapped:
            y = run_fallback(*operands)
        elif torch.compiler.is_compiling():
            y = torch.cond(converged.all(), _keep, run_fallback, operands)
        elif not bool(converged.all()):
            # Eagerly, the same choice without torch.cond, which would trace its branches with
            # dynamo (about 1 s on the first call) and costs ~0.1 ms per call.
            y = run_fallback(*operands)
    return y


def solve_box_qp(
    gramian: Tensor,
    c: Tensor,
    *,
    pdas_iters: int = 8,
    ipm_iters: int = 24,
    polish_iters: int = 5,
    rtol: float = 1e-9,
    fallback: Literal["cond", "always"] = "cond",
) -> Tensor:
    """Solve the batched LCP ``y ≥ 0, Gy + c ≥ 0, yᵀ(Gy + c) = 0`` (``min ½yᵀGy + cᵀy, y ≥ 0``).

    First at most ``pdas_iters`` PDAS steps (from the free set of a few damped projected Jacobi
    sweeps; on CPUs, for ``128 ≤ m ≤ 256``, problems that the sweeps did not help start from up to
    5 float32 PDAS steps instead) with best-iterate tracking; a problem has converged when
    its relative natural residual ``‖min(y, Gy + c)‖∞ / (‖c‖∞ + max_i Σ_j |G_ij y_j|)`` is at most
    ``rtol``, and is then frozen. Each step solves every unconverged problem on its current free
    set ``F`` (complement ``A``) with a system of size ``min(|F|, |A|) ≤ m // 2``: ``G_FF``, or
    ``(G⁻¹)_AA`` by block elimination (``G_FF⁻¹ = H_FF − H_FA H_AA⁻¹ H_AF`` with ``H = G⁻¹``), an
    eighth of the flops of a masked ``m × m`` factorisation. With ``fallback="cond"`` the loop
    stops as soon as every problem has converged: eagerly it reads one boolean per iteration (and
    then also skips the converged problems), under :func:`torch.compile` it is a
    ``while_loop``; with ``"always"`` or under :func:`torch.vmap` it runs ``pdas_iters`` steps.
    The values are the same either way. (For ``m ≤ 6``, ``m ≤ 8`` on CUDA devices, every active
    set is tried instead, and the candidate with the smallest residual is kept: exact, a fixed
    handful of operations, no host synchronisation; for ``m ≤ 2`` in closed form.) Then the fallback, ``ipm_iters`` interior-point iterations followed by
    ``polish_iters`` PDAS steps, replaces the unconverged rows where it does better. With
    ``fallback="cond"`` it runs (for the whole batch) only if some problem has not converged,
    under :func:`torch.cond`, which reads that one boolean on the host; with ``"always"`` it always
    runs and is selected with :func:`torch.where` (about four times the cost, but no host
    synchronisation at all, e.g. for CUDA graphs). Both give the same values. The result is the
    best iterate found: this never raises on a PSD input.

    The solve runs in float64. If the float64 Cholesky factorisation of ``G`` fails (``G``
    singular, e.g. an unregularised Gramian of dependent gradients), ``m·eps·max_i G_ii`` is added
    to its diagonal so that every masked system can be factored; the result is then a solution of
    the LCP up to that perturbation when one exists (e.g. when ``c`` is in the range of ``G``, as
    for the dual-cone projection).

    Non-finite inputs: a problem (row of ``c``) whose Gramian or own row of ``c`` contains NaN or
    ±Inf gets an all-NaN solution; the other problems of the batch are unaffected. It never hangs:
    every loop has a bounded trip count.

    Gradients: when ``gramian`` or ``c`` requires grad, the search runs without autograd and one
    differentiable masked solve on the final free set supplies the gradient (exact where the
    active set is locally constant, i.e. under strict complementarity).

    Memory: each PDAS step gathers ``[..., k, m // 2, m // 2]`` float64 systems (256 MiB for
    ``k = m = 512``, plus an int64 index of the same size); the fallback and the gradient solve factor
    ``[..., k, m, m]`` matrices (1 GiB for ``k = m = 512``).

    Args:
        gramian: Symmetric PSD matrices ``[..., m, m]`` (positive definite for a unique solution).
        c: Linear terms ``[..., k, m]``; their leading dims broadcast with those of ``gramian``.
        pdas_iters: Maximum number of PDAS iterations.
        ipm_iters: Number of interior-point iterations of the fallback.
        polish_iters: Number of PDAS iterations after the interior-point method.
        rtol: Convergence tolerance on the relative natural residual.
        fallback: ``"cond"`` or ``"always"``, see above.

    Returns:
        ``y`` ``[..., k, m]`` in the promoted dtype of ``gramian`` and ``c``.

    Raises:
        ValueError: ``fallback`` is neither ``"cond"`` nor ``"always"``.

    Example:
        >>> import torch
        >>> G = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
        >>> solve_box_qp(G, torch.tensor([[-1.0, 1.0]]))
        tensor([[0.5000, 0.0000]])
    """
    if fallback not in ("cond", "always"):
        raise ValueError(f'fallback must be "cond" or "always", got {fallback!r}.')
    out_dtype = torch.promote_types(gramian.dtype, c.dtype)
    m = gramian.shape[-1]
    # The leading dims are broadcast up front so that every iterate has the same shape, as
    # torch.cond requires of its branches. (broadcast_shapes is not annotated in torch.)
    leading = (gramian.shape[:-2], c.shape[:-2])
    batch = torch.broadcast_shapes(*leading)  # type: ignore[no-untyped-call]
    g64 = gramian.to(_SOLVE_DTYPE).expand(*batch, m, m)
    c64 = c.to(_SOLVE_DTYPE).expand(*batch, c.shape[-2], m)

    finite_gramian = g64.isfinite().all(dim=-1).all(dim=-1)
    finite = finite_gramian[..., None] & c64.isfinite().all(dim=-1)
    eye = torch.eye(m, dtype=_SOLVE_DTYPE, device=g64.device)
    # Non-finite problems are replaced by harmless ones (and set to NaN at the end), so that they
    # cannot disturb the factorisations or the convergence test of the others.
    g64 = torch.where(finite_gramian[..., None, None], g64, eye)
    c64 = torch.where(finite[..., None], c64, torch.zeros_like(c64))
    # Cholesky reads one triangle, the residual both: make them agree.
    g64 = 0.5 * (g64 + g64.mT)
    with torch.no_grad():
        _, info = torch.linalg.cholesky_ex(g64, upper=True)
        max_diag = g64.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
        ridge = torch.where(info == 0, torch.zeros_like(max_diag), m * _EPS * max_diag)
    g64 = g64 + ridge[..., None, None] * eye

    with torch.no_grad():
        # Detached operands: torch.cond inspects autograd metadata of what it is given.
        g_search, c_search = g64.detach(), c64.detach()
    if m <= (_ENUMERATE_MAX_CUDA if g_search.device.type == "cuda" else _ENUMERATE_MAX):
        with torch.no_grad():
            small = _enumerate_small if m <= 2 else _enumerate_all
            y = small(g_search, c_search)
    else:
        y = _search(g_search, c_search, pdas_iters, ipm_iters, polish_iters, rtol, fallback)

    if torch.is_grad_enabled() and (gramian.requires_grad or c.requires_grad):
        # On a fixed active set the solution is a smooth function of (G, c) (implicit function
        # theorem): one differentiable solve on the final free set gives the exact gradient,
        # while the values stay those of the search.
        y_diff = _masked_solve(g64, c64, y > y @ g64 + c64)
        y = y + (y_diff - y_diff.detach())
    y = torch.where(finite[..., None], y, torch.full_like(y, torch.nan))
    return y.to(out_dtype)


def dual_cone_projection(
    U: Tensor,
    gramian: Tensor,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> Tensor:
    """Project each row of ``U`` onto the dual cone: ``v = argmin vᵀG'v s.t. v ≥ u``.

    ``G' = normalize_regularize(G, norm_eps=norm_eps, reg_eps=reg_eps)``, as in TorchJD's
    ``QuadprogProjector``. If ``G = J Jᵀ``, ``Jᵀv`` is the projection of ``Jᵀu`` onto the dual
    cone of the rows of ``J`` (Prop. 1 of https://arxiv.org/abs/2406.16232). Solved as the LCP
    ``y = v − u``, ``c = G'u`` by :func:`solve_box_qp`, in float64.

    Input screening (per Gramian of the batch, no host synchronisation), with ``τ = √eps`` of
    ``gramian``'s dtype and ``t = max(tr(G), 0)``: a Gramian with a NaN or ±Inf entry, with
    ``max|G − Gᵀ| > τ·t`` or with an eigenvalue below ``−τ·t`` gives NaN; otherwise its
    symmetric part is solved, shifted by ``max(0, −λ_min)·I`` when rounding left it slightly
    indefinite.

    Args:
        U: Vectors to project ``[..., k, m]``.
        gramian: PSD Gramians ``[..., m, m]``; leading dims broadcast with those of ``U``.
        norm_eps: See :func:`normalize_regularize`; finite, ``≥ 0``.
        reg_eps: See :func:`normalize_regularize`; finite, ``≥ 0``.
        differentiable: Keep ``gramian``'s autograd graph (an extra ``[..., k, m, m]`` solve,
            see :func:`solve_box_qp`). By default the result is detached from ``gramian``, as in
            TorchJD, whose weights are not differentiable either.

    Returns:
        ``V`` ``[..., k, m]`` in the promoted dtype of ``U`` and ``gramian``. Problems whose
        inputs contain NaN or ±Inf, or whose Gramian is rejected (above), give NaN.

    Raises:
        TypeError: ``gramian`` is not a floating-point Tensor, or an eps is not a float.
        ValueError: an eps is negative, NaN or infinite.

    Example:
        >>> import torch
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 4.0]])
        >>> dual_cone_projection(torch.eye(2), G, norm_eps=0.0, reg_eps=0.0)
        tensor([[1.0000, 0.2500],
                [1.0000, 1.0000]])
    """
    norm_eps = check_eps(norm_eps, "norm_eps")
    reg_eps = check_eps(reg_eps, "reg_eps")
    out_dtype = torch.promote_types(U.dtype, _check_floating(gramian).dtype)
    screened = _screen(gramian, differentiable=differentiable)
    g = normalize_regularize(screened, norm_eps=norm_eps, reg_eps=reg_eps)
    u = (U if differentiable else U.detach()).to(_SOLVE_DTYPE)
    return (u + solve_box_qp(g, u @ g)).to(out_dtype)


def check_pref(pref: object, m: int) -> Tensor | None:
    """Checks that ``pref`` is ``None`` or a floating-point Tensor ``[m]`` (or ``[..., m]``).

    Static checks only (its values are checked by the kernels without host synchronisation).

    Raises:
        TypeError: not a floating-point Tensor (e.g. a list).
        ValueError: 0-d, or its last dim is not ``m``.
    """
    if pref is None:
        return None
    if not isinstance(pref, Tensor) or not pref.is_floating_point():
        kind = pref.dtype if isinstance(pref, Tensor) else type(pref).__name__
        raise TypeError(
            f"`pref_vector` must be a floating-point Tensor [m], got {kind}: pass e.g. "
            "torch.tensor([...]) with one preference per loss."
        )
    if pref.ndim == 0 or pref.shape[-1] != m:
        raise ValueError(
            f"`pref_vector` has shape {list(pref.shape)} but the Gramian is for {m} losses: give "
            "a vector [m] (or [..., m]) with one preference per loss."
        )
    return pref


def _preference(gramian: Tensor, pref: object) -> Tensor:
    """``pref`` in float64, or ``1/m`` everywhere, ``[..., m]``; NaN where it has a negative or
    non-finite entry (a value check without host synchronisation)."""
    m = gramian.shape[-1]
    checked = check_pref(pref, m)
    if checked is None:
        return torch.full(gramian.shape[:-1], 1.0 / m, dtype=_SOLVE_DTYPE, device=gramian.device)
    u = checked.detach().to(_SOLVE_DTYPE)
    valid = (u.isfinite() & (u >= 0)).all(dim=-1, keepdim=True)
    return torch.where(valid, u, torch.full_like(u, torch.nan))


def upgrad_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> Tensor:
    """UPGrad weights ``w = Σ_i π(u_i e_i)``: the sum of the dual-cone projections of ``diag(u)``.

    ``wᵀJ = Σ_i π_J(u_i g_i)`` (https://arxiv.org/abs/2406.16232), with ``π`` the projection of
    :func:`dual_cone_projection` (which screens the Gramian): the same as TorchJD's
    ``UPGradWeighting`` with its default ``QuadprogProjector(norm_eps, reg_eps)``. ``m``
    projections, one batched solve.

    Args:
        gramian: PSD Gramians ``[..., m, m]``, any floating dtype (solved in float64).
        pref: Preference vector ``u`` ``[m]`` or ``[..., m]`` (not normalised, ``≥ 0``); default
            ``1/m``.
        norm_eps: See :func:`normalize_regularize`.
        reg_eps: See :func:`normalize_regularize`.
        differentiable: See :func:`dual_cone_projection` (default: detached).

    Returns:
        Weights ``[..., m]`` in the dtype of ``gramian``; all NaN for a Gramian that
        :func:`dual_cone_projection` rejects (non-finite, indefinite or non-symmetric beyond
        rounding) or a preference vector with a negative, NaN or ±Inf entry.

    Raises:
        TypeError: ``pref`` is not a floating-point Tensor, or see :func:`dual_cone_projection`.
        ValueError: ``pref`` is 0-d or not of length ``m``, or see :func:`dual_cone_projection`.

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> upgrad_weights(J @ J.T)
        tensor([1.1109, 0.7894])
    """
    u = _preference(_check_floating(gramian), pref)
    projections = dual_cone_projection(
        torch.diag_embed(u),
        gramian,
        norm_eps=norm_eps,
        reg_eps=reg_eps,
        differentiable=differentiable,
    )
    return projections.sum(dim=-2).to(gramian.dtype)


def dualproj_weights(
    gramian: Tensor,
    pref: Tensor | None = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> Tensor:
    """DualProj weights: the dual-cone projection ``π(u)`` of the preference vector.

    ``wᵀJ = π_J(Jᵀu)`` (GEM, https://arxiv.org/abs/1706.08840, eq. 11): the same as TorchJD's
    ``DualProjWeighting`` with its default ``QuadprogProjector(norm_eps, reg_eps)``.

    Args:
        gramian: PSD Gramians ``[..., m, m]``, any floating dtype (solved in float64).
        pref: Preference vector ``u`` ``[m]`` or ``[..., m]`` (not normalised, ``≥ 0``); default
            ``1/m``.
        norm_eps: See :func:`normalize_regularize`.
        reg_eps: See :func:`normalize_regularize`.
        differentiable: See :func:`dual_cone_projection` (default: detached).

    Returns:
        Weights ``[..., m]`` in the dtype of ``gramian``; NaN in the cases of
        :func:`upgrad_weights`.

    Raises:
        TypeError: As :func:`upgrad_weights`.
        ValueError: As :func:`upgrad_weights`.

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> dualproj_weights(J @ J.T)
        tensor([0.6109, 0.5000])
    """
    u = _preference(_check_floating(gramian), pref)
    projection = dual_cone_projection(
        u[..., None, :],
        gramian,
        norm_eps=norm_eps,
        reg_eps=reg_eps,
        differentiable=differentiable,
    )
    return projection[..., 0, :].to(gramian.dtype)


def mgda_weights(gramian: Tensor, *, reg_eps: float = 1e-8, differentiable: bool = False) -> Tensor:
    """MGDA weights: the min-norm point of the convex hull, ``argmin αᵀGα s.t. α ≥ 0, Σα = 1``.

    https://arxiv.org/abs/1810.04650. With ``ν = αᵀGα > 0`` and ``y = α/ν``, the KKT conditions
    are the LCP ``y ≥ 0, Gy − 1 ≥ 0, yᵀ(Gy − 1) = 0``, solved by :func:`solve_box_qp` on
    ``G' = G/tr(G) + reg_eps·I`` (positive definite, so the LCP has a solution even when 0 is in
    the convex hull); ``α = y / Σy``. The solution does not depend on the scale of ``G``, so
    unlike UPGrad's this normalisation has no threshold: only a zero Gramian stays zero, and gets
    uniform weights. The Gramian is screened first, as in :func:`dual_cone_projection`: a float32
    Gramian that rounding left indefinite by more than ``reg_eps`` (e.g. two nearly opposite
    gradients) is shifted to PSD, not solved as an indefinite problem.

    Accuracy: ``α`` is optimal for ``G'`` to rounding, so the KKT conditions of the original
    problem hold up to ``reg_eps·tr(G)``: with ``λ = αᵀGα``, ``min_i (Gα)_i − λ ≥ −reg_eps·tr(G)``
    and ``|α_i ((Gα)_i − λ)| ≤ reg_eps·tr(G)``, up to rounding. (TorchJD's Frank-Wolfe stops on a
    step size instead, ``epsilon=1e-3`` and at most 100 iterations.)

    Args:
        gramian: PSD Gramians ``[..., m, m]``, any floating dtype (solved in float64).
        reg_eps: Regularisation added to the trace-normalised Gramian; finite and positive.
        differentiable: See :func:`dual_cone_projection` (default: detached).

    Returns:
        Weights on the simplex ``[..., m]`` in the dtype of ``gramian``; all NaN for a Gramian
        that :func:`dual_cone_projection` would reject (non-finite, indefinite or non-symmetric
        beyond rounding).

    Raises:
        TypeError: ``gramian`` is not a floating-point Tensor, or ``reg_eps`` not a float.
        ValueError: ``reg_eps`` is not finite and positive.

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> mgda_weights(J @ J.T)
        tensor([0.6000, 0.4000])
    """
    reg_eps = check_eps(reg_eps, "reg_eps", positive=True)
    screened = _screen(_check_floating(gramian), differentiable=differentiable)
    g = normalize_regularize(screened, norm_eps=0.0, reg_eps=reg_eps)
    c = -torch.ones(g.shape[:-1], dtype=_SOLVE_DTYPE, device=g.device)[..., None, :]
    y = solve_box_qp(g, c)[..., 0, :]
    return (y / y.sum(dim=-1, keepdim=True)).to(gramian.dtype)
