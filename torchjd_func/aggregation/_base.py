"""Weightings as pairs of pure functions, and the class-style wrappers that hold their state.

A weighting maps a Gramian ``G = J Jᵀ`` ``[m, m]`` to weights ``w`` ``[m]``; the aggregated update
is ``Jᵀw``. Functionally, a weighting is a pair of pure functions, in the shape of Optax's
``GradientTransformation``:

* ``init(m, *, dtype, device) -> state``: the state for ``m`` losses (``EmptyState()`` for
  stateless weightings), a ``NamedTuple`` of tensors;
* ``update(gramian, state) -> (weights, new_state)``: nothing is mutated.

The class-style wrappers (``UPGradWeighting``, ``GradVac``, ...) hold that state explicitly in a
``state`` attribute and call the pure functions.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "Aggregator",
    "EmptyState",
    "GramianWeightedAggregator",
    "InitFn",
    "PureWeighting",
    "UpdateFn",
    "Weighting",
    "check_gramian",
    "stateless",
]


class EmptyState(NamedTuple):
    """The state of a stateless weighting."""


class InitFn(Protocol):
    """``init(m, *, dtype, device) -> state``."""

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Any: ...


class UpdateFn(Protocol):
    """``update(gramian [..., m, m], state) -> (weights [..., m], new_state)``."""

    def __call__(self, gramian: Tensor, state: Any) -> tuple[Tensor, Any]: ...


class PureWeighting(NamedTuple):
    """A weighting as a pair of pure functions ``(init, update)``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import upgrad
        >>> weighting = upgrad()
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> state = weighting.init(2)
        >>> weights, state = weighting.update(J @ J.T, state)
        >>> weights
        tensor([1.1109, 0.7894])
    """

    init: InitFn
    update: UpdateFn


def check_gramian(gramian: object, m: int | None = None) -> Tensor:
    """Checks that ``gramian`` is a floating-point ``[..., m, m]`` tensor (static checks only).

    Raises:
        TypeError: not a floating-point Tensor.
        ValueError: not square in its last two dims, empty, or not of size ``m`` when given.
    """
    if not isinstance(gramian, Tensor):
        raise TypeError(f"Expected a Gramian Tensor [m, m], got {type(gramian).__name__}.")
    if not gramian.is_floating_point():
        raise TypeError(f"Expected a floating-point Gramian, got dtype {gramian.dtype}.")
    if gramian.ndim < 2 or gramian.shape[-1] != gramian.shape[-2]:
        raise ValueError(
            f"Expected a square Gramian [..., m, m], got shape {list(gramian.shape)}. For a "
            "generalized Gramian [*s, *reversed(s)], use `Flattening` or `flatten_gramian`."
        )
    if gramian.shape[-1] == 0:
        raise ValueError("The Gramian is empty (m = 0): there is no loss to weight.")
    if m is not None and gramian.shape[-1] != m:
        raise ValueError(
            f"The Gramian is for {gramian.shape[-1]} losses but this weighting was set up for {m}."
        )
    return gramian


def stateless(kernel: Callable[[Tensor], Tensor]) -> PureWeighting:
    """A :class:`PureWeighting` from a pure kernel ``gramian [..., m, m] -> weights [..., m]``."""

    def init(
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> EmptyState:
        del m, dtype, device
        return EmptyState()

    def update(gramian: Tensor, state: Any) -> tuple[Tensor, EmptyState]:
        if not isinstance(state, EmptyState):
            raise TypeError(f"Expected the EmptyState of a stateless weighting, got {state!r}.")
        return kernel(check_gramian(gramian)), state

    return PureWeighting(init, update)


def _format(value: object) -> str:
    if isinstance(value, Tensor):
        return f"tensor({value.tolist()})"
    return repr(value)


class Weighting(ABC):  # noqa: B024 (abstract by intent: a base without abstract methods)
    """A weighting object: ``weighting(gramian [m, m]) -> weights [m]``, holding its state.

    Subclasses pass the :class:`PureWeighting` they wrap and their constructor arguments (for
    ``repr``). The state is created on the first call, and re-created when the number of losses,
    the dtype or the device of the Gramian changes (as TorchJD's stateful weightings do). It is
    exposed as ``state`` (a NamedTuple of tensors: save it with ``torch.save``, restore it by
    assignment), and :meth:`reset` forgets it.
    """

    def __init__(self, pure: PureWeighting, **hyperparameters: object) -> None:
        self.pure = pure
        self.state: Any = None
        self._hyperparameters = hyperparameters
        self._signature: tuple[int, torch.dtype, torch.device] | None = None

    def __call__(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        if gramian.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} takes one Gramian [m, m], got shape {list(gramian.shape)}."
                " Use the pure `update` function to weight a batch of Gramians."
            )
        signature = (gramian.shape[0], gramian.dtype, gramian.device)
        if self.state is None or signature != self._signature:
            self.state = self.pure.init(signature[0], dtype=signature[1], device=signature[2])
            self._signature = signature
        weights, self.state = self.pure.update(gramian, self.state)
        return weights

    def reset(self) -> None:
        """Forgets the state: the next call behaves like the first one."""
        self.state = None
        self._signature = None

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={_format(v)}" for k, v in self._hyperparameters.items())
        return f"{type(self).__name__}({arguments})"


class Aggregator(ABC):
    """An aggregator: ``aggregator(matrix [m, n]) -> vector [n]``, one row per loss."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        if not isinstance(matrix, Tensor):
            raise TypeError(f"Expected a matrix Tensor [m, n], got {type(matrix).__name__}.")
        if matrix.ndim != 2:
            raise ValueError(
                f"An aggregator takes a matrix [m, n] (one row per loss), got shape "
                f"{list(matrix.shape)}."
            )
        if matrix.shape[0] == 0:
            raise ValueError("The matrix has no row: there is no loss to aggregate.")
        return self._aggregate(matrix)

    @abstractmethod
    def _aggregate(self, matrix: Tensor) -> Tensor:
        """The aggregation of a validated matrix ``[m, n]``."""

    def reset(self) -> None:  # noqa: B027 (a default hook: stateless aggregators keep it)
        """Forgets the state of a stateful aggregator (no-op otherwise)."""


class GramianWeightedAggregator(Aggregator):
    """The aggregator ``A(J) = W(J Jᵀ)ᵀ J`` of a Gramian weighting ``W``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import GramianWeightedAggregator, UPGradWeighting
        >>> aggregator = GramianWeightedAggregator(UPGradWeighting())
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.2929, 1.9004, 1.9004])
    """

    def __init__(self, weighting: Weighting) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"Expected a Weighting, got {type(weighting).__name__}.")
        self.weighting = weighting

    def _aggregate(self, matrix: Tensor) -> Tensor:
        weights = self.weighting(matrix @ matrix.T)
        return weights.to(matrix.dtype) @ matrix

    def reset(self) -> None:
        self.weighting.reset()

    def __repr__(self) -> str:
        weighting = repr(self.weighting)
        if type(self) is GramianWeightedAggregator:
            return f"GramianWeightedAggregator({weighting})"
        return weighting.replace("Weighting(", "(", 1)
