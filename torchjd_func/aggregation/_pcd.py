"""PCD: Priority-Constrained Descent, the primary gradient under progress guarantees for the others.

Varam et al., "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
Multi-Objective Optimization", TMLR 2026, https://openreview.net/forum?id=HT01yGHLEt
(https://arxiv.org/abs/2606.29521). Row 0 of the Jacobian is the primary objective:

.. math::

    \\tilde d = \\arg\\min_d \\tfrac12 \\|d - \\tilde g_1\\|^2 \\quad \\text{s.t.} \\quad
    \\tilde g_j^\\top d \\ge \\tau_j \\|\\tilde g_j\\|^2, \\ j = 2, \\dots, m, \\qquad
    \\tilde g_i = s_i g_i, \\quad s_i = (\\hat v_i + \\epsilon)^{-1/2},

with ``v̂`` the bias-corrected EMA of ``‖g_i‖² = G_ii`` (decay ``β``); the update is ``d̃`` rescaled
to ``‖g_1‖``. By stationarity ``d̃ = Σ_i w_i g̃_i`` with ``w = [1, μ]``, ``μ ≥ 0`` the KKT multipliers,
so the QP lives on the Gramian: its dual is ``min ½μᵀG̃_SSμ − bᵀμ s.t. μ ≥ 0`` with
``b_j = τ_j G̃_jj − G̃_j1`` (``S`` = the secondary objectives). It is solved as TorchJD 0.18 does,
by the dual active-set method of Goldfarb and Idnani (1983, https://doi.org/10.1007/BF02591962)
for an identity Hessian, with TorchJD's tolerances and budget, but batched in torch: every
problem of a batch carries its active set as a mask, and each iteration does, for all of them at
once, what TorchJD's Python loop does for one (one masked ``(m − 1) × (m − 1)`` solve).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torchjd_func._qp import check_eps
from torchjd_func._torch_compat import is_batchedtensor, while_loop
from torchjd_func.aggregation._base import (
    Delegated,
    GramianWeightedAggregator,
    GramianWeighting,
    Hyperparameter,
    PureWeighting,
    check_gramian,
    guard_nonfinite,
    nan_if_nonfinite,
)

__all__ = ["PCD", "PCDState", "PCDWeighting", "pcd", "pcd_scales", "pcd_weights"]

_DTYPE = torch.float64
"""TorchJD solves in float64 (on the CPU); so does this module, on the Gramian's device."""
_TOL = 1e-9
"""A constraint holds when violated by at most this times the largest ``G̃_ii`` (TorchJD's)."""
_DEPENDENCE_TOL = 1e-9
"""Lower bound of the relative squared norm below which a gradient counts as a combination of
the active ones (TorchJD's ``max(1e-9, 10·eps)`` of the input dtype)."""


class PCDState(NamedTuple):
    """State of PCD (float64, as TorchJD keeps it, whatever the Gramian's dtype)."""

    sq_norm_ema: Tensor
    """``[m]`` float64 (``[..., m]`` after a batch of Gramians): the EMA ``v`` of ``G_ii``, not
    bias-corrected."""
    n_steps: Tensor
    """``[]`` int64: how many Gramians the EMA has seen."""


def check_tau(tau: object) -> float | Tensor:
    """Checks TorchJD's ``tau``: a real number or a 1-D Tensor, with values in ``[0, 1]``.

    Reads a Tensor's values once (eagerly): for construction, not for kernels.

    Raises:
        TypeError: neither a real number nor a floating-point Tensor.
        ValueError: a Tensor that is not 1-D, or a value outside ``[0, 1]`` (or NaN).
    """
    if isinstance(tau, Tensor):
        if not tau.is_floating_point():
            raise TypeError(f"A Tensor `tau` must be floating-point, got dtype {tau.dtype}.")
        if tau.ndim != 1:
            raise ValueError(
                f"`tau` must be a float or a 1-D Tensor with one value per secondary objective "
                f"(m - 1 values), got a Tensor of shape {list(tau.shape)}."
            )
        if not bool(((tau >= 0) & (tau <= 1)).all()):
            raise ValueError(f"`tau` must have values in [0, 1], got {tau.tolist()}.")
        return tau
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(
            f"`tau` must be a float or a 1-D Tensor, got {type(tau).__name__}; e.g. tau=0.02."
        )
    if not 0 <= tau <= 1:
        raise ValueError(f"`tau` must be in [0, 1], got {tau}.")
    return float(tau)


