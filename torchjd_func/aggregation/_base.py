"""Weightings as pairs of pure functions, and the class-style wrappers that hold their state.

A weighting maps a Gramian ``G = J Jᵀ`` ``[m, m]`` to weights ``w`` ``[m]``; the aggregated update
is ``Jᵀw``. Functionally, a weighting is a pair of pure functions, in the shape of Optax's
``GradientTransformation``:

* ``init(m, *, dtype, device) -> state``: the state for ``m`` losses (``EmptyState()`` for
  stateless weightings), a ``NamedTuple`` of tensors;
* ``update(gramian, state) -> (weights, new_state)``: nothing is mutated.

The class front door follows TorchJD's hierarchy, as ``nn.Module``s: :class:`Weighting` (with
``<<``), :class:`GramianWeighting` (wraps a ``PureWeighting``, holds its state explicitly in a
``state`` attribute, hyperparameters as validated settable properties), :class:`Aggregator`,
:class:`WeightedAggregator` and :class:`GramianWeightedAggregator` (``.weighting`` takes the
matrix, ``.gramian_weighting`` the Gramian).

Non-finite input: every built-in ``update`` is wrapped by :func:`guard_nonfinite`, so a Gramian
with a NaN or an infinity gives NaN weights and returns the state unchanged (a skipped step is as
if it never happened), selected with ``torch.where``: no host synchronisation.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar, overload

import torch
from torch import Tensor, nn

__all__ = [
    "Aggregator",
    "Delegated",
    "EmptyState",
    "GramianWeightedAggregator",
    "GramianWeighting",
    "Hyperparameter",
    "InitFn",
    "PureWeighting",
    "UpdateFn",
    "WeightedAggregator",
    "Weighting",
    "check_gramian",
    "guard_nonfinite",
    "stateless",
]


class EmptyState(NamedTuple):
    """The state of a stateless weighting."""


S = TypeVar("S", bound=tuple[object, ...])
"""The state type of a weighting: a ``NamedTuple`` of tensors (``EmptyState``, ``GradVacState``)."""
_S_co = TypeVar("_S_co", bound=tuple[object, ...], covariant=True)


class InitFn(Protocol[_S_co]):
    """``init(m, *, dtype, device) -> state``."""

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> _S_co: ...


class UpdateFn(Protocol[S]):
    """``update(gramian [..., m, m], state) -> (weights [..., m], new_state)``."""

    def __call__(self, gramian: Tensor, state: S, /) -> tuple[Tensor, S]: ...


class PureWeighting(NamedTuple, Generic[S]):
    """A weighting as a pair of pure functions ``(init, update)``, generic in its state type.

    ``upgrad()`` is a ``PureWeighting[EmptyState]``, ``gradvac()`` a
    ``PureWeighting[GradVacState]``: a type checker follows the state from ``init`` through
    ``update`` to a step's output.

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

    init: InitFn[S]
    update: UpdateFn[S]


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


def guard_nonfinite(update: UpdateFn[S]) -> UpdateFn[S]:
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

    return _Guarded(update)


def stateless(kernel: Callable[[Tensor], Tensor]) -> PureWeighting[EmptyState]:
    """A :class:`PureWeighting` from a pure kernel ``gramian [..., m, m] -> weights [..., m]``.

    Its ``update`` is guarded (:func:`guard_nonfinite`): non-finite Gramians give NaN weights.
    """

    return PureWeighting(_StatelessInit(), guard_nonfinite(_StatelessUpdate(kernel)))


# The functions of the built-in weightings are small callable objects rather than closures, so
# that a PureWeighting, and a class weighting wrapping one, can be pickled.


class _Guarded(Generic[S]):
    """The update of :func:`guard_nonfinite`."""

    def __init__(self, update: UpdateFn[S]) -> None:
        self.update = update

    def __call__(self, gramian: Tensor, state: S, /) -> tuple[Tensor, S]:
        weights, new_state = self.update(gramian, state)
        skip = gramian.isfinite().logical_not().any()
        return nan_if_nonfinite(gramian, weights), _keep_where(skip, state, new_state)


