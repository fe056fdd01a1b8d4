"""The kinds of aggregation besides the Gramian weightings: Jacobian aggregators and cross-Gramian
weightings, each a pair of pure functions ``(init, update)`` with explicit state.

* :class:`~torchjd_func.aggregation.PureWeighting` (``_base.py``): ``update(G, state)``, weights
  of the Gramian ``G = J Jᵀ``. Every step and :func:`aggregate` take it.
* :class:`JacobianAggregator`: ``update(J, state) -> (update, weights or None, state)`` for the
  methods that read the Jacobian itself (coordinate-wise ones such as GradDrop and TrimmedMean,
  ConFIG's pseudo-inverse, ExcessMTL's running sums of squared entries). The steps that build the
  Jacobian (``jd_step``, ``per_sample_step``, ``mtl_step``) and :func:`aggregate` take it; the
  Gramian-only steps (``gramian_step``, ``mtl_gramian_step``) refuse it.
* :class:`CrossWeighting`: ``update(A, state)`` with ``A = J₁ J₂ᵀ`` the cross-Gramian of two
  independent batches (MoDo, SDMGrad). No single-batch step can build ``A``: compute it with
  :func:`cross_gramian` and apply the weights with :func:`~torchjd_func.combine`.

A wrapper of a weighting (CR-MOGM) is a function of a ``PureWeighting`` returning one.
"""

from typing import Any, ClassVar, Generic, NamedTuple, Protocol, cast

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchjd_func._gramian import flatten_gramian
from torchjd_func._tree import leaves
from torchjd_func.aggregation._base import (
    Aggregator,
    InitFn,
    S,
    UpdateFn,
    Weighting,
    _keep_where,
    _PureHolder,
    _S_co,
)

__all__ = [
    "CrossWeighting",
    "JacobianAggregating",
    "JacobianAggregator",
    "JacobianInitFn",
    "JacobianUpdateFn",
    "JacobianWeighting",
    "check_jacobian",
    "cross_gramian",
    "describe_kind",
    "guard_nonfinite_jacobian",
]


class JacobianInitFn(Protocol[_S_co]):
    """``init(params, m) -> state``: only the structure, shapes, dtypes and device of ``params``
    (the parameters the Jacobian is taken with respect to) are read."""

    def __call__(self, params: TensorDictBase, m: int, /) -> _S_co: ...


class JacobianUpdateFn(Protocol[S]):
    """``update(J, state) -> (update, weights or None, new_state)`` for a Jacobian TensorDict ``J``
    with ``batch_size [m]`` (leaves ``[m, *param.shape]``): the update is params-shaped, the
    weights ``[m]`` (``None`` for methods that are not a weighting of the rows, e.g. GradDrop)."""

    def __call__(
        self, jacobian: TensorDictBase, state: S, /
    ) -> tuple[TensorDict, Tensor | None, S]: ...


class JacobianAggregator(NamedTuple, Generic[S]):
    """An aggregator of the Jacobian itself, as a pair of pure functions ``(init, update)``.

    For the methods that need more than the Gramian ``J Jᵀ``: ``update(J, state)`` returns the
    params-shaped update, the weights ``[m]`` when the method weights the rows (``None``
    otherwise) and the new state. ``J`` is a TensorDict with ``batch_size [m]``; a Jacobian of
    losses of another shape ``s`` is passed flattened to ``[prod(s)]`` by the steps and
    :func:`~torchjd_func.aggregation.aggregate`.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import JacobianAggregator, trimmed_mean
        >>> aggregator = trimmed_mean(trim_number=1)
        >>> J = TensorDict({"w": torch.tensor([[1.0, 5.0], [2.0, -9.0], [30.0, 0.0]])}, [3])
        >>> isinstance(aggregator, JacobianAggregator)
        True
        >>> update, weights, state = aggregator.update(J, aggregator.init(J[0], 3))
        >>> update["w"], weights
        (tensor([2., 0.]), None)
    """

    init: JacobianInitFn[S]
    update: JacobianUpdateFn[S]


class CrossWeighting(NamedTuple, Generic[S]):
    """A weighting of the cross-Gramian ``A = J₁ J₂ᵀ`` ``[m, m]`` of two independent batches, as a
    pair of pure functions ``(init, update)`` (MoDo, SDMGrad: their stochastic estimates are
    unbiased only with two batches).

    ``init(m, *, dtype, device)`` and ``update(A, state) -> (weights, new_state)`` have the
    signatures of a :class:`~torchjd_func.aggregation.PureWeighting`'s, but the input is not a
    Gramian, so the steps refuse this kind: build ``A`` with :func:`cross_gramian` and apply the
    weights with :func:`~torchjd_func.combine`.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import combine
        >>> from torchjd_func.aggregation import CrossWeighting, cross_gramian, mean
        >>> J1 = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> J2 = TensorDict({"w": torch.tensor([[-3.0, 1.0, 2.0], [5.0, 0.0, 1.0]])}, [2])
        >>> weighting = CrossWeighting(*mean())  # any (init, update) pair
        >>> weights, state = weighting.update(cross_gramian(J1, J2), weighting.init(2))
        >>> combine(J1, weights)["w"]
        tensor([1., 1., 1.])
    """

    init: InitFn[S]
    update: UpdateFn[S]


