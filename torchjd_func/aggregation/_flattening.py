"""Flattening: a weighting of generalized Gramians ``[*s, *reversed(s)]`` from a square one."""

from typing import Any

from torch import Tensor

from torchjd_func._gramian import flatten_gramian, reshape_weights
from torchjd_func.aggregation._base import Weighting

__all__ = ["Flattening"]


class Flattening(Weighting):
    """Applies a weighting to a generalized Gramian, through its square ``[M, M]`` form.

    For losses of shape ``s`` (e.g. ``[B, m]`` per sample and per task), the generalized Gramian
    ``[*s, *reversed(s)]`` is flattened to ``[M, M]`` (``M = prod(s)``, rows in
    ``losses.flatten()`` order), weighted, and the weights ``[M]`` are reshaped to ``s``, ready
    for ``losses.backward(weights)`` or :func:`torchjd_func.combine`. A square ``[m, m]`` Gramian
    gives weights ``[m]``, as the wrapped weighting would.

    Args:
        weighting: The weighting of square Gramians to apply.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Flattening, UPGradWeighting
        >>> J = torch.randn(16, 2, 5)  # per-sample, per-task gradients
        >>> generalized = torch.einsum("abk,dck->abcd", J, J)  # [16, 2, 2, 16]
        >>> Flattening(UPGradWeighting())(generalized).shape
        torch.Size([16, 2])
    """

    def __init__(self, weighting: Weighting) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"Flattening wraps a Weighting, got {type(weighting).__name__}.")
        super().__init__()
        self.weighting = weighting

    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        if not isinstance(generalized_gramian, Tensor):
            raise TypeError(f"Expected a Gramian Tensor, got {type(generalized_gramian).__name__}.")
        square = flatten_gramian(generalized_gramian)
        loss_shape = generalized_gramian.shape[: generalized_gramian.ndim // 2]
        return reshape_weights(self.weighting(square), loss_shape)

    @property
    def state(self) -> Any:
        """The state of the wrapped weighting."""
        return getattr(self.weighting, "state", None)

    @state.setter
    def state(self, value: Any) -> None:
        self.weighting.state = value

    def reset(self) -> None:
        """Resets the wrapped weighting."""
        self.weighting.reset()

    def __repr__(self) -> str:
        return f"Flattening({self.weighting!r})"