def is_state(value: object) -> bool:
    """Whether ``value`` is a state: a ``NamedTuple`` (of tensors, or of nested states)."""
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _keep_where(skip: Tensor, old: Any, new: Any) -> Any:
    """``new`` with each tensor replaced by ``old``'s where ``skip``, into nested states (a
    wrapping weighting's state holds the wrapped one's, e.g. ``CRMOGMState.inner``)."""
    if isinstance(new, Tensor) and isinstance(old, Tensor):
        return torch.where(skip, old.to(new.dtype), new)
    if is_state(new) and type(old) is type(new):
        # Rebuilt field by field, a NamedTuple keeps its type.
        return type(new)(*(_keep_where(skip, o, n) for o, n in zip(old, new, strict=True)))
    return new


def map_state(fn: Callable[[Tensor], Tensor], state: Any) -> Any:
    """``state`` with ``fn`` applied to each of its tensors, into nested states."""
    if isinstance(state, Tensor):
        return fn(state)
    if is_state(state):
        return type(state)(*(map_state(fn, value) for value in state))
    return state


def _state_mismatch(have: Any, want: Any, path: str) -> str:
    """``""`` if ``have`` has the structure, shapes, dtypes and devices of ``want``, else what
    differs (``path``: the dotted field name, ``""`` at the top)."""
    if is_state(want):
        if type(have) is not type(want):
            where = f"`{path}` is " if path else ""
            return f"{where}a {type(have).__name__}, expected a {type(want).__name__}"
        for field, have_value, want_value in zip(want._fields, have, want, strict=True):
            problem = _state_mismatch(have_value, want_value, f"{path}.{field}" if path else field)
            if problem:
                return problem
        return ""
    if not isinstance(have, Tensor) or (
        (have.shape, have.dtype, have.device) != (want.shape, want.dtype, want.device)
    ):
        got = _describe(have) if isinstance(have, Tensor) else type(have).__name__
        return f"`{path}` is {got}, expected {_describe(want)}"
    return ""


def _as_fields(state: Any) -> Any:
    """A state as ``{field: tensor}`` (nested states as nested dicts), for ``state_dict()``."""
    if is_state(state):
        return {field: _as_fields(value) for field, value in zip(state._fields, state, strict=True)}
    return state


def _from_fields(template: Any, fields: dict[str, Any]) -> Any:
    """The state of ``template``'s type (nested types too) from :func:`_as_fields`' dict.

    Raises:
        TypeError: the fields are not those of ``template``'s type.
    """
    values = {}
    for name, value in fields.items():
        inner = getattr(template, name, None)
        nested = is_state(inner) and isinstance(value, dict)
        values[name] = _from_fields(inner, value) if nested else value
    return type(template)(**values)


class _StatelessInit:
    """The ``init`` of a stateless weighting."""

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> EmptyState:
        del m, dtype, device
        return EmptyState()


class _StatelessUpdate:
    """The ``update`` of :func:`stateless` (unguarded)."""

    def __init__(self, kernel: Callable[[Tensor], Tensor]) -> None:
        self.kernel = kernel

    def __call__(self, gramian: Tensor, state: EmptyState, /) -> tuple[Tensor, EmptyState]:
        if not isinstance(state, EmptyState):
            raise TypeError(f"Expected the EmptyState of a stateless weighting, got {state!r}.")
        return self.kernel(check_gramian(gramian)), state


# --- The class front door: nn.Modules with TorchJD's names and hierarchy. ---------------------

_T = TypeVar("_T")


def _describe(tensor: Tensor) -> str:
    return f"{list(tensor.shape)} {tensor.dtype} on {tensor.device}"


def _gramian_of(matrix: Tensor) -> Tensor:
    """``J Jᵀ`` ``[m, m]`` of a matrix ``J`` ``[m, n]`` (TorchJD's ``compute_gramian``)."""
    return matrix @ matrix.T


def vector_to_str(vector: Tensor) -> str:
    """``1., 0.5, 2.25`` for ``tensor([1.0, 0.5, 2.25])``: TorchJD's format in ``str``."""
    return ", ".join(f"{float(value):.2f}".rstrip("0") for value in vector)