def check_jacobian(jacobian: object, m: int | None = None) -> TensorDictBase:
    """Checks that ``jacobian`` is a TensorDict of floating-point leaves with ``batch_size [m]``.

    Raises:
        TypeError: not a TensorDict, or a leaf that is not floating-point.
        ValueError: a batch size that is not ``[m]`` (or not of size ``m`` when given), no leaf, or
            ``m = 0``.
    """
    if not isinstance(jacobian, TensorDictBase):
        raise TypeError(
            f"Expected a Jacobian TensorDict (batch_size [m]), got {type(jacobian).__name__}. "
            "For a matrix J [m, n], use `TensorDict({'J': J}, batch_size=[J.shape[0]])`."
        )
    if len(jacobian.batch_size) != 1:
        raise ValueError(
            f"Expected a Jacobian with batch_size [m] (one row per loss), got "
            f"{list(jacobian.batch_size)}. Flatten the losses' dims first, e.g. "
            "`jac.reshape(-1)`."
        )
    rows = jacobian.batch_size[0]
    if rows == 0:
        raise ValueError("The Jacobian is empty (m = 0): there is no loss to aggregate.")
    if m is not None and rows != m:
        raise ValueError(f"The Jacobian has {rows} rows but this aggregator was set up for {m}.")
    values = list(leaves(jacobian).values())
    if not values:
        raise ValueError("The Jacobian has no leaf: there is no parameter to update.")
    for value in values:
        if not value.is_floating_point():
            raise TypeError(f"Expected floating-point Jacobian leaves, got dtype {value.dtype}.")
    return jacobian


def cross_gramian(jac_1: TensorDictBase, jac_2: TensorDictBase) -> Tensor:
    """The cross-Gramian ``A = J₁ J₂ᵀ`` ``[M, M]`` of two Jacobians of the same losses and
    parameters, on two independent batches: ``A[i, j] = <∇L_i(batch 1), ∇L_j(batch 2)>``.

    Losses of shape ``s`` are flattened to ``M = prod(s)`` in ``losses.flatten()`` order. The sum
    runs leaf by leaf in the promoted dtype of the leaves (at least float32).

    Raises:
        TypeError: not TensorDicts.
        ValueError: different keys, batch sizes or leaf shapes.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import cross_gramian
        >>> J1 = TensorDict({"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}, [2])
        >>> J2 = TensorDict({"w": torch.tensor([[3.0, 1.0], [1.0, 1.0]])}, [2])
        >>> cross_gramian(J1, J2)
        tensor([[3., 1.],
                [2., 2.]])
    """
    for name, jac in (("jac_1", jac_1), ("jac_2", jac_2)):
        if not isinstance(jac, TensorDictBase):
            raise TypeError(f"`{name}` must be a Jacobian TensorDict, got {type(jac).__name__}.")
    if jac_1.batch_size != jac_2.batch_size:
        raise ValueError(
            f"The two Jacobians are for losses of shapes {list(jac_1.batch_size)} and "
            f"{list(jac_2.batch_size)}: a cross-Gramian needs the same losses on both batches."
        )
    first, second = leaves(jac_1), leaves(jac_2)
    if set(first) != set(second):
        raise ValueError(
            f"The two Jacobians have different parameters: {sorted(set(first) ^ set(second))} "
            "are in only one of them."
        )
    if not first:
        raise ValueError("The Jacobians have no leaf: there is no parameter.")
    s = list(jac_1.batch_size)
    m = 1
    for size in s:
        m *= size
    dtype = _promote([v.dtype for v in [*first.values(), *second.values()]])
    total: Tensor | None = None
    for key, a in first.items():
        b = second[key]
        if a.shape != b.shape:
            raise ValueError(
                f"Leaf {key} has shape {list(a.shape)} in `jac_1` and {list(b.shape)} in `jac_2`."
            )
        term = a.reshape(m, -1).to(dtype) @ b.reshape(m, -1).to(dtype).T
        total = term if total is None else total + term
    assert total is not None
    return flatten_gramian(total) if len(s) == 1 else total


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def guard_nonfinite_jacobian(update: JacobianUpdateFn[S]) -> JacobianUpdateFn[S]:
    """``update`` made safe for non-finite Jacobians, without host synchronisation.

    Where the Jacobian holds a NaN or an infinity, the update (and the weights, if any) are NaN
    and every tensor of the returned state is the input state's.
    """
    return _GuardedJacobian(update)


