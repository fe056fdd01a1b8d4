"""Shared pieces of the autograd front door: argument checks, graph leaves, Jacobian rows."""

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjd_func._chunks import batched_vjp


def _tensor_list(value: Tensor | Iterable[Tensor], name: str) -> list[Tensor]:
    found = [value] if isinstance(value, Tensor) else list(value)
    for i, tensor in enumerate(found):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`{name}[{i}]` is a {type(tensor).__name__}, not a Tensor.")
    return found


def as_tensors(value: Tensor | Sequence[Tensor] | Iterable[Tensor], name: str) -> list[Tensor]:
    """A non-empty list of distinct tensors from a tensor or an iterable of tensors."""
    found = _tensor_list(value, name)
    if not found:
        raise ValueError(f"`{name}` is empty: give at least one tensor.")
    if len({id(t) for t in found}) != len(found):
        raise ValueError(f"`{name}` contains the same tensor twice: give each tensor once.")
    return found


def distinct_tensors(value: Tensor | Iterable[Tensor], name: str) -> list[Tensor]:
    """The tensors of a tensor or an iterable of tensors, each once (first occurrence kept), as
    TorchJD's ordered sets of inputs and parameters; possibly empty."""
    return list({id(t): t for t in _tensor_list(value, name)}.values())


def check_chunk_size(chunk_size: object) -> int | None:
    """``None`` or the chunk size as a positive ``int`` (any integer type: ``numpy.int64``, a
    0-d integer tensor); a bool is refused (``True`` would mean one row at a time)."""
    if chunk_size is None:
        return None
    size: int | None = None
    if not isinstance(chunk_size, bool):
        try:
            size = operator.index(chunk_size)  # type: ignore[arg-type]
        except TypeError:
            size = None
    if size is None or size < 1:
        raise ValueError(
            "`parallel_chunk_size` must be None (all rows at once) or a positive int, got "
            f"{chunk_size!r}."
        )
    return size


def check_expects_grad(tensors: Sequence[Tensor], name: str, field: str) -> None:
    """Refuses tensors whose ``field`` (``.grad`` or ``.jac``) cannot be populated: those that do
    not require grad, or are not leaves (and do not retain grad), as TorchJD does."""
    for i, tensor in enumerate(tensors):
        if not tensor.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` does not require grad: its `{field}` cannot be populated. Give "
                "only tensors with `requires_grad=True` (e.g. skip frozen parameters)."
            )
        if not (tensor.is_leaf or tensor.retains_grad):
            raise ValueError(
                f"`{name}[{i}]` is not a leaf tensor: its `{field}` cannot be populated. Give "
                "leaf tensors (e.g. parameters), or call `.retain_grad()` on it first."
            )


def leaf_tensors(roots: Iterable[Tensor], excluded: Iterable[Tensor] = ()) -> list[Tensor]:
    """The leaves requiring grad in the graph of ``roots``, in breadth-first order.

    The graph below the ``excluded`` tensors (e.g. the shared features, for a task's own
    parameters) is not visited.
    """
    stop = {t.grad_fn for t in excluded if t.grad_fn is not None}
    queue: list[Any] = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[Any] = set()
    found: list[Tensor] = []
    while queue:
        node = queue.pop(0)
        if node in seen or node in stop:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if variable.requires_grad and all(variable is not f for f in found):
                found.append(variable)
            continue
        queue.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return found


def reached(root: Tensor, targets: Sequence[Tensor]) -> list[bool]:
    """Whether each of ``targets`` is in the autograd graph of ``root`` (computes it)."""
    wanted = {t.grad_fn: i for i, t in enumerate(targets) if t.grad_fn is not None}
    leaves_wanted = {id(t): i for i, t in enumerate(targets) if t.grad_fn is None}
    found = [False] * len(targets)
    queue: list[Any] = [root.grad_fn] if root.grad_fn is not None else []
    seen: set[Any] = set()
    while queue:
        node = queue.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in wanted:
            found[wanted[node]] = True
            continue
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor) and id(variable) in leaves_wanted:
            found[leaves_wanted[id(variable)]] = True
        queue.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return found


def jacobian_rows(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    retain_graph: bool,
    chunk_size: int | None,
) -> tuple[Tensor, ...]:
    """``[k, *input.shape]`` for each input: the products of the ``k`` cotangent rows (each
    ``[k, *output.shape]``) with the Jacobian of ``outputs``, through the autograd graph.

    The graph is kept until the last chunk, which frees it unless ``retain_graph``.
    """
    outputs, inputs = list(outputs), list(inputs)

    def vjp(rows: tuple[Tensor, ...], is_last: bool) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=rows,
            retain_graph=retain_graph or not is_last,
            allow_unused=True,
            materialize_grads=True,
        )

    return batched_vjp(vjp, tuple(cotangents), chunk_size)


def identity_cotangents(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The rows of the ``M x M`` identity (``M = Σ numel``), split per tensor:
    ``[M, *t.shape]`` each, so that row ``i`` differentiates the ``i``-th scalar of all tensors."""
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    reference = tensors[0]
    identity = torch.eye(total, dtype=reference.dtype, device=reference.device)
    pieces = torch.split(identity, sizes, dim=1)
    return [
        piece.reshape((total, *t.shape)).to(t.dtype)
        for piece, t in zip(pieces, tensors, strict=True)
    ]


def accumulate_jacs(params: Sequence[Tensor], jacs: Sequence[Tensor]) -> None:
    """Adds each Jacobian into its tensor's ``.jac`` (set where absent), as TorchJD does."""
    for param, jac in zip(params, jacs, strict=True):
        if not param.requires_grad or not (param.is_leaf or param.retains_grad):
            raise ValueError(
                "Jacobians can only be stored on leaf tensors that require grad (or tensors that "
                "retain grad); got a non-leaf tensor. Pass leaf parameters as `inputs`."
            )
        existing = getattr(param, "jac", None)
        if existing is None:
            param.jac = jac  # type: ignore[attr-defined]
        else:
            param.jac = existing + jac  # type: ignore[attr-defined]


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Adds each gradient into its tensor's ``.grad`` (set where absent, added to in place
    where present), as autograd does.

    The callers check the tensors first (:func:`check_expects_grad`), before any state changes;
    this guard only keeps ``.grad`` off tensors autograd would never populate."""
    for param, grad in zip(params, grads, strict=True):
        if not param.requires_grad or not (param.is_leaf or param.retains_grad):
            raise ValueError(
                "Gradients can only be stored on leaf tensors that require grad (or tensors that "
                "retain grad)."
            )
        update = grad.detach().to(dtype=param.dtype)
        if param.grad is None:
            param.grad = update
        else:
            param.grad += update  # in place, as autograd and TorchJD: the `.grad` tensor is kept