class Weighting(nn.Module, ABC):
    """Abstract base of the class weightings: ``weighting(stat) -> weights [m]``.

    As in TorchJD, a weighting is an ``nn.Module`` (forward hooks, ``.to(...)``,
    ``state_dict()``); ``stat`` is the Gramian ``[m, m]`` for every weighting of this package (the
    matrix ``[m, n]`` for a composition such as ``UPGrad().weighting``). ``weighting << fn`` is the
    weighting of ``fn(stat)``. The weightings that TorchJD makes non-differentiable (UPGrad,
    DualProj, PCGrad, GradVac) run under ``torch.no_grad()``: their weights never require grad.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import UPGradWeighting
        >>> weighting = UPGradWeighting() << (lambda matrix: matrix @ matrix.T)
        >>> weighting(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([1.1109, 0.7894])
    """

    _differentiable: ClassVar[bool] = True
    """``False``: calls run under ``torch.no_grad()`` (TorchJD's ``_NonDifferentiable``)."""

    def __call__(self, stat: Tensor, /) -> Tensor:
        """The weights of ``stat``, through ``nn.Module.__call__`` (hooks run)."""
        if self._differentiable:
            weights: Tensor = super().__call__(stat)
            return weights
        with torch.no_grad():
            weights = super().__call__(stat)
        return weights

    @abstractmethod
    def forward(self, stat: Tensor, /) -> Tensor:
        """The weights ``[m]`` of ``stat``."""

    def __lshift__(self, fn: Callable[[Tensor], Tensor]) -> "Weighting":
        """The weighting of ``fn(stat)`` (TorchJD's ``Weighting.__lshift__``)."""
        if not callable(fn):
            raise TypeError(f"`weighting << fn` needs a callable fn, got {type(fn).__name__}.")
        return _Composition(self, fn)

    def reset(self) -> None:
        """Forgets the state of a stateful weighting (no-op otherwise)."""


