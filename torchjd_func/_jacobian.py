"""Jacobians of losses with respect to parameter TensorDicts, computed with ``torch.func``.

Every function here runs the forward pass once (``torch.func.vjp``) and obtains the rows of the
Jacobian by vector-Jacobian products with the rows of an identity, batched with ``torch.vmap``
(``chunk_size`` rows at a time). They contain no host synchronisation and compile with
``torch.compile(fullgraph=True)``.

A parameter that a loss does not use gets a zero row (not an error): the Jacobian is the true
derivative, and the derivative of a loss with respect to an unused parameter is zero. A loss that
depends on no parameter at all is an error, since it is almost always a bug (detached tensors,
wrong params).
"""

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Generic, Literal, NamedTuple, TypeVar, cast, overload

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torch.func import vjp, vmap

from torchjd_func._chunks import batched_vjp
from torchjd_func._tree import check_params, from_leaves, leaves
from torchjd_func._types import Jacobian, LeafKey

VjpFn = Callable[..., tuple[Tensor, ...]]

__all__ = [
    "JacobianOutput",
    "MTLJacobian",
    "jacobian",
    "mtl_jacobian",
    "per_sample_jacobian",
    "value_and_jacobian",
    "value_and_per_sample_jacobian",
]


_Aux = TypeVar("_Aux")


class JacobianOutput(NamedTuple, Generic[_Aux]):
    """What :func:`value_and_jacobian` and :func:`value_and_per_sample_jacobian` return (generic
    in the type of ``aux``: ``None`` without ``has_aux``)."""

    value: Tensor
    """The output of ``fn`` (the losses), shape ``s``."""
    jacobian: Jacobian
    """Leaves ``[*s, *param.shape]``, ``batch_size = s``."""
    aux: _Aux
    """The auxiliary output of ``fn`` when ``has_aux=True``, else ``None``."""


class MTLJacobian(NamedTuple):
    """What :func:`mtl_jacobian` returns."""

    losses: Tensor
    """The task losses, shape ``s`` (usually ``[m]``)."""
    jacobian: Jacobian
    """Jacobian of the losses w.r.t. the shared params: leaves ``[*s, *param.shape]``."""
    head_grads: TensorDict
    """Gradient of the sum of the losses w.r.t. the head params (each task's own gradient for
    task-specific heads), params-shaped."""
    features: Tensor | tuple[Tensor, ...]
    """The shared features, as the trunk returned them."""


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"`chunk_size` must be None (all rows at once) or a positive int, got {chunk_size!r}."
        )


def _check_output(output: object, what: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{what} must return a Tensor of losses, got {type(output).__name__}. With an auxiliary "
            "output, return `(losses, aux)` and pass `has_aux=True`."
        )
    if not output.is_floating_point():
        raise TypeError(f"{what} must return floating-point losses, got dtype {output.dtype}.")
    if output.numel() == 0:
        raise ValueError(f"{what} returned an empty tensor of shape {list(output.shape)}.")
    if not output.requires_grad:
        # Inside torch.func transforms, `requires_grad` is True exactly for tensors that depend on
        # the differentiated inputs: a static property, so this check compiles.
        raise ValueError(
            f"{what} returned losses that do not depend on the parameters (detached tensors, or "
            "computed without them). Check that it uses the params it is given, e.g. through "
            "`call(model, params, ...)`."
        )
    return output


def _split_aux(result: object, has_aux: bool, what: str) -> tuple[object, Any]:
    if not has_aux:
        return result, ()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"With `has_aux=True`, {what} must return a pair `(losses, aux)`.")
    return result[0], result[1]


def _vjp_rows(
    vjp_fn: VjpFn,
    output: Tensor,
    chunk_size: int | None,
) -> tuple[Tensor, ...]:
    """Rows ``[M, *primal.shape]`` of the Jacobian of ``output`` (``M = output.numel()``)."""
    n_rows = output.numel()
    identity = torch.eye(n_rows, dtype=output.dtype, device=output.device)
    cotangents = identity.reshape((n_rows, *output.shape))
    return batched_vjp(lambda rows, _: vjp_fn(rows[0]), (cotangents,), chunk_size)


