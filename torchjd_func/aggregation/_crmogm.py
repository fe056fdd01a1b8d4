"""CR-MOGM: an exponential moving average of another weighting's weights.

Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond",
NeurIPS 2022,
https://proceedings.neurips.cc/paper_files/paper/2022/file/f91bd64a3620aad8e70a27ad9cb3ca57-Paper-Conference.pdf.
With ``λ̂_k`` the wrapped weighting's weights at step ``k``:

.. math::

    \\lambda_k = \\alpha\\, \\lambda_{k-1} + (1 - \\alpha)\\, \\hat\\lambda_k,

``λ_0 = initial_weights`` if given, else ``λ̂_1`` (so the first output is ``λ̂_1``, whatever
``α``). The state, a :class:`CRMOGMState`, holds the wrapped weighting's state (``inner``), the
previous weights and whether there are any yet (a flag, not Python control flow, so that the
first and later steps are the same compiled graph).
"""

from typing import Any, Generic, NamedTuple

import torch
from torch import Tensor

from torchjd_func.aggregation._base import (
    GramianWeighting,
    Hyperparameter,
    InitFn,
    PureWeighting,
    S,
    UpdateFn,
    check_gramian,
    guard_nonfinite,
)
from torchjd_func.aggregation._constant import check_vector
from torchjd_func.aggregation._upgrad import check_eps

__all__ = ["CRMOGMState", "CRMOGMWeighting", "crmogm"]


class CRMOGMState(NamedTuple, Generic[S]):
    """State of CR-MOGM."""

    inner: S
    """The wrapped weighting's state (``EmptyState()`` for a stateless one)."""
    weights: Tensor
    """``[m]``: the previous weights ``λ_{k−1}`` (meaningful once ``started``), detached."""
    started: Tensor
    """``[]`` bool: whether ``weights`` holds ``λ_{k−1}`` (``initial_weights`` count)."""


def _check_alpha(alpha: object) -> float:
    value = check_eps(alpha, "alpha")
    if value > 1:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    return value


def crmogm(
    inner: PureWeighting[S], alpha: float = 0.9, initial_weights: Tensor | None = None
) -> PureWeighting[CRMOGMState[S]]:
    """CR-MOGM's smoothing of the weighting ``inner``, as a :class:`PureWeighting`.

    Args:
        inner: The weighting whose weights are smoothed (stateful or not).
        alpha: The weight of the previous weights, in ``[0, 1]``: ``0`` returns ``inner``'s
            weights, ``1`` freezes the first ones.
        initial_weights: ``λ_0`` ``[m]``; ``None``: the first weights of ``inner``.

    Non-finite Gramian: NaN weights, state unchanged (``inner``'s too). Weights of ``inner``
    that are not finite (for a finite Gramian) are returned, and not averaged into the state.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import crmogm, gradvac
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = crmogm(gradvac(), alpha=0.5)
        >>> state = weighting.init(2)
        >>> first, state = weighting.update(J @ J.T, state)
        >>> second, state = weighting.update(J @ J.T, state)
        >>> first, second
        (tensor([2.2222, 1.5789]), tensor([2.0401, 1.4927]))
    """
    if not isinstance(inner, PureWeighting):
        raise TypeError(
            f"crmogm wraps a PureWeighting (e.g. `crmogm(upgrad())`), got {type(inner).__name__}."
        )
    checked = _check_alpha(alpha)
    if initial_weights is not None:
        check_vector(initial_weights, "initial_weights")
    return PureWeighting(
        _CRMOGMInit(inner.init, initial_weights),
        guard_nonfinite(_CRMOGMUpdate(inner.update, checked)),
    )


class _CRMOGMInit(Generic[S]):
    """The ``init`` of :func:`crmogm` (an object, not a closure, so that it pickles)."""

    def __init__(self, inner: InitFn[S], initial_weights: Tensor | None) -> None:
        self.inner = inner
        self.initial_weights = initial_weights

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> CRMOGMState[S]:
        inner = self.inner(m, dtype=dtype, device=device)
        if self.initial_weights is None:
            weights = torch.zeros(m, dtype=dtype, device=device)
        elif self.initial_weights.shape != (m,):
            raise ValueError(
                f"`initial_weights` has shape {tuple(self.initial_weights.shape)}, expected "
                f"({m},): give one initial weight per loss."
            )
        else:
            weights = self.initial_weights.detach().to(dtype=dtype, device=device, copy=True)
        started = torch.tensor(self.initial_weights is not None, device=device)
        return CRMOGMState(inner, weights, started)