class _Composition(Weighting):
    """The weighting ``weighting(fn(stat))`` (TorchJD's ``_Composition``)."""

    def __init__(self, weighting: Weighting, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.weighting = weighting

    def forward(self, stat: Tensor, /) -> Tensor:
        weights: Tensor = self.weighting(self.fn(stat))
        return weights

    # ``Any``: the class front door (TorchJD's dynamic API) holds any weighting's state; the
    # functional ``PureWeighting[S]`` is the typed route.
    @property
    def state(self) -> Any:
        """The state of the composed weighting."""
        return self.weighting.state

    @state.setter
    def state(self, value: Any) -> None:
        self.weighting.state = value

    def reset(self) -> None:
        self.weighting.reset()


class Hyperparameter(Generic[_T]):
    """A constructor argument of a :class:`GramianWeighting` (or of another class wrapping a pure
    pair, such as :class:`~torchjd_func.aggregation.JacobianAggregating`), as a validated, settable property.

    Setting it rebuilds the wrapped :class:`PureWeighting` from all the arguments (so the value is
    checked exactly as the constructor checks it, and a bad one raises and changes nothing); it
    takes effect at the next call and keeps the state (e.g. GradVac's targets), as TorchJD's
    setters do. ``settable=False`` makes it read-only, with an ``AttributeError`` saying what to
    do instead.
    """

    def __init__(self, *, settable: bool = True) -> None:
        self.settable = settable
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> "Hyperparameter[_T]": ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        assert isinstance(obj, _PureHolder)
        return obj._hyperparameters[self.name]

    def __set__(self, obj: object, value: _T) -> None:
        assert isinstance(obj, _PureHolder)
        if not self.settable:
            raise AttributeError(
                f"`{self.name}` of {type(obj).__name__} is fixed at construction (it seeds the "
                f"state's key): create a new object, e.g. `{type(obj).__name__}(..., "
                f"{self.name}={value!r})`, or assign a saved `state` to continue a run."
            )
        obj._set_hyperparameters(**{self.name: value})


class Delegated(Generic[_T]):
    """A property of an aggregator that reads and sets its ``gramian_weighting``'s (as TorchJD's
    aggregators delegate theirs)."""

    def __init__(self) -> None:
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> "Delegated[_T]": ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        assert isinstance(obj, GramianWeightedAggregator)
        return getattr(obj.gramian_weighting, self.name)

    def __set__(self, obj: object, value: _T) -> None:
        assert isinstance(obj, GramianWeightedAggregator)
        setattr(obj.gramian_weighting, self.name, value)


class _PureHolder(nn.Module):
    """What the class front door's wrappers of a pure pair ``(init, update)`` share: the pair
    built from validated :class:`Hyperparameter` arguments (or given), and its state held
    explicitly, created on the first call, re-created when the input's signature changes, checked
    when assigned, saved in ``state_dict()``, moved by ``.to(...)`` and pickled.

    Subclasses define ``_build`` (the pair of some arguments), ``_fresh`` (the initial state for
    an input signature) and ``_state_template`` (a state of its type).
    """

    _kind_name: ClassVar[str] = "PureWeighting"
    """What ``pure`` must be, in error messages."""
    _pure_types: ClassVar[tuple[type, ...]] = ()
    """The accepted types of ``pure`` (set below the classes of the kinds)."""

    def _init_holder(self, pure: Any, hyperparameters: dict[str, Any]) -> None:
        if pure is None:
            pure = self._build(**hyperparameters)
        elif not isinstance(pure, self._pure_types):
            raise TypeError(
                f"{type(self).__name__} wraps a {self._kind_name}, got {type(pure).__name__}."
            )
        elif hyperparameters:
            raise TypeError(f"Pass either a {self._kind_name} or hyperparameters, not both.")
        self._hyperparameters = hyperparameters
        self.pure = pure
        self.state = None

    def _build(self, **hyperparameters: Any) -> Any:
        """The pure pair of these arguments; raises for bad ones."""
        raise TypeError(
            f"{type(self).__name__} needs a {self._kind_name}: pass one to the constructor."
        )

    def _fresh(self, signature: tuple[Any, ...]) -> Any:
        """The initial state for an input of this signature."""
        raise NotImplementedError

    def _state_template(self) -> Any:
        """A state of the wrapped pair's type (nested types included): the structure
        :meth:`set_extra_state` rebuilds a saved state into."""
        raise NotImplementedError

    def _set_hyperparameters(self, **changes: Any) -> None:
        hyperparameters = {**self._hyperparameters, **changes}
        self.pure = self._build(**hyperparameters)
        self._hyperparameters = hyperparameters

    # ``Any``: the class front door (TorchJD's dynamic API) holds any weighting's state; the
    # functional ``PureWeighting[S]`` is the typed route.
    @property
    def state(self) -> Any:
        """The state of the wrapped pure pair (``None`` before the first call)."""
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value
        # ``None``: an assigned state, checked against the next input instead of replaced.
        self._signature: tuple[Any, ...] | None = None

    def _state_for(self, signature: tuple[Any, ...], describe: str) -> Any:
        """The state to update for an input of this signature (fresh, kept or assigned)."""
        state = self._state
        if state is None or (self._signature is not None and signature != self._signature):
            return self._fresh(signature)
        if self._signature is None:
            self._check_assigned(state, signature, describe)
        return state

    def _store(self, state: Any, signature: tuple[Any, ...]) -> None:
        self.state = state
        self._signature = signature

    def _check_assigned(self, state: Any, signature: tuple[Any, ...], describe: str) -> None:
        """Checks an assigned state against the one ``init`` makes for the input's signature."""
        expected = self._fresh(signature)
        problem = _state_mismatch(state, expected, "")
        if problem:
            raise ValueError(
                f"The state assigned to {type(self).__name__} (or loaded, or moved with "
                f"`.to(...)`) does not fit {describe}: {problem}. Assign a state saved from a "
                "run with the same number of losses, dtype and device (move the object with "
                "`.to(...)`), or call `reset()` to start afresh."
            )

    def reset(self) -> None:
        """Forgets the state: the next call behaves like the first one."""
        self.state = None

    def get_extra_state(self) -> dict[str, Any]:
        """The state for ``state_dict()``: ``{"state": None}`` or ``{"state": {field: tensor}}``
        (a nested state, e.g. ``CRMOGMState.inner``, as a nested dict)."""
        return {"state": _as_fields(self._state)}

    def set_extra_state(self, extra: Any) -> None:
        """Restores a state from ``load_state_dict()``; it is checked at the next call."""
        if not isinstance(extra, dict) or "state" not in extra:
            raise ValueError(
                f"Expected the extra state saved by {type(self).__name__}.state_dict(), got "
                f"{type(extra).__name__}."
            )
        fields = extra["state"]
        if not isinstance(fields, dict):
            self.state = fields
            return
        template = self._state_template()
        try:
            self.state = _from_fields(template, fields)
        except TypeError as error:
            raise ValueError(
                f"The saved state has fields {sorted(fields)}, but {type(self).__name__} keeps a "
                f"{type(template).__name__}: load a state_dict saved from the same class."
            ) from error

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "_PureHolder":
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if any(isinstance(value, Tensor) for value in self._hyperparameters.values()):
            self._set_hyperparameters(
                **{
                    name: fn(value)
                    for name, value in self._hyperparameters.items()
                    if isinstance(value, Tensor)
                }
            )
        if is_state(self._state):
            self.state = map_state(fn, self._state)
        return self

    def __getstate__(self) -> dict[str, Any]:
        attributes = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        if type(self)._build is not _PureHolder._build:
            # Rebuilt from the arguments (a user's own functions may not pickle).
            del attributes["pure"]
        return attributes

    def __setstate__(self, attributes: dict[str, Any]) -> None:
        super().__setstate__(attributes)  # type: ignore[no-untyped-call]
        if "pure" not in attributes:
            self.pure = self._build(**self._hyperparameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._hyperparameters.items())


class GramianWeighting(_PureHolder, Weighting):
    """A weighting of Gramians ``[m, m] -> [m]`` that wraps a :class:`PureWeighting` and holds its
    state.

    ``GramianWeighting(pure)`` wraps any :class:`PureWeighting` (e.g. ``upgrad(differentiable=
    True)``, for a differentiable UPGrad). The built-in weightings (``UPGradWeighting``, ...) are
    subclasses that build theirs from their constructor arguments, which are
    :class:`Hyperparameter` properties: setting one rebuilds it, checked as at construction.

    The state is created on the first call, and re-created when the number of losses, the dtype
    or the device of the Gramian changes (as TorchJD's stateful weightings do). It is exposed as
    ``state`` (a NamedTuple of tensors): save it with ``torch.save`` and restore it by
    assignment, in this or in a new object with the same arguments, to continue a run exactly. It
    is also carried by ``state_dict()`` / ``load_state_dict()`` (as the module's extra state,
    loadable with ``torch.load(..., weights_only=True)``) and moved by ``.to(...)``. An assigned,
    loaded or moved state is checked against the next Gramian: one for another number of losses,
    dtype or device raises a ``ValueError`` (it is never silently replaced). :meth:`reset`
    forgets the state. The object itself, with its state, can be saved with ``torch.save`` (load
    it with ``torch.load(..., weights_only=False)``).

    Example:
        >>> import io
        >>> import torch
        >>> from torchjd_func.aggregation import GradVacWeighting
        >>> G = torch.tensor([[17.0, -22.0], [-22.0, 38.0]])
        >>> weighting = GradVacWeighting(seed=0)
        >>> first = weighting(G)
        >>> buffer = io.BytesIO()
        >>> torch.save(weighting.state_dict(), buffer)
        >>> _ = buffer.seek(0)
        >>> resumed = GradVacWeighting(seed=0)
        >>> resumed.load_state_dict(torch.load(buffer))
        <All keys matched successfully>
        >>> torch.equal(resumed(G), weighting(G))
        True
    """

    _kind_name: ClassVar[str] = "PureWeighting (e.g. `upgrad()`)"
    pure: PureWeighting[Any]

    def __init__(self, pure: PureWeighting[Any] | None = None, /, **hyperparameters: Any) -> None:
        super().__init__()
        self._init_holder(pure, hyperparameters)

    def _fresh(self, signature: tuple[Any, ...]) -> Any:
        m, dtype, device = signature
        return self.pure.init(m, dtype=dtype, device=device)

    def _state_template(self) -> Any:
        return self.pure.init(1)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        """The weights ``[0]`` of a ``[0, 0]`` Gramian (TorchJD's behaviour differs by method)."""
        raise ValueError(
            f"{type(self).__name__} got a Gramian for 0 losses: its weights are not defined "
            "without a loss (TorchJD raises too). Aggregate at least one loss."
        )

    def forward(self, gramian: Tensor, /) -> Tensor:
        if isinstance(gramian, Tensor) and gramian.is_floating_point() and gramian.shape == (0, 0):
            return self._weights_for_no_loss(gramian)
        check_gramian(gramian)
        if gramian.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} takes one Gramian [m, m], got shape {list(gramian.shape)}."
                " Use the pure `update` function to weight a batch of Gramians."
            )
        signature = (gramian.shape[0], gramian.dtype, gramian.device)
        describe = f"a Gramian for {signature[0]} losses in {signature[1]} on {signature[2]}"
        state = self._state_for(signature, describe)
        weights, new_state = self.pure.update(gramian, state)
        self._store(new_state, signature)
        return weights