def _to_jacobian(
    keys: Sequence[LeafKey], leaves_: Sequence[Tensor], loss_shape: torch.Size
) -> TensorDict:
    return from_leaves(dict(zip(keys, leaves_, strict=True)), batch_size=loss_shape)


def _value_and_rows(
    fn: Callable[..., Any],
    keys: Sequence[LeafKey],
    tensors: Sequence[Tensor],
    args: Sequence[Any],
    chunk_size: int | None,
    has_aux: bool,
) -> tuple[Tensor, tuple[Tensor, ...], Any]:
    """``fn``'s value, the Jacobian's leaves ``[*s, *param.shape]`` in ``keys`` order, and aux."""

    def fn_of_leaves(*leaf_tensors: Tensor) -> tuple[Tensor, Any]:
        result = fn(from_leaves(dict(zip(keys, leaf_tensors, strict=True)), []), *args)
        output, aux = _split_aux(result, has_aux, "`fn`")
        return _check_output(output, "`fn`"), aux

    output, vjp_fn, aux = cast(
        "tuple[Tensor, VjpFn, Any]", vjp(fn_of_leaves, *tensors, has_aux=True)
    )
    rows = _vjp_rows(vjp_fn, output, chunk_size)
    shaped = tuple(row.reshape((*output.shape, *row.shape[1:])) for row in rows)
    return output, shaped, aux


@overload
def value_and_jacobian(
    fn: Callable[..., Tensor],
    params: TensorDictBase,
    *args: Any,
    chunk_size: int | None = None,
    has_aux: Literal[False] = False,
) -> JacobianOutput[None]: ...


@overload
def value_and_jacobian(
    fn: Callable[..., tuple[Tensor, _Aux]],
    params: TensorDictBase,
    *args: Any,
    chunk_size: int | None = None,
    has_aux: Literal[True],
) -> JacobianOutput[_Aux]: ...


@overload
def value_and_jacobian(
    fn: Callable[..., Any],
    params: TensorDictBase,
    *args: Any,
    chunk_size: int | None = None,
    has_aux: bool,
) -> JacobianOutput[Any]: ...  # ``has_aux`` known only at run time: ``aux`` may be anything.


