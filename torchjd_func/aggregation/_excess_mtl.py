"""ExcessMTL: exponentiated-gradient task weights driven by excess-risk estimates.

He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024,
https://proceedings.mlr.press/v235/he24n.html (Equations 6, 7 and 9, Appendix C.1).

The running sum ``S ← S + J²`` (entrywise) is an AdaGrad-style diagonal Hessian estimate, and
the excess risk of task ``i`` is approximated by

.. math::

    e_i = \\sum_k \\frac{J_{ik}^2}{\\sqrt{S_{ik} + 10^{-7}}}, \\qquad
    w \\leftarrow \\operatorname{softmax}(\\log w + \\eta\\, e / (b + 10^{-7})),

``w₀ = 1/m``, ``η`` the robust step size. During the first ``n_warmup_steps`` calls the weights
stay ``1/m`` and ``e`` is summed; the first call after them sets the baseline ``b`` to the mean
warm-up ``e`` (or, without warm-up, to that call's ``e``, which is then used unscaled, as the
official implementation does). These are TorchJD's rules; every branch is a ``torch.where`` on
0-d tensors of the state, so an update compiles to one graph.

The state holds ``S`` as one tensor ``[m, n]``: the leaves of ``J²`` flattened and concatenated in
sorted leaf-key order (a NamedTuple of tensors, not a TensorDict), in the parameters' dtype
(at least float32). It is as large as the Jacobian, as TorchJD's. Like TorchJD's, the weights
are not differentiable (the Jacobian is detached).
"""

from typing import Any, NamedTuple

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchjd_func._gramian import combine
from torchjd_func.aggregation._base import Hyperparameter, WeightedAggregator
from torchjd_func.aggregation._flat import check_m, ordered_leaves, params_layout
from torchjd_func.aggregation._kinds import (
    JacobianAggregator,
    JacobianWeighting,
    check_jacobian,
    guard_nonfinite_jacobian,
)

__all__ = [
    "ExcessMTL",
    "ExcessMTLState",
    "ExcessMTLWeighting",
    "excess_mtl",
    "excess_mtl_weights",
]

_EPS = 1e-7
"""TorchJD's (and the official implementation's) constant in ``√(S + ε)`` and ``b + ε``."""


class ExcessMTLState(NamedTuple):
    """State of ExcessMTL."""

    weights: Tensor
    """``[m]``: the current weights, ``1/m`` at the start."""
    sq_grad_sum: Tensor
    """``[m, n]``: ``S = Σ J²`` over the calls, leaves flattened in sorted key order."""
    baseline: Tensor
    """``[m]``: the baseline excess risks ``b`` (zeros until set)."""
    warmup_sum: Tensor
    """``[m]``: the sum of the excess risks seen during the warm-up."""
    has_baseline: Tensor
    """``[]`` bool: whether ``b`` is set."""
    step: Tensor
    """``[]`` int64: the number of calls so far."""