class Aggregator(nn.Module, ABC):
    """Abstract base of the aggregators: ``aggregator(matrix [m, n]) -> vector [n]``, one row per
    loss; an ``nn.Module``, as in TorchJD.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import UPGrad
        >>> aggregator = UPGrad()
        >>> handle = aggregator.register_forward_hook(lambda module, args, out: print(out))
        >>> _ = aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.2929, 1.9004, 1.9004])
    """

    _differentiable: ClassVar[bool] = True
    """``False``: calls run under ``torch.no_grad()`` (TorchJD's ``_NonDifferentiable``)."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        """The aggregation of ``matrix``, through ``nn.Module.__call__`` (hooks run)."""
        if not isinstance(matrix, Tensor):
            raise TypeError(f"Expected a matrix Tensor [m, n], got {type(matrix).__name__}.")
        if matrix.ndim != 2:
            raise ValueError(
                f"An aggregator takes a matrix [m, n] (one row per loss), got shape "
                f"{list(matrix.shape)}."
            )
        if self._differentiable:
            vector: Tensor = super().__call__(matrix)
            return vector
        with torch.no_grad():
            vector = super().__call__(matrix)
        return vector

    @abstractmethod
    def forward(self, matrix: Tensor, /) -> Tensor:
        """The aggregation ``[n]`` of a matrix ``[m, n]``."""

    def reset(self) -> None:
        """Forgets the state of a stateful aggregator (no-op otherwise)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return type(self).__name__