class _GuardedJacobian(Generic[S]):
    """The update of :func:`guard_nonfinite_jacobian`."""

    def __init__(self, update: JacobianUpdateFn[S]) -> None:
        self.update = update

    def __call__(
        self, jacobian: TensorDictBase, state: S, /
    ) -> tuple[TensorDict, Tensor | None, S]:
        out, weights, new_state = self.update(jacobian, state)
        flags = [value.isfinite().all() for value in leaves(jacobian).values()]
        skip = torch.stack(flags).all().logical_not()

        def poison(value: Tensor) -> Tensor:
            return torch.where(skip, value.new_full((), float("nan")), value)

        # ``apply`` returns ``None`` only with ``inplace``-style callbacks that return ``None``.
        out = cast(TensorDict, out.apply(poison))
        if weights is not None:
            weights = poison(weights)
        kept: S = _keep_where(skip, state, new_state)
        return out, weights, kept


_KINDS: dict[type, str] = {
    JacobianAggregator: "a JacobianAggregator (it reads the Jacobian itself, not only its Gramian)",
    CrossWeighting: "a CrossWeighting (it weights the cross-Gramian J₁J₂ᵀ of two independent "
    "batches)",
}


def describe_kind(obj: object) -> str:
    """``"a JacobianAggregator (...)"``: what ``obj`` is, for error messages."""
    for kind, text in _KINDS.items():
        if isinstance(obj, kind):
            return text
    return f"a {type(obj).__name__}"


# --- The class front door of the Jacobian aggregators. ------------------------------------------


def _matrix_params(n: int, dtype: torch.dtype, device: torch.device) -> TensorDict:
    """The params whose Jacobian is a matrix ``[m, n]``: one leaf ``"matrix"`` of shape ``[n]``."""
    return TensorDict({"matrix": torch.zeros(n, dtype=dtype, device=device)}, batch_size=[])


class _JacobianHolder(_PureHolder):
    """What the classes wrapping a :class:`JacobianAggregator` share."""

    _kind_name: ClassVar[str] = "JacobianAggregator (e.g. `trimmed_mean(1)`)"
    pure: JacobianAggregator[Any]

    def _fresh(self, signature: tuple[Any, ...]) -> Any:
        m, n, dtype, device = signature
        return self.pure.init(_matrix_params(n, dtype, device), m)

    def _state_template(self) -> Any:
        return self.pure.init(_matrix_params(1, torch.float32, torch.device("cpu")), 1)

    def _run(self, matrix: Tensor) -> tuple[TensorDict, Tensor | None]:
        if not matrix.is_floating_point():
            raise TypeError(f"Expected a floating-point matrix, got dtype {matrix.dtype}.")
        m, n = matrix.shape
        signature = (m, n, matrix.dtype, matrix.device)
        state = self._state_for(
            signature, f"a matrix [{m}, {n}] in {matrix.dtype} on {matrix.device}"
        )
        jacobian = TensorDict({"matrix": matrix}, batch_size=[m])
        update, weights, new_state = self.pure.update(jacobian, state)
        self._store(new_state, signature)
        return update, weights


class JacobianAggregating(_JacobianHolder, Aggregator):
    """An aggregator of matrices ``[m, n] -> [n]`` that wraps a :class:`JacobianAggregator` and
    holds its state (as :class:`~torchjd_func.aggregation.GramianWeighting` does for a
    ``PureWeighting``: created on the first call, re-created when ``m``, ``n``, the dtype or the
    device change, checked when assigned, in ``state_dict()``, moved by ``.to(...)``).

    ``JacobianAggregating(pure)`` wraps any :class:`JacobianAggregator`; the built-in ones
    (``TrimmedMean``, ``GradDrop``, ...) are subclasses built from their constructor arguments,
    which are validated, settable properties.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import JacobianAggregating, trimmed_mean
        >>> aggregator = JacobianAggregating(trimmed_mean(trim_number=1))
        >>> aggregator(torch.tensor([[1.0, 5.0], [2.0, -9.0], [30.0, 0.0]]))
        tensor([2., 0.])
    """

    def __init__(
        self, pure: JacobianAggregator[Any] | None = None, /, **hyperparameters: Any
    ) -> None:
        super().__init__()
        self._init_holder(pure, hyperparameters)

    def forward(self, matrix: Tensor, /) -> Tensor:
        update, _ = self._run(matrix)
        vector: Tensor = update["matrix"]
        return vector

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class JacobianWeighting(_JacobianHolder, Weighting):
    """A weighting of matrices ``[m, n] -> [m]`` that wraps a :class:`JacobianAggregator` giving
    weights (e.g. ExcessMTL's), and holds its state as :class:`JacobianAggregating` does.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import JacobianWeighting, WeightedAggregator, excess_mtl
        >>> weighting = JacobianWeighting(excess_mtl())
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting(J)
        tensor([0.1192, 0.8808])
    """

    def __init__(
        self, pure: JacobianAggregator[Any] | None = None, /, **hyperparameters: Any
    ) -> None:
        super().__init__()
        self._init_holder(pure, hyperparameters)

    def forward(self, matrix: Tensor, /) -> Tensor:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            got = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"{type(self).__name__} takes a matrix J [m, n], got {got}.")
        _, weights = self._run(matrix)
        if weights is None:
            raise TypeError(
                f"{type(self).__name__} wraps a JacobianAggregator that gives no weights: use "
                "`JacobianAggregating` for it instead."
            )
        return weights


_JacobianHolder._pure_types = (JacobianAggregator,)