class _CRMOGMUpdate(Generic[S]):
    """The (unguarded) ``update`` of :func:`crmogm`."""

    def __init__(self, inner: UpdateFn[S], alpha: float) -> None:
        self.inner = inner
        self.alpha = alpha

    def __call__(self, gramian: Tensor, state: CRMOGMState[S], /) -> tuple[Tensor, CRMOGMState[S]]:
        if not isinstance(state, CRMOGMState):
            raise TypeError(
                f"Expected a CRMOGMState (from `crmogm(...).init(m)`), got {type(state).__name__}."
            )
        m = check_gramian(gramian).shape[-1]
        if state.weights.shape[-1] != m:
            raise ValueError(
                f"The number of objectives changed from {state.weights.shape[-1]} to {m}: start "
                "a new state (`init(m)`; `reset()` on a CRMOGMWeighting) for another number of "
                "losses."
            )
        estimate, inner = self.inner(gramian, state.inner)
        previous = torch.where(state.started, state.weights.to(estimate.dtype), estimate)
        weights = self.alpha * previous + (1.0 - self.alpha) * estimate
        # Weights that are not finite are not averaged into the state: they would stay forever.
        usable = estimate.isfinite().all()
        kept = torch.where(usable, weights.detach().to(state.weights.dtype), state.weights)
        return weights, CRMOGMState(inner, kept, state.started | usable)


class CRMOGMWeighting(GramianWeighting):
    """Weighting smoothing the weights of another one with CR-MOGM's moving average.

    It wraps a class weighting of this package (``UPGradWeighting()``, ``GradVacWeighting()``,
    ``GramianWeighting(pure)``, ...) and runs ``crmogm(weighting.pure, alpha, initial_weights)``:
    its ``state``, a :class:`CRMOGMState`, holds the wrapped weighting's state in ``inner`` (the
    wrapped object's own ``state`` is not used, and its forward hooks do not run). Its weights
    require grad when the wrapped weighting's do (as in TorchJD); the stored weights are
    detached.

    Args:
        weighting: The wrapped :class:`GramianWeighting`; setting one of its hyperparameters
            takes effect at the next call, and assigning another weighting restarts the wrapped
            state (keeping the previous weights).
        alpha: The weight of the previous weights, in ``[0, 1]``.
        initial_weights: ``λ_0`` ``[m]``; ``None``: the first weights of ``weighting``.

    ``alpha`` and ``initial_weights`` are properties that can be set later (checked as here;
    ``initial_weights`` is used at the next start, after :meth:`reset`). As in TorchJD,
    :meth:`reset` resets the wrapped weighting too, and a Gramian for another number of losses
    raises a ``ValueError`` (call :meth:`reset` first). A change of dtype or device restarts the
    state (TorchJD keeps the previous weights).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import CRMOGMWeighting, GradVacWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = CRMOGMWeighting(GradVacWeighting(seed=0), alpha=0.5)
        >>> weighting(J @ J.T), weighting(J @ J.T)
        (tensor([2.2222, 1.5789]), tensor([2.0401, 1.4927]))
        >>> weighting.state.inner.targets.shape
        torch.Size([2, 2])
    """

    alpha = Hyperparameter[float]()
    initial_weights = Hyperparameter[Tensor | None]()
    weighting: GramianWeighting

    def __init__(
        self, weighting: GramianWeighting, alpha: float = 0.9, initial_weights: Tensor | None = None
    ) -> None:
        super().__init__(weighting=weighting, alpha=alpha, initial_weights=initial_weights)
        self.weighting = weighting

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        weighting = hyperparameters["weighting"]
        if not isinstance(weighting, GramianWeighting):
            raise TypeError(
                "CRMOGMWeighting wraps a GramianWeighting of this package (e.g. "
                f"`CRMOGMWeighting(UPGradWeighting())`), got {type(weighting).__name__}."
            )
        return crmogm(weighting.pure, hyperparameters["alpha"], hyperparameters["initial_weights"])

    def _follow_the_wrapped_weighting(self) -> None:
        """Rebuilds after the wrapped weighting changed (another object, or new hyperparameters)."""
        wrapped = self.weighting
        init = self.pure.init
        assert isinstance(init, _CRMOGMInit)
        if wrapped is not self._hyperparameters["weighting"]:
            self._set_hyperparameters(weighting=wrapped)
            state = self._state
            if isinstance(state, CRMOGMState):
                fresh = wrapped.pure.init(
                    state.weights.shape[-1], dtype=state.weights.dtype, device=state.weights.device
                )
                self.state = state._replace(inner=fresh)
        elif init.inner is not wrapped.pure.init:
            self._set_hyperparameters()

    def forward(self, gramian: Tensor, /) -> Tensor:
        self._follow_the_wrapped_weighting()
        state = self._state
        if (
            isinstance(state, CRMOGMState)
            and self._signature is not None
            and isinstance(gramian, Tensor)
            and gramian.ndim == 2
            and gramian.shape[-1] not in (0, state.weights.shape[-1])
        ):
            raise ValueError(
                f"The number of objectives changed from {state.weights.shape[-1]} to "
                f"{gramian.shape[-1]}. Call `reset()` before changing the number of objectives."
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.weighting._differentiable):
            return super().forward(gramian)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return self.weighting._weights_for_no_loss(gramian)

    def _state_template(self) -> Any:
        return CRMOGMState(self.weighting._state_template(), torch.zeros(0), torch.tensor(False))

    def reset(self) -> None:
        """Forgets the state, the wrapped weighting's included: the next call is a first one."""
        super().reset()
        self.weighting.reset()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha!r}, initial_weights={self.initial_weights!r}"
