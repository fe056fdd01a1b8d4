"""The class front door of the cross-Gramian weightings (MoDo, SDMGrad)."""

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from torchjd_func.aggregation._base import Weighting, _gramian_of, _PureHolder, check_gramian
from torchjd_func.aggregation._kinds import CrossWeighting

__all__ = ["CrossGramianWeighting"]


class CrossGramianWeighting(_PureHolder, Weighting):
    """A weighting of cross-Gramians ``A = J₁ J₂ᵀ`` ``[m, m] -> [m]`` that wraps a
    :class:`~torchjd_func.aggregation.CrossWeighting` and holds its state, as
    :class:`~torchjd_func.aggregation.GramianWeighting` does for a ``PureWeighting`` (created on
    the first call, re-created when ``m``, the dtype or the device change, checked when assigned,
    in ``state_dict()``, moved by ``.to(...)``).

    ``A`` comes from two independent batches (:func:`~torchjd_func.aggregation.cross_gramian`):
    ``GramianWeightedAggregator(weighting)`` would feed it the single-batch ``J Jᵀ`` instead, so
    it is refused with a ``TypeError``. Apply the weights with :func:`~torchjd_func.combine`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import CrossGramianWeighting, modo
        >>> weighting = CrossGramianWeighting(modo())
        >>> A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
        >>> weighting(A), weighting(A)
        (tensor([1., 0.]), tensor([0., 1.]))
    """

    _kind_name: ClassVar[str] = "CrossWeighting (e.g. `modo()`)"
    pure: CrossWeighting[Any]

    def __init__(self, pure: CrossWeighting[Any] | None = None, /, **hyperparameters: Any) -> None:
        super().__init__()
        self._init_holder(pure, hyperparameters)

    def _fresh(self, signature: tuple[Any, ...]) -> Any:
        m, dtype, device = signature
        return self.pure.init(m, dtype=dtype, device=device)

    def _state_template(self) -> Any:
        return self.pure.init(1)

    def forward(self, cross_gramian: Tensor, /) -> Tensor:
        if (
            isinstance(cross_gramian, Tensor)
            and cross_gramian.is_floating_point()
            and cross_gramian.shape == (0, 0)
        ):
            raise ValueError(
                f"{type(self).__name__} got a cross-Gramian for 0 losses: its weights are not "
                "defined without a loss (TorchJD raises too). Aggregate at least one loss."
            )
        check_gramian(cross_gramian)
        if cross_gramian.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} takes one cross-Gramian [m, m], got shape "
                f"{list(cross_gramian.shape)}. Use the pure `update` function to weight a batch."
            )
        signature = (cross_gramian.shape[0], cross_gramian.dtype, cross_gramian.device)
        describe = f"a cross-Gramian for {signature[0]} losses in {signature[1]} on {signature[2]}"
        state = self._state_for(signature, describe)
        weights: Tensor
        weights, new_state = self.pure.update(cross_gramian, state)
        self._store(new_state, signature)
        return weights

    def __lshift__(self, fn: Callable[[Tensor], Tensor]) -> Weighting:
        if fn is _gramian_of:
            raise TypeError(
                f"{type(self).__name__} weights the cross-Gramian A = J₁J₂ᵀ of two independent "
                "batches, but GramianWeightedAggregator would feed it the Gramian J Jᵀ of one "
                "batch (a biased estimate). Compute `A = cross_gramian(jac_1, jac_2)`, call "
                "the weighting on it, and apply the weights with `combine(jac, weights)`."
            )
        return super().__lshift__(fn)


CrossGramianWeighting._pure_types = (CrossWeighting,)