def _check_beta(beta: object) -> float:
    value = check_eps(beta, "beta")
    if value >= 1:
        raise ValueError(f"`beta` must be in [0, 1), got {beta}.")
    return value


def _taus(tau: float | Tensor, m: int, device: torch.device) -> Tensor:
    """``τ_j`` ``[m − 1]`` in float64; a Tensor ``tau`` must have ``m − 1`` values."""
    if isinstance(tau, Tensor):
        if tau.ndim != 1 or tau.shape[0] != m - 1:
            raise ValueError(
                f"A Tensor `tau` needs one value per secondary objective: {m - 1} for a Gramian "
                f"of {m} losses, got shape {list(tau.shape)}."
            )
        return tau.detach().to(device=device, dtype=_DTYPE)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"`tau` must be a float or a 1-D Tensor, got {type(tau).__name__}.")
    return torch.full((m - 1,), float(tau), dtype=_DTYPE, device=device)


def _step(
    gramian: Tensor,
    b: Tensor,
    atol: Tensor,
    dependence_tol: float,
    eye: Tensor,
    carry: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """One iteration of the dual active-set method, for every problem of the batch.

    ``carry``: multipliers ``μ`` ``[..., n]``, the active set and the pending constraint ``p``
    (one-hot, or all False) as masks ``[..., n]``, the slack of ``p`` ``[...]``, and the flags
    ``done`` and ``infeasible`` ``[...]``. One iteration is one pass of TorchJD's inner loop,
    preceded, when no constraint is pending, by its outer loop's choice of the most violated one
    (or the end). A finished problem is left as it is (so stopping early changes nothing).
    ``eye``: the identity ``[n, n]`` (hoisted out of the loop).
    """
    mu, active, pending, slack_p, done, infeasible = carry
    zeros = torch.zeros_like(mu)
    n = mu.shape[-1]
    # The most violated constraint (the first on ties, as TorchJD's argmin); active ones hold.
    slacks = torch.where(active, zeros, (gramian @ mu[..., None])[..., 0] - b)
    chosen = slacks.argmin(dim=-1, keepdim=True)
    smallest = slacks.gather(-1, chosen)[..., 0]
    has_pending = pending.any(dim=-1)
    done = done | (~has_pending & (smallest >= -atol))
    positions = torch.arange(n, device=mu.device)  # (a constant under torch.compile)
    p = torch.where(has_pending[..., None], pending, positions == chosen)
    slack_p = torch.where(has_pending, slack_p, smallest)

    # Dual step: +1 on μ_p, −r on the active μ, with G_AA r = G_Ap; primal step z = g_p − Σ r_j g_j.
    p_float = p.to(mu.dtype)
    column = (gramian @ p_float[..., None])[..., 0]
    row = (p_float[..., None, :] @ gramian)[..., 0, :]
    # G_AA padded with the identity (the inactive rows are decoupled, so r = 0 there).
    both = active[..., :, None] & active[..., None, :]
    system = torch.where(both, gramian, eye)
    r = torch.linalg.solve_ex(system, torch.where(active, column, zeros))[0]
    g_pp = (column * p_float).sum(dim=-1)
    z = g_pp - (row * r).sum(dim=-1)
    inf = torch.full_like(mu, math.inf)
    positive = active & (r > 0)
    ratios = torch.where(positive, mu / torch.where(positive, r, torch.ones_like(r)), inf)
    k = ratios.argmin(dim=-1, keepdim=True)
    partial = ratios.gather(-1, k)[..., 0]
    # z = 0: g_p depends on the active gradients, and no primal step is possible.
    independent = z > dependence_tol * g_pp
    safe_z = torch.where(independent, z, torch.ones_like(z))
    full = torch.where(independent, -slack_p / safe_z, torch.full_like(z, math.inf))
    step = torch.minimum(partial, full)
    blocked = torch.isinf(step)  # no step in either space: the constraints are infeasible
    running = ~done
    take = running & ~blocked

    length = torch.where(take, step, torch.zeros_like(step))[..., None]
    new_mu = mu - length * r + length * p_float
    add = full <= partial
    # Otherwise the constraint k whose multiplier reached zero is dropped, and p stays pending.
    drop = (positions == k) & ~add[..., None]
    new_mu = torch.where(drop, zeros, new_mu)
    new_active = (active | (p & add[..., None])) & ~drop
    new_pending = p & ~add[..., None]
    new_slack = (row * new_mu).sum(dim=-1) - (b * p_float).sum(dim=-1)

    kept = take[..., None]
    return (
        torch.where(kept, new_mu, mu),
        torch.where(kept, new_active, active),
        torch.where(kept, new_pending, pending),
        torch.where(take, new_slack, slack_p),
        done | blocked,
        infeasible | (running & blocked),
    )


def _dual_active_set(
    gramian: Tensor, taus: Tensor, dependence_tol: float, max_iters: int, early_exit: bool
) -> Tensor:
    """``w = [1, μ]`` ``[..., m]`` for the normalised float64 Gramians ``[..., m, m]``;
    ``[1, 0, ..., 0]`` where the constraints are infeasible."""
    m = gramian.shape[-1]
    ones = torch.ones_like(gramian[..., :1, 0])
    if m == 1:
        return ones
    secondary = gramian[..., 1:, 1:]
    b = taus * secondary.diagonal(dim1=-2, dim2=-1) - gramian[..., 1:, 0]
    largest = gramian.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
    atol = _TOL * largest.clamp_min(torch.finfo(_DTYPE).tiny)
    if m == 2 and max_iters > 0:
        # One constraint: the method's single step in closed form (the same arithmetic). It is
        # never infeasible: a zero g_2 (the only dependent one) satisfies it.
        g_22 = secondary[..., 0]
        added = (b > atol[..., None]) & (g_22 > dependence_tol * g_22)
        safe = torch.where(added, g_22, torch.ones_like(g_22))
        return torch.cat([ones, torch.where(added, b / safe, torch.zeros_like(b))], dim=-1)
    eye = torch.eye(m - 1, dtype=_DTYPE, device=gramian.device)
    flags = torch.zeros_like(atol, dtype=torch.bool)
    carry: tuple[Tensor, ...] = (
        torch.zeros_like(b),
        torch.zeros_like(b, dtype=torch.bool),
        torch.zeros_like(b, dtype=torch.bool),
        torch.zeros_like(atol),
        flags,
        flags.clone(),
    )

    def step(state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return _step(secondary, b, atol, dependence_tol, eye, state)

    # Under vmap no flag can be read: the whole budget runs (finished problems stay frozen, so
    # every form of the loop gives the same values).
    if not early_exit or is_batchedtensor(secondary):
        for _ in range(max_iters):
            carry = step(carry)
    elif torch.compiler.is_compiling():

        def unfinished(count: Tensor, *state: Tensor) -> Tensor:
            return (count < max_iters) & ~state[4].all()

        def body(count: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
            # A while_loop's outputs may not alias its inputs.
            return (count + 1, *(t.clone() for t in step(state)))

        count = torch.zeros((), dtype=torch.long, device=gramian.device)
        # (while_loop is not annotated in torch 2.13.)
        carry = tuple(while_loop(unfinished, body, (count, *carry))[1:])  # type: ignore[no-untyped-call]
    else:
        for _ in range(max_iters):
            if bool(carry[4].all()):
                break
            carry = step(carry)
    mu, infeasible = carry[0], carry[5]
    mu = torch.where(infeasible[..., None], torch.zeros_like(mu), mu.clamp(min=0.0))
    return torch.cat([ones, mu], dim=-1)


def pcd_weights(
    gramian: Tensor,
    scales: Tensor,
    *,
    tau: float | Tensor = 0.02,
    max_iters: int | None = None,
    early_exit: bool = True,
) -> Tensor:
    """PCD's weights for given scales ``s``: ``w = [1, μ] ∘ s · ‖g_1‖ / ‖d̃‖``, batched.

    With ``G̃ = G ∘ ssᵀ`` (the Gramian of ``g̃_i = s_i g_i``), ``μ`` solves the dual of
    ``min ½‖d − g̃_1‖² s.t. g̃_jᵀd ≥ τ_j‖g̃_j‖² (j ≥ 2)`` and ``d̃ = Σ_i w_i g̃_i``; the weights
    give ``Jᵀw = d̃ · ‖g_1‖ / ‖d̃‖``. As in TorchJD 0.18: infeasible constraints (e.g. two
    opposite secondary gradients) are dropped, ``w = [1, 0, ..., 0] ∘ s``, rescaled; the weights
    are zero when ``G_11 ≤ 0`` or when ``‖d̃‖² ≤ 10·eps·(Σ_i |w_i| ‖g̃_i‖)²`` (zero up to
    rounding; ``eps`` of the Gramian's dtype). :func:`pcd` supplies TorchJD's scales
    ``s_i = (v̂_i + ε)^(-1/2)``; ``scales = 1`` solves the unnormalised problem.

    The QP is solved in float64 by the dual active-set method of Goldfarb and Idnani with
    TorchJD's tolerances (a constraint holds when violated by at most ``1e-9·max_i G̃_ii``; a
    gradient depends on the active ones when its orthogonal part has a relative squared norm of
    at most ``max(1e-9, 10·eps)``), for every Gramian of the batch at once: one masked
    ``(m − 1) × (m − 1)`` solve per iteration. With ``early_exit`` (the default) the loop stops
    when every problem has finished: eagerly by reading one boolean per iteration (a host
    synchronisation on CUDA), under :func:`torch.compile` as a ``while_loop``; otherwise, and
    under :func:`torch.vmap`, all ``max_iters`` iterations run (no host read; a finished problem
    is frozen, so the values are the same). The weights are detached (PCD is not
    differentiable, as in TorchJD). When the secondary gradients are linearly dependent the
    multipliers are not unique: these are TorchJD's (the same iterations), up to rounding.

    Args:
        gramian: PSD Gramians ``[..., m, m]``; row and column 0 are the primary objective.
        scales: Non-negative scales ``s`` ``[..., m]`` (broadcast with the Gramians' batch).
        tau: ``τ`` in ``[0, 1]``: a float for every secondary objective, or a 1-D Tensor of
            ``m − 1`` values (values outside ``[0, 1]`` give NaN weights; the constructors of
            :func:`pcd` and :class:`PCDWeighting` refuse them).
        max_iters: Iteration budget (TorchJD's, ``10·m``, by default); when it runs out (only if
            rounding makes the method cycle), the current multipliers are used.
        early_exit: Stop once every problem has finished (see above).

    Returns:
        Weights ``[..., m]`` in the dtype and on the device of ``gramian``: NaN for a Gramian
        with a NaN or ±Inf entry, or for non-finite or negative scales or a ``tau`` outside
        ``[0, 1]``. ``m = 1``: ``[1]`` (``[0]`` for a zero gradient).

    Raises:
        TypeError: ``gramian`` or ``scales`` is not a floating-point Tensor, or ``tau`` is neither
            a float nor a Tensor.
        ValueError: wrong shapes (``scales`` not ``[..., m]``, a Tensor ``tau`` without ``m − 1``
            values), or ``max_iters`` negative.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import pcd_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> G = J @ J.T
        >>> pcd_weights(G, G.diagonal().rsqrt())
        tensor([1.8481, 1.0954])
    """
    check_gramian(gramian)
    m = gramian.shape[-1]
    if not isinstance(scales, Tensor) or not scales.is_floating_point():
        kind = scales.dtype if isinstance(scales, Tensor) else type(scales).__name__
        raise TypeError(f"`scales` must be a floating-point Tensor [..., m], got {kind}.")
    if scales.ndim == 0 or scales.shape[-1] != m:
        raise ValueError(
            f"`scales` must have shape [..., {m}] for a Gramian of {m} losses, got "
            f"{list(scales.shape)}."
        )
    if max_iters is None:
        max_iters = 10 * m
    elif isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"`max_iters` must be a non-negative int or None, got {max_iters!r}.")
    if not isinstance(early_exit, bool):
        raise TypeError(f"`early_exit` must be a bool, got {type(early_exit).__name__}.")
    taus = _taus(tau, m, gramian.device)

    # TorchJD's relative precision of a Gramian of this dtype (float64 gives 2.2e-15).
    precision = 10.0 * torch.finfo(gramian.dtype).eps
    g = gramian.detach().to(_DTYPE)
    s = scales.detach().to(_DTYPE)
    finite = g.isfinite().all(dim=-1).all(dim=-1)
    valid = finite & (s.isfinite() & (s >= 0)).all(dim=-1)
    valid = valid & ((taus >= 0) & (taus <= 1)).all()
    # Invalid problems are solved as zero Gramians (finished at once) and set to NaN at the end.
    g = torch.where(valid[..., None, None], g, torch.zeros_like(g))
    s = torch.where(valid[..., None], s, torch.zeros_like(s))

    normalized = g * s[..., :, None] * s[..., None, :]
    w = _dual_active_set(normalized, taus, max(_DEPENDENCE_TOL, precision), max_iters, early_exit)
    direction = (w[..., None, :] @ normalized @ w[..., :, None])[..., 0, 0]
    norms = normalized.diagonal(dim1=-2, dim2=-1).sqrt()
    magnitude = (w.abs() * norms).sum(dim=-1) ** 2
    primary = g[..., 0, 0]
    scaled = (primary > 0) & (direction > precision * magnitude)
    safe = torch.where(scaled, direction, torch.ones_like(direction))
    weights = torch.where(
        scaled[..., None], w * s * (primary / safe).sqrt()[..., None], torch.zeros_like(w)
    )
    weights = torch.where(valid[..., None], weights, torch.full_like(weights, math.nan))
    return nan_if_nonfinite(gramian, weights.to(gramian.dtype))


def pcd_scales(
    gramian: Tensor, state: PCDState, *, beta: float = 0.999, eps: float = 1e-8
) -> tuple[Tensor, PCDState]:
    """The scales ``s_i = (v̂_i + ε)^(-1/2)`` ``[..., m]`` and the state updated with ``G_ii``.

    ``v ← βv + (1 − β) diag G``, ``t ← t + 1``, ``v̂ = v / (1 − β^t)``; ``s_i = 0`` where
    ``v̂_i + ε = 0`` (a gradient that has always been zero, with ``ε = 0``), as in TorchJD.
    Float64 throughout.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import PCDState, pcd_scales
        >>> state = PCDState(torch.zeros(2, dtype=torch.float64), torch.tensor(0))
        >>> scales, state = pcd_scales(torch.diag(torch.tensor([4.0, 0.0])), state, eps=0.0)
        >>> scales, state.n_steps
        (tensor([0.5000, 0.0000], dtype=torch.float64), tensor(1))
    """
    squared_norms = gramian.detach().to(_DTYPE).diagonal(dim1=-2, dim2=-1)
    ema = beta * state.sq_norm_ema.to(_DTYPE) + (1.0 - beta) * squared_norms
    n_steps = state.n_steps + 1
    correction = 1.0 - torch.pow(torch.full_like(ema[..., :1], beta), n_steps.to(_DTYPE))
    denominators = (ema / correction + eps).sqrt()
    positive = denominators > 0
    safe = torch.where(positive, denominators, torch.ones_like(denominators))
    scales = torch.where(positive, 1.0 / safe, torch.zeros_like(denominators))
    return scales, PCDState(ema, n_steps)


def pcd(
    tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8
) -> PureWeighting[PCDState]:
    """PCD as a :class:`PureWeighting` whose state is a :class:`PCDState`.

    ``update`` is :func:`pcd_scales` then :func:`pcd_weights` (a non-finite Gramian gives NaN
    weights and leaves the state unchanged).

    Args:
        tau: ``τ`` in ``[0, 1]``: a float, or a 1-D Tensor of one value per secondary objective.
        beta: Decay of the EMA of the squared gradient norms, in ``[0, 1)``.
        eps: Added to the EMA before its inverse square root; finite, non-negative.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import pcd
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = pcd()
        >>> state = weighting.init(2)
        >>> weights, state = weighting.update(J @ J.T, state)
        >>> weights, state.n_steps
        (tensor([1.8481, 1.0954]), tensor(1))
    """
    checked_tau = check_tau(tau)
    checked_beta = _check_beta(beta)
    checked_eps = check_eps(eps, "eps")
    return PureWeighting(
        _PCDInit(), guard_nonfinite(_PCDUpdate(checked_tau, checked_beta, checked_eps))
    )


class _PCDInit:
    """The ``init`` of :func:`pcd`: a zero EMA (float64, whatever ``dtype``) and no step."""

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> PCDState:
        del dtype  # the EMA is float64, as TorchJD keeps it
        return PCDState(
            torch.zeros(m, dtype=_DTYPE, device=device),
            torch.zeros((), dtype=torch.long, device=device),
        )


class _PCDUpdate:
    """The (unguarded) ``update`` of :func:`pcd`."""

    def __init__(self, tau: float | Tensor, beta: float, eps: float) -> None:
        self.tau = tau
        self.beta = beta
        self.eps = eps

    def __call__(self, gramian: Tensor, state: PCDState, /) -> tuple[Tensor, PCDState]:
        if not isinstance(state, PCDState):
            raise TypeError(f"Expected a PCDState (from `pcd(...).init(m)`), got {state!r}.")
        check_gramian(gramian)
        m = gramian.shape[-1]
        if state.sq_norm_ema.ndim == 0 or state.sq_norm_ema.shape[-1] != m:
            raise ValueError(
                f"PCD's state is for {state.sq_norm_ema.shape[-1:]} losses but the Gramian is for "
                f"{m}: re-initialise the state (`pcd(...).init({m})`)."
            )
        if state.sq_norm_ema.device != gramian.device:
            raise ValueError(
                f"PCD's state is on {state.sq_norm_ema.device} but the Gramian is on "
                f"{gramian.device}: create the state on the Gramian's device, "
                f"`init(m, device={str(gramian.device)!r})`."
            )
        scales, new_state = pcd_scales(gramian, state, beta=self.beta, eps=self.eps)
        return pcd_weights(gramian, scales, tau=self.tau), new_state


class PCDWeighting(GramianWeighting):
    """Weighting of PCD (:func:`pcd`), holding the EMA of the squared gradient norms in
    ``state``; row and column 0 of the Gramian are the primary objective. Not differentiable
    (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        tau: ``τ`` in ``[0, 1]``: the fraction of normalised first-order progress guaranteed to
            each secondary objective; a float, or a 1-D Tensor of ``m − 1`` values.
        beta: Decay of the EMA of the squared gradient norms, in ``[0, 1)``.
        eps: Added to the EMA before its inverse square root; finite, non-negative.

    Each argument is a property that can be set later (checked as here; the EMA is kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import PCDWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = PCDWeighting()
        >>> weighting(J @ J.T), weighting(J @ J.T)
        (tensor([1.8481, 1.0954]), tensor([1.8481, 1.0954]))
        >>> weighting
        PCDWeighting(tau=0.02, beta=0.999, eps=1e-08)
    """

    _differentiable = False
    tau = Hyperparameter[float | Tensor]()
    beta = Hyperparameter[float]()
    eps = Hyperparameter[float]()

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(tau=tau, beta=beta, eps=eps)

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return pcd(**hyperparameters)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return gramian.new_zeros(0)  # as TorchJD, and the state is untouched

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "PCDWeighting":
        # `.to(device)` moves the EMA and a Tensor `tau`; a dtype conversion (`.half()`) changes
        # neither: the EMA stays float64 and `tau` keeps its values (TorchJD's `tau` is not a
        # buffer either; its EMA buffer is rounded to the new dtype, then used in float64).
        tau, state = self.tau, self.state
        super()._apply(fn, recurse)
        if isinstance(tau, Tensor):
            self._set_hyperparameters(tau=tau.to(device=fn(tau).device))
        if isinstance(state, PCDState):
            device = fn(state.n_steps).device
            self.state = PCDState(state.sq_norm_ema.to(device), state.n_steps.to(device))
        return self


class PCD(GramianWeightedAggregator):
    """Priority-Constrained Descent: the first row of the matrix is the primary objective's
    gradient ``g_1``; the update follows it as closely as possible while every other objective
    ``j`` gets at least a fraction ``τ_j`` of the progress of a step along its own normalised
    gradient (:func:`pcd_weights`), rescaled to ``‖g_1‖``. Stateful (EMA of ``‖g_i‖²``,
    ``reset()``); not differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        tau: ``τ`` in ``[0, 1]``: a float, or a 1-D Tensor of ``m − 1`` values.
        beta: Decay of the EMA of the squared gradient norms, in ``[0, 1)``.
        eps: Added to the EMA before its inverse square root; finite, non-negative.

    Each argument is a property that can be set later (checked as here; the EMA is kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import PCD
        >>> aggregator = PCD()
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([-0.8200,  2.9434,  2.9434])
        >>> aggregator
        PCD(tau=0.02, beta=0.999, eps=1e-08)
    """

    _differentiable = False
    gramian_weighting: PCDWeighting
    tau = Delegated[float | Tensor]()
    beta = Delegated[float]()
    eps = Delegated[float]()

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))
