"""Weightings as pairs of pure functions, and the class-style wrappers that hold their state.

A weighting maps a Gramian ``G = J Jᵀ`` ``[m, m]`` to weights ``w`` ``[m]``; the aggregated update
is ``Jᵀw``. Functionally, a weighting is a pair of pure functions, in the shape of Optax's
``GradientTransformation``:

* ``init(m, *, dtype, device) -> state``: the state for ``m`` losses (``EmptyState()`` for
  stateless weightings), a ``NamedTuple`` of tensors;
* ``update(gramian, state) -> (weights, new_state)``: nothing is mutated.

The class-style wrappers (``UPGradWeighting``, ``GradVac``, ...) hold that state explicitly in a
``state`` attribute and call the pure functions.

Non-finite input: every built-in ``update`` is wrapped by :func:`guard_nonfinite`, so a Gramian
with a NaN or an infinity gives NaN weights and returns the state unchanged (a skipped step is as
if it never happened), selected with ``torch.where``: no host synchronisation.
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
    "guard_nonfinite",
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


def nan_if_nonfinite(gramian: Tensor, weights: Tensor) -> Tensor:
    """``weights [..., m]``, NaN wherever the matching Gramian ``[..., m, m]`` is not all finite."""
    finite = gramian.isfinite().all(dim=-1).all(dim=-1, keepdim=True)
    return torch.where(finite, weights, torch.full_like(weights, float("nan")))


def guard_nonfinite(update: UpdateFn) -> UpdateFn:
    """``update`` made safe for non-finite Gramians, without host synchronisation.

    Where a Gramian of the batch ``[..., m, m]`` holds a NaN or an infinity, its weights are NaN;
    if any Gramian of the batch does, every tensor of the returned state is the input state's (the
    state is shared by the batch), as a skipped step of ``GradScaler`` leaves the optimizer.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import gradvac, guard_nonfinite
        >>> weighting = gradvac()
        >>> state = weighting.init(2)
        >>> bad = torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]])
        >>> weights, new_state = weighting.update(bad, state)
        >>> weights, torch.equal(new_state.key, state.key)
        (tensor([nan, nan]), True)
    """

    def guarded(gramian: Tensor, state: Any) -> tuple[Tensor, Any]:
        weights, new_state = update(gramian, state)
        skip = gramian.isfinite().logical_not().any()
        kept = [
            torch.where(skip, old.to(new.dtype), new) if isinstance(new, Tensor) else new
            for old, new in zip(state, new_state, strict=True)
        ]
        return nan_if_nonfinite(gramian, weights), type(new_state)(*kept)

    return guarded


def stateless(kernel: Callable[[Tensor], Tensor]) -> PureWeighting:
    """A :class:`PureWeighting` from a pure kernel ``gramian [..., m, m] -> weights [..., m]``.

    Its ``update`` is guarded (:func:`guard_nonfinite`): non-finite Gramians give NaN weights.
    """

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

    return PureWeighting(init, guard_nonfinite(update))


def _format(value: object) -> str:
    if isinstance(value, Tensor):
        return f"tensor({value.tolist()})"
    return repr(value)


def _describe(tensor: Tensor) -> str:
    return f"{list(tensor.shape)} {tensor.dtype} on {tensor.device}"


def _construct(cls: type["Weighting"], hyperparameters: dict[str, Any]) -> "Weighting":
    """Rebuilds a weighting from its constructor's arguments (what unpickling calls)."""
    return cls(**hyperparameters)


class Weighting(ABC):  # noqa: B024 (abstract by intent: a base without abstract methods)
    """A weighting object: ``weighting(gramian [m, m]) -> weights [m]``, holding its state.

    Subclasses pass the :class:`PureWeighting` they wrap and their constructor arguments by name
    (they make the ``repr`` and rebuild the object when it is unpickled). The state is created
    on the first call, and re-created when the number of losses, the dtype or the device of the
    Gramian changes (as TorchJD's stateful weightings do). It is exposed as ``state`` (a
    NamedTuple of tensors): save it with ``torch.save`` and restore it by assignment, in this or
    in a new object with the same arguments, to continue a run exactly. An assigned state is
    checked against the next Gramian: one for another number of losses, dtype or device raises a
    ``ValueError`` (it is never silently replaced). :meth:`reset` forgets the state. The object
    itself, with its state, can be saved with ``torch.save`` (load it with
    ``torch.load(..., weights_only=False)``).

    Example:
        >>> import io
        >>> import torch
        >>> from torchjd_func.aggregation import GradVacWeighting
        >>> G = torch.tensor([[17.0, -22.0], [-22.0, 38.0]])
        >>> weighting = GradVacWeighting(seed=0)
        >>> first = weighting(G)
        >>> buffer = io.BytesIO()
        >>> torch.save(weighting.state, buffer)
        >>> _ = buffer.seek(0)
        >>> resumed = GradVacWeighting(seed=0)
        >>> resumed.state = torch.load(buffer, weights_only=False)
        >>> torch.equal(resumed(G), weighting(G))
        True
    """

    def __init__(self, pure: PureWeighting, **hyperparameters: object) -> None:
        self.pure = pure
        self._hyperparameters = hyperparameters
        self.state = None

    @property
    def state(self) -> Any:
        """The state of the wrapped :class:`PureWeighting` (``None`` before the first call)."""
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value
        # ``None``: an assigned state, checked against the next Gramian instead of replaced.
        self._signature: tuple[int, torch.dtype, torch.device] | None = None

    def __call__(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        if gramian.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} takes one Gramian [m, m], got shape {list(gramian.shape)}."
                " Use the pure `update` function to weight a batch of Gramians."
            )
        signature = (gramian.shape[0], gramian.dtype, gramian.device)
        state = self._state
        if state is None or (self._signature is not None and signature != self._signature):
            state = self.pure.init(signature[0], dtype=signature[1], device=signature[2])
        elif self._signature is None:
            self._check_assigned(state, signature)
        weights, self.state = self.pure.update(gramian, state)
        self._signature = signature
        return weights

    def _check_assigned(self, state: Any, signature: tuple[int, torch.dtype, torch.device]) -> None:
        """Checks an assigned state against the one ``init`` makes for the Gramian's signature."""
        expected = self.pure.init(signature[0], dtype=signature[1], device=signature[2])
        problem = f"a {type(state).__name__}, expected a {type(expected).__name__}"
        if type(state) is type(expected):
            problem = ""
            for field, have, want in zip(expected._fields, state, expected, strict=True):
                if not isinstance(have, Tensor) or (
                    (have.shape, have.dtype, have.device) != (want.shape, want.dtype, want.device)
                ):
                    got = _describe(have) if isinstance(have, Tensor) else type(have).__name__
                    problem = f"`{field}` is {got}, expected {_describe(want)}"
                    break
        if problem:
            raise ValueError(
                f"The state assigned to {type(self).__name__} does not fit a Gramian for "
                f"{signature[0]} losses in {signature[1]} on {signature[2]}: {problem}. Assign a "
                "state saved from a run with the same number of losses, dtype and device (move "
                "it with `.to(...)` on each tensor), or call `reset()` to start afresh."
            )

    def reset(self) -> None:
        """Forgets the state: the next call behaves like the first one."""
        self.state = None

    def __reduce__(self) -> tuple[Any, ...]:
        # The wrapped PureWeighting is made of closures: rebuild it from the arguments.
        attributes = {k: v for k, v in vars(self).items() if k != "pure"}
        return _construct, (type(self), self._hyperparameters), attributes

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