def check_step_size(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`robust_step_size` must be a float, got {type(value).__name__}.")
    if not 0 < value < float("inf"):
        raise ValueError(f"`robust_step_size` must be positive and finite, got {value!r}.")
    return float(value)


def check_warmup(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`n_warmup_steps` must be an int, got {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"`n_warmup_steps` must be non-negative, got {value}.")
    return value


def init_excess_mtl(
    m: int, n: int, *, dtype: torch.dtype, device: torch.device | str | None
) -> ExcessMTLState:
    """The initial :class:`ExcessMTLState` for ``m`` losses of parameters with ``n`` entries."""
    check_m(m)
    return ExcessMTLState(
        weights=torch.full((m,), 1.0 / m, dtype=dtype, device=device),
        sq_grad_sum=torch.zeros(m, n, dtype=dtype, device=device),
        baseline=torch.zeros(m, dtype=dtype, device=device),
        warmup_sum=torch.zeros(m, dtype=dtype, device=device),
        has_baseline=torch.zeros((), dtype=torch.bool, device=device),
        step=torch.zeros((), dtype=torch.int64, device=device),
    )


def excess_mtl_weights(
    jacobian: TensorDictBase,
    state: ExcessMTLState,
    *,
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 0,
) -> tuple[Tensor, ExcessMTLState]:
    """ExcessMTL's weights and new state for one Jacobian.

    Args:
        jacobian: A Jacobian TensorDict, ``batch_size [m]``.
        state: The :class:`ExcessMTLState` (from ``excess_mtl().init(params, m)``).
        robust_step_size: The step size ``η`` of the exponentiated update, positive.
        n_warmup_steps: Calls during which the weights stay ``1/m`` (statistics collected).

    Returns:
        ``(weights [m], new state)``, weights in the state's dtype.

    Raises:
        TypeError: ``jacobian`` is not a Jacobian TensorDict, or ``state`` not an
            :class:`ExcessMTLState`.
        ValueError: the state is for another number of losses or parameter entries, or on
            another device.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import excess_mtl, excess_mtl_weights
        >>> J = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> state = excess_mtl().init(J, 2)
        >>> weights, state = excess_mtl_weights(J, state)
        >>> weights
        tensor([0.1192, 0.8808])
    """
    check_jacobian(jacobian)
    if not isinstance(state, ExcessMTLState):
        raise TypeError(f"Expected an ExcessMTLState (from `excess_mtl().init`), got {state!r}.")
    m = jacobian.batch_size[0]
    found = [value for _, value in ordered_leaves(jacobian)]
    n = sum(value.shape[1:].numel() for value in found)
    if state.sq_grad_sum.shape != (m, n):
        raise ValueError(
            f"ExcessMTL's state is for {list(state.sq_grad_sum.shape)} (losses, parameter "
            f"entries) but the Jacobian is for [{m}, {n}]: re-initialise the state with "
            "`init(params, m)`."
        )
    device = found[0].device
    if state.sq_grad_sum.device != device:
        raise ValueError(
            f"ExcessMTL's state is on {state.sq_grad_sum.device} but the Jacobian is on {device}:"
            " create the state from parameters on the Jacobian's device."
        )
    dtype = state.sq_grad_sum.dtype
    squares = torch.cat([value.detach().to(dtype).reshape(m, -1) for value in found], dim=1) ** 2
    sq_grad_sum = state.sq_grad_sum + squares
    excess = (squares / torch.sqrt(sq_grad_sum + _EPS)).sum(dim=1)

    warming = state.step < n_warmup_steps
    first = warming.logical_not() & state.has_baseline.logical_not()
    if n_warmup_steps > 0:
        baseline = torch.where(first, state.warmup_sum / n_warmup_steps, state.baseline)
        scaled = excess / (baseline + _EPS)
    else:
        baseline = torch.where(first, excess, state.baseline)
        scaled = torch.where(first, excess, excess / (baseline + _EPS))
    # In log space, so that a huge excess risk saturates the weights instead of overflowing.
    stepped = torch.softmax(torch.log(state.weights) + robust_step_size * scaled, dim=0)
    weights = torch.where(warming, state.weights, stepped)
    new_state = ExcessMTLState(
        weights=weights,
        sq_grad_sum=sq_grad_sum,
        baseline=baseline,
        warmup_sum=torch.where(warming, state.warmup_sum + excess, state.warmup_sum),
        has_baseline=state.has_baseline | warming.logical_not(),
        step=state.step + 1,
    )
    return weights, new_state


def excess_mtl(
    robust_step_size: float = 1.0, n_warmup_steps: int = 0
) -> JacobianAggregator[ExcessMTLState]:
    """ExcessMTL as a :class:`~torchjd_func.aggregation.JacobianAggregator` whose state is an
    :class:`ExcessMTLState`; the update is ``Jᵀw`` (see :func:`excess_mtl_weights`).

    Args:
        robust_step_size: The step size ``η`` of the exponentiated update, positive.
        n_warmup_steps: Calls during which the weights stay ``1/m``, non-negative.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import excess_mtl
        >>> J = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> aggregator = excess_mtl()
        >>> update, weights, state = aggregator.update(J, aggregator.init(J, 2))
        >>> update["w"]
        tensor([4.8080, 1.0000, 1.0000])
    """
    step_size = check_step_size(robust_step_size)
    warmup = check_warmup(n_warmup_steps)
    return JacobianAggregator(
        _ExcessMTLInit(), guard_nonfinite_jacobian(_ExcessMTLUpdate(step_size, warmup))
    )


class _ExcessMTLInit:
    """The ``init`` of :func:`excess_mtl`."""

    def __call__(self, params: TensorDictBase, m: int, /) -> ExcessMTLState:
        n, dtype, device = params_layout(params)
        return init_excess_mtl(m, n, dtype=dtype, device=device)


class _ExcessMTLUpdate:
    """The (unguarded) ``update`` of :func:`excess_mtl`."""

    def __init__(self, robust_step_size: float, n_warmup_steps: int) -> None:
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps

    def __call__(
        self, jacobian: TensorDictBase, state: ExcessMTLState, /
    ) -> tuple[TensorDict, Tensor | None, ExcessMTLState]:
        weights, new_state = excess_mtl_weights(
            jacobian,
            state,
            robust_step_size=self.robust_step_size,
            n_warmup_steps=self.n_warmup_steps,
        )
        return combine(jacobian, weights), weights, new_state


class ExcessMTLWeighting(JacobianWeighting):
    """Weighting ``[m, n] -> [m]`` of ExcessMTL (:func:`excess_mtl_weights`), taking the matrix
    ``J`` (not its Gramian) and holding an :class:`ExcessMTLState` in ``state`` (re-created when
    ``m``, ``n``, the dtype or the device change, as TorchJD's); not differentiable (runs under
    ``torch.no_grad()``), as in TorchJD.

    Args:
        robust_step_size: The step size ``η`` of the exponentiated update, positive.
        n_warmup_steps: Calls during which the weights stay ``1/m``, non-negative.

    Each argument is a property that can be set later (checked as here; the state is kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import ExcessMTLWeighting
        >>> weighting = ExcessMTLWeighting()
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting(J), weighting(J)
        (tensor([0.1192, 0.8808]), tensor([0.1192, 0.8808]))
        >>> weighting
        ExcessMTLWeighting(robust_step_size=1.0, n_warmup_steps=0)
    """

    _differentiable = False
    robust_step_size = Hyperparameter[float]()
    n_warmup_steps = Hyperparameter[int]()

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(robust_step_size=robust_step_size, n_warmup_steps=n_warmup_steps)

    def _build(self, **hyperparameters: Any) -> JacobianAggregator[Any]:
        return excess_mtl(**hyperparameters)


class ExcessMTL(WeightedAggregator):
    """Aggregator ``J ↦ Jᵀw`` with ExcessMTL's weights ``w`` (:class:`ExcessMTLWeighting`, in
    ``weighting``); stateful (``state``, ``reset()``); not differentiable (runs under
    ``torch.no_grad()``), as in TorchJD.

    Args:
        robust_step_size: The step size ``η`` of the exponentiated update, positive.
        n_warmup_steps: Calls during which the weights stay ``1/m``, non-negative.

    Each argument is a property that can be set later (checked as here; the state is kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import ExcessMTL
        >>> aggregator = ExcessMTL()
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([4.8080, 1.0000, 1.0000])
        >>> aggregator
        ExcessMTL(robust_step_size=1.0, n_warmup_steps=0)
    """

    _differentiable = False
    weighting: ExcessMTLWeighting

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))

    @property
    def robust_step_size(self) -> float:
        """The step size of the exponentiated update (the weighting's)."""
        return self.weighting.robust_step_size

    @robust_step_size.setter
    def robust_step_size(self, value: float) -> None:
        self.weighting.robust_step_size = value

    @property
    def n_warmup_steps(self) -> int:
        """The number of warm-up calls (the weighting's)."""
        return self.weighting.n_warmup_steps

    @n_warmup_steps.setter
    def n_warmup_steps(self, value: int) -> None:
        self.weighting.n_warmup_steps = value

    def __repr__(self) -> str:
        return f"ExcessMTL({self.weighting.extra_repr()})"