def value_and_jacobian(
    fn: Callable[..., Any],
    params: TensorDictBase,
    *args: Any,
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> JacobianOutput[Any]:
    """The value of ``fn(params, *args)`` and its Jacobian w.r.t. ``params``, in one forward pass.

    For losses ``L = fn(params, *args)`` of any shape ``s`` (``[]``, ``[m]``, ``[B]``, ``[B, m]``,
    ...), the Jacobian has one leaf per parameter, ``J[key][i] = ∂L_i / ∂params[key]``, i.e. leaves
    ``[*s, *param.shape]``.

    Args:
        fn: ``fn(params, *args) -> losses`` (or ``(losses, aux)`` with ``has_aux=True``), where
            ``params`` is a TensorDict shaped like the one given.
        params: The parameters to differentiate with respect to (e.g. :func:`params_of`).
        *args: Further inputs of ``fn`` (data, targets), not differentiated.
        chunk_size: How many rows of the Jacobian to compute at once: ``None`` computes all
            ``numel(losses)`` rows in one vmapped backward pass (fastest, most memory), ``1``
            computes one row at a time without vmap (least memory; also the fallback for ops
            that have no vmap rule). The equivalent of TorchJD's ``parallel_chunk_size``.
        has_aux: ``fn`` returns ``(losses, aux)``; ``aux`` is returned untouched.

    Returns:
        ``JacobianOutput(value, jacobian, aux)``.

    Raises:
        TypeError: ``params`` is not a TensorDict of floating-point tensors, or ``fn`` returns
            something other than a floating-point tensor.
        ValueError: ``params`` is empty or spans several devices, the losses are empty or do not
            depend on ``params``, or ``chunk_size`` is not a positive int.

    Example:
        >>> import torch
        >>> from torchjd_func import call, params_of, value_and_jacobian
        >>> model = torch.nn.Linear(3, 2)
        >>> def losses_fn(params, x):
        ...     return call(model, params, x).pow(2).mean(dim=0)  # shape [2]
        >>> losses, jac, _ = value_and_jacobian(losses_fn, params_of(model), torch.randn(8, 3))
        >>> losses.shape, jac["weight"].shape, jac.batch_size
        (torch.Size([2]), torch.Size([2, 2, 3]), torch.Size([2]))
    """
    _check_chunk_size(chunk_size)
    params_leaves = check_params(params)
    keys = list(params_leaves)
    value, jac_leaves, aux = _value_and_rows(
        fn, keys, list(params_leaves.values()), args, chunk_size, has_aux
    )
    return JacobianOutput(
        value, _to_jacobian(keys, jac_leaves, value.shape), aux if has_aux else None
    )


def jacobian(
    fn: Callable[..., Tensor],
    params: TensorDictBase,
    *args: Any,
    chunk_size: int | None = None,
) -> Jacobian:
    """The Jacobian of ``fn(params, *args)`` w.r.t. ``params``, as a TensorDict.

    Same as :func:`value_and_jacobian` without the value: leaves ``[*s, *param.shape]`` for losses
    of shape ``s``, ``batch_size = s``.

    Example:
        >>> import torch
        >>> from torchjd_func import call, jacobian, params_of
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(4, 3), torch.randn(4)
        >>> def per_sample_losses(params, x, y):
        ...     return (call(model, params, x).squeeze(1) - y) ** 2  # shape [4]
        >>> jac = jacobian(per_sample_losses, params_of(model), x, y, chunk_size=2)
        >>> jac["weight"].shape, jac["bias"].shape
        (torch.Size([4, 1, 3]), torch.Size([4, 1]))
    """
    return value_and_jacobian(fn, params, *args, chunk_size=chunk_size).jacobian


def _normalize_in_dims(in_dims: int | Sequence[int | None], n_args: int) -> tuple[int | None, ...]:
    if n_args == 0:
        raise ValueError(
            "Per-sample Jacobians need at least one batched input after `params` (the data)."
        )
    if isinstance(in_dims, int):
        return (in_dims,) * n_args
    dims = tuple(in_dims)
    if len(dims) != n_args:
        raise ValueError(
            f"`in_dims` has {len(dims)} entries but {n_args} inputs were given after `params`."
        )
    if all(d is None for d in dims):
        raise ValueError("`in_dims` must mark at least one input as batched (not None).")
    return dims


def _batch_size(args: Sequence[Any], dims: Sequence[int | None]) -> int:
    sizes: dict[int, list[int]] = {}
    for position, (arg, dim) in enumerate(zip(args, dims, strict=True)):
        if dim is None:
            continue
        if not isinstance(arg, Tensor):
            raise TypeError(
                f"Input {position} after `params` is batched (in_dims={dim}) but is a "
                f"{type(arg).__name__}, not a Tensor; mark it None in `in_dims`."
            )
        if not -arg.ndim <= dim < arg.ndim:
            raise ValueError(
                f"Input {position} after `params` has shape {list(arg.shape)}: it has no dimension "
                f"{dim} to map over."
            )
        sizes.setdefault(arg.shape[dim], []).append(position)
    if len(sizes) != 1:
        raise ValueError(
            "The batched inputs disagree on the batch size: "
            + ", ".join(f"size {b} for inputs {p}" for b, p in sizes.items())
            + "."
        )
    (size,) = sizes
    if size == 0:
        raise ValueError("The batch is empty: there is no sample to differentiate.")
    return size


@overload
def value_and_per_sample_jacobian(
    fn: Callable[..., Tensor],
    params: TensorDictBase,
    *args: Any,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
    has_aux: Literal[False] = False,
) -> JacobianOutput[None]: ...


@overload
def value_and_per_sample_jacobian(
    fn: Callable[..., tuple[Tensor, _Aux]],
    params: TensorDictBase,
    *args: Any,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
    has_aux: Literal[True],
) -> JacobianOutput[_Aux]: ...


@overload
def value_and_per_sample_jacobian(
    fn: Callable[..., Any],
    params: TensorDictBase,
    *args: Any,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
    has_aux: bool,
) -> JacobianOutput[Any]: ...  # ``has_aux`` known only at run time: ``aux`` may be anything.


def value_and_per_sample_jacobian(
    fn: Callable[..., Any],
    params: TensorDictBase,
    *args: Any,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> JacobianOutput[Any]:
    """Per-sample losses and their Jacobian, from a function written for one sample.

    ``fn(params, *sample_args)`` computes the losses of **one** sample (shape ``s``: ``[]`` for
    instance-wise risk minimisation, IWRM, ``[m]`` for per-sample, per-task losses, IWMTL); it is
    mapped over the batch with ``torch.vmap``. Each sample's Jacobian costs one backward pass per
    loss of that sample, batched, so an IWRM Jacobian costs about one batched backward pass rather
    than ``B``. ``fn`` must treat samples independently: no batch statistics (BatchNorm in train
    mode), no in-place updates of buffers.

    Args:
        fn: ``fn(params, *sample_args) -> losses`` for one sample (or ``(losses, aux)``).
        params: The parameters (shared by all samples).
        *args: Batched inputs (and unbatched ones, marked ``None`` in ``in_dims``).
        in_dims: The batch dimension of each input in ``args`` (``None``: not batched), or one
            int for all of them.
        chunk_size: How many samples to process at once (``None``: the whole batch). Trades
            memory for speed like TorchJD's ``parallel_chunk_size``.
        has_aux: ``fn`` returns ``(losses, aux)``; ``aux`` (tensors) gets a leading batch dim.

    Returns:
        ``JacobianOutput(value, jacobian, aux)`` with ``value`` of shape ``[B, *s]`` and
        Jacobian leaves ``[B, *s, *param.shape]``.

    Raises:
        TypeError: as :func:`value_and_jacobian`, or a batched input is not a tensor.
        ValueError: as :func:`value_and_jacobian`, or the batched inputs disagree on the batch
            size, the batch is empty, or ``in_dims`` does not match ``args``.
        RuntimeError: an op of ``fn`` has no vmap rule (the message says what to do instead).

    Example:
        >>> import torch
        >>> from torchjd_func import call, params_of, value_and_per_sample_jacobian
        >>> model = torch.nn.Linear(3, 2)
        >>> def sample_losses(params, x, y):  # one sample: x [3], y [2] -> losses [2]
        ...     return (call(model, params, x) - y) ** 2
        >>> losses, jac, _ = value_and_per_sample_jacobian(
        ...     sample_losses, params_of(model), torch.randn(5, 3), torch.randn(5, 2)
        ... )
        >>> losses.shape, jac["weight"].shape
        (torch.Size([5, 2]), torch.Size([5, 2, 2, 3]))
    """
    _check_chunk_size(chunk_size)
    dims = _normalize_in_dims(in_dims, len(args))
    _batch_size(args, dims)
    params_leaves = check_params(params)
    keys = list(params_leaves)

    def one_sample(
        tensors: tuple[Tensor, ...], *sample_args: Any
    ) -> tuple[Tensor, tuple[Tensor, ...], Any]:
        return _value_and_rows(fn, keys, tensors, sample_args, None, has_aux)

    mapped = vmap(one_sample, in_dims=(None, *dims), chunk_size=chunk_size)
    try:
        value, jac_leaves, aux = mapped(tuple(params_leaves.values()), *args)
    except RuntimeError as error:
        raise RuntimeError(
            f"Mapping `fn` over the batch with torch.vmap failed: {error}. Some ops have no vmap "
            "rule, e.g. nn.GRU and nn.RNN on the CPU, and nn.LSTM in float64 there "
            "(aten::lstm.input). Compute the losses of the whole batch instead, [B] (or "
            "[B, m]), with `jacobian` or `jd_step`: the same per-sample rows when the samples "
            "are independent."
        ) from error
    return JacobianOutput(
        value, _to_jacobian(keys, jac_leaves, value.shape), aux if has_aux else None
    )


def per_sample_jacobian(
    fn: Callable[..., Tensor],
    params: TensorDictBase,
    *args: Any,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
) -> Jacobian:
    """The per-sample Jacobian of a function written for one sample.

    Same as :func:`value_and_per_sample_jacobian` without the value: leaves
    ``[B, *s, *param.shape]`` for per-sample losses of shape ``s``.

    Example:
        >>> import torch
        >>> from torchjd_func import call, params_of, per_sample_jacobian
        >>> model = torch.nn.Linear(3, 1)
        >>> def sample_loss(params, x, y):  # IWRM: one scalar loss per sample
        ...     return (call(model, params, x).squeeze() - y) ** 2
        >>> jac = per_sample_jacobian(sample_loss, params_of(model), torch.randn(6, 3), torch.randn(6))
        >>> jac["weight"].shape, jac.batch_size
        (torch.Size([6, 1, 3]), torch.Size([6]))
    """
    return value_and_per_sample_jacobian(
        fn, params, *args, in_dims=in_dims, chunk_size=chunk_size
    ).jacobian


def _as_features(features: object) -> tuple[Tensor, ...]:
    if isinstance(features, Tensor):
        found: tuple[object, ...] = (features,)
    elif isinstance(features, (tuple, list)) and features:
        found = tuple(features)
    else:
        raise TypeError(
            "`trunk_fn` must return the shared features as a Tensor or a non-empty tuple of "
            f"Tensors, got {type(features).__name__}."
        )
    for i, feature in enumerate(found):
        if not isinstance(feature, Tensor) or not feature.is_floating_point():
            raise TypeError(
                f"Feature {i} returned by `trunk_fn` is not a floating-point Tensor "
                f"({type(feature).__name__})."
            )
        if not feature.requires_grad:
            raise ValueError(
                f"Feature {i} returned by `trunk_fn` does not depend on `shared_params`: it would "
                "get an all-zero Jacobian. Return only features computed from the shared params."
            )
    return tuple(t for t in found if isinstance(t, Tensor))


def mtl_jacobian(
    trunk_fn: Callable[..., Tensor | Sequence[Tensor]],
    heads_fn: Callable[..., Tensor]
    | Sequence[Callable[..., Tensor]]
    | Mapping[str, Callable[..., Tensor]],
    shared_params: TensorDictBase,
    head_params: TensorDictBase,
    trunk_args: Sequence[object] = (),
    head_args: Sequence[object] = (),
    *,
    chunk_size: int | None = None,
) -> MTLJacobian:
    """The functional twin of TorchJD's ``mtl_backward``: the task Jacobian through the features.

    With features ``f = trunk_fn(shared_params, *trunk_args)`` and task losses
    ``L = heads_fn(head_params, f, *head_args)``, this computes

    * ``∂L/∂f``, one row per loss (a vmapped backward pass through the heads only),
    * the Jacobian ``∂L/∂shared_params = (∂L/∂f)(∂f/∂shared_params)`` by **one** batched
      vector-Jacobian product through the trunk (not one backward pass per task),
    * the gradient of ``Σ L`` w.r.t. ``head_params``: for task-specific heads, each head gets
      its own task's gradient; parameters shared by several heads get the sum, as in TorchJD.

    The forward pass runs once.

    Args:
        trunk_fn: ``trunk_fn(shared_params, *trunk_args) -> features``: a Tensor or a tuple of
            Tensors.
        heads_fn: ``heads_fn(head_params, features, *head_args) -> losses`` of any shape ``s``
            (usually ``[m]``); or a sequence of per-task functions with the same signature, each
            returning a scalar loss (stacked into ``[m]``); or a mapping ``{task: fn}`` with
            ``fn(head_params[task], features, *head_args) -> scalar loss``, ``head_params``
            keyed by exactly those tasks. ``features`` is passed as the trunk returned it. The
            mapping takes one backward pass per task through its own head only; the other forms
            backpropagate every loss through all the heads (vmapped, computing the zero
            cotangents of the other heads). ``chunk_size`` does not apply to the mapping.
        shared_params: The trunk's parameters.
        head_params: The heads' parameters, e.g. ``TensorDict({"task1": params_of(head1), ...})``.
            May be empty (losses computed from the features alone).
        trunk_args: Inputs of ``trunk_fn`` after the params.
        head_args: Inputs of ``heads_fn`` after the features (targets, ...).
        chunk_size: How many losses to differentiate at once (``None``: all); ``1`` uses no vmap.

    Returns:
        ``MTLJacobian(losses, jacobian, head_grads, features)``.

    Raises:
        TypeError: bad params, features or losses (see :func:`value_and_jacobian`).
        ValueError: empty ``shared_params``, features that do not depend on ``shared_params``,
            losses that depend on neither the features nor the heads.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import call, mtl_jacobian, params_of
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU())
        >>> head1, head2 = torch.nn.Linear(5, 1), torch.nn.Linear(5, 1)
        >>> def trunk_fn(params, x):
        ...     return call(trunk, params, x)
        >>> def heads_fn(params, features, y1, y2):
        ...     loss1 = (call(head1, params["task1"], features).squeeze(1) - y1).pow(2).mean()
        ...     loss2 = (call(head2, params["task2"], features).squeeze(1) - y2).pow(2).mean()
        ...     return torch.stack([loss1, loss2])
        >>> heads = TensorDict({"task1": params_of(head1), "task2": params_of(head2)})
        >>> x, y1, y2 = torch.randn(16, 10), torch.randn(16), torch.randn(16)
        >>> out = mtl_jacobian(trunk_fn, heads_fn, params_of(trunk), heads, (x,), (y1, y2))
        >>> out.losses.shape, out.jacobian["0", "weight"].shape, out.head_grads["task1", "weight"].shape
        (torch.Size([2]), torch.Size([2, 5, 10]), torch.Size([1, 5]))
    """
    _check_chunk_size(chunk_size)
    shared_leaves = check_params(shared_params, "shared_params")
    head_leaves = check_head_params(head_params)
    shared_keys, head_keys = list(shared_leaves), list(head_leaves)
    losses_fn: Callable[..., Tensor] | None
    if isinstance(heads_fn, Mapping):
        check_task_mapping(heads_fn, head_params)
        losses_fn = None
    elif isinstance(heads_fn, Sequence):
        losses_fn = _stacked(heads_fn)
    else:
        losses_fn = heads_fn

    # Whether the trunk returned one Tensor rather than a tuple: known once it has been traced.
    single_feature = [False]

    def trunk_of_leaves(*tensors: Tensor) -> tuple[Tensor, ...]:
        params = from_leaves(dict(zip(shared_keys, tensors, strict=True)), [])
        result = trunk_fn(params, *trunk_args)
        single_feature[0] = isinstance(result, Tensor)
        return _as_features(result)

    def as_returned(feats: Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
        return feats[0] if single_feature[0] else tuple(feats)

    features, trunk_vjp = cast(
        "tuple[tuple[Tensor, ...], VjpFn]", vjp(trunk_of_leaves, *shared_leaves.values())
    )
    n_heads = len(head_keys)

    def heads_of_leaves(*tensors: Tensor) -> Tensor:
        params = from_leaves(dict(zip(head_keys, tensors[:n_heads], strict=True)), [])
        assert losses_fn is not None  # not the mapping
        losses = losses_fn(params, as_returned(tensors[n_heads:]), *head_args)
        return _check_output(losses, "`heads_fn`")

    head_grads: TensorDictBase
    if isinstance(heads_fn, Mapping):
        losses, head_grads, feature_rows = task_rows(
            heads_fn, head_params, features, as_returned, head_args
        )
    else:
        losses, heads_vjp = cast(
            "tuple[Tensor, VjpFn]", vjp(heads_of_leaves, *head_leaves.values(), *features)
        )
        head_rows = _vjp_rows(heads_vjp, losses, chunk_size)
        feature_rows = head_rows[n_heads:]
        head_grads = from_leaves(
            {key: row.sum(0) for key, row in zip(head_keys, head_rows[:n_heads], strict=True)}, []
        )
    shared_rows = batched_vjp(lambda rows, _: trunk_vjp(rows), tuple(feature_rows), chunk_size)
    shaped = [row.reshape((*losses.shape, *row.shape[1:])) for row in shared_rows]
    return MTLJacobian(
        losses, _to_jacobian(shared_keys, shaped, losses.shape), head_grads, as_returned(features)
    )


def _stacked(task_fns: Sequence[Callable[..., Tensor]]) -> Callable[..., Tensor]:
    fns = list(task_fns)
    if not fns:
        raise ValueError("`heads_fn` is an empty sequence: give at least one task loss function.")

    def losses_fn(params: TensorDict, features: Any, *args: Any) -> Tensor:
        losses = [task_fn(params, features, *args) for task_fn in fns]
        for i, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                got = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(
                    f"Task loss function {i} must return a scalar Tensor, got {got}. Reduce it "
                    "(e.g. `.mean()`), or give one `heads_fn` returning all the losses."
                )
        return torch.stack(losses)

    return losses_fn


def check_head_params(head_params: object) -> dict[LeafKey, Tensor]:
    """The leaves of ``head_params``, a TensorDict that may be empty (checked when it is not)."""
    if not isinstance(head_params, TensorDictBase):
        raise TypeError(
            f"`head_params` must be a TensorDict (possibly empty), got {type(head_params).__name__}."
        )
    head_leaves = leaves(head_params)
    if head_leaves:
        check_params(head_params, "head_params")
    return head_leaves


def check_task_mapping(task_fns: Mapping[str, Any], head_params: TensorDictBase) -> None:
    """A mapping ``{task: loss function}`` needs ``head_params`` keyed by exactly those tasks."""
    if not task_fns or set(task_fns) != set(head_params.keys()):
        raise ValueError(
            "With `heads_fn` a mapping {task: loss function}, `head_params` must have exactly its "
            f"keys at the top level (one head per task); got tasks {sorted(task_fns)} and "
            f"head parameters {sorted(head_params.keys())}."
        )


def _task_loss(
    task_fn: Callable[..., Tensor],
    own_keys: Sequence[LeafKey],
    what: str,
    head_args: Sequence[Any],
    as_returned: Callable[[Sequence[Tensor]], Any],
    n_features: int,
    *tensors: Tensor,
) -> Tensor:
    """One task's loss from the features and its own head's parameter tensors, checked."""
    params = from_leaves(dict(zip(own_keys, tensors[n_features:], strict=True)), [])
    loss = task_fn(params, as_returned(tensors[:n_features]), *head_args)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        got = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{what} must return a scalar Tensor, got {got}.")
    return _check_output(loss, what)


def task_rows(
    task_fns: Mapping[str, Callable[..., Tensor]],
    head_params: TensorDictBase,
    features: Sequence[Tensor],
    as_returned: Callable[[Sequence[Tensor]], Any],
    head_args: Sequence[Any],
) -> tuple[Tensor, TensorDict, tuple[Tensor, ...]]:
    """Losses ``[m]``, head gradients and feature rows ``[m, *f.shape]`` for a mapping
    ``{task: fn}`` with ``fn(head_params[task], features, *head_args) -> scalar``: one backward
    pass per task, w.r.t. the features and that task's own head only. (One function for all the
    tasks, vmapped over the losses, would compute in every task's pass the zero cotangents of the
    other heads; and differentiating each task w.r.t. all the heads would materialise zeros.)"""
    losses: list[Tensor] = []
    rows: list[tuple[Tensor, ...]] = []
    head_grads: dict[str, TensorDict] = {}
    for name, task_fn in task_fns.items():
        own_td = head_params[name]
        own = leaves(own_td) if isinstance(own_td, TensorDictBase) else {}
        what = f"The loss function of task {name!r}"
        task = partial(_task_loss, task_fn, list(own), what, head_args, as_returned, len(features))
        loss, task_vjp = cast("tuple[Tensor, VjpFn]", vjp(task, *features, *own.values()))
        grads = task_vjp(torch.ones_like(loss))
        losses.append(loss)
        rows.append(tuple(grads[: len(features)]))
        head_grads[name] = from_leaves(dict(zip(own, grads[len(features) :], strict=True)), [])
    stacked = tuple(torch.stack(column) for column in zip(*rows, strict=True))
    return torch.stack(losses), TensorDict(head_grads, batch_size=[]), stacked