class WeightedAggregator(Aggregator):
    """The aggregator ``A(J) = W(J) @ J`` of a weighting ``W`` of the matrix ``J`` ``[m, n]``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import UPGradWeighting, WeightedAggregator
        >>> aggregator = WeightedAggregator(UPGradWeighting() << (lambda J: J @ J.T))
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.2929, 1.9004, 1.9004])
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise TypeError(f"Expected a Weighting, got {type(weighting).__name__}.")
        self.weighting = weighting

    def forward(self, matrix: Tensor, /) -> Tensor:
        weights = self.weighting(matrix)
        return weights.to(matrix.dtype) @ matrix

    # ``Any``: the class front door (TorchJD's dynamic API) holds any weighting's state; the
    # functional ``PureWeighting[S]`` is the typed route.
    @property
    def state(self) -> Any:
        """The state of the weighting (``None`` before the first call or when stateless)."""
        return getattr(self.weighting, "state", None)

    @state.setter
    def state(self, value: Any) -> None:
        self.weighting.state = value

    def reset(self) -> None:
        self.weighting.reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weighting!r})"


class GramianWeightedAggregator(WeightedAggregator):
    """The aggregator ``A(J) = W(J Jᵀ) @ J`` of a Gramian weighting ``W``.

    As in TorchJD, ``gramian_weighting`` takes the Gramian ``[m, m]`` and ``weighting`` (that is,
    ``gramian_weighting << compute_gramian``) takes the matrix ``[m, n]``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import GramianWeightedAggregator, UPGradWeighting
        >>> aggregator = GramianWeightedAggregator(UPGradWeighting())
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> aggregator(J)
        tensor([0.2929, 1.9004, 1.9004])
        >>> aggregator.weighting(J), aggregator.gramian_weighting(J @ J.T)
        (tensor([1.1109, 0.7894]), tensor([1.1109, 0.7894]))
    """

    def __init__(self, gramian_weighting: Weighting) -> None:
        if not isinstance(gramian_weighting, Weighting):
            raise TypeError(f"Expected a Weighting, got {type(gramian_weighting).__name__}.")
        super().__init__(gramian_weighting << _gramian_of)
        self.gramian_weighting = gramian_weighting

    def reset(self) -> None:
        self.gramian_weighting.reset()

    def __repr__(self) -> str:
        if type(self) is GramianWeightedAggregator:
            return f"GramianWeightedAggregator({self.gramian_weighting!r})"
        return f"{type(self).__name__}({self.gramian_weighting.extra_repr()})"


GramianWeighting._pure_types = (PureWeighting,)
