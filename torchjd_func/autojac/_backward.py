"""``backward`` and ``jac``: Jacobians through an existing autograd graph."""

from collections.abc import Iterable, Sequence

from torch import Tensor

from torchjd_func.autojac._utils import (
    accumulate_jacs,
    as_tensors,
    check_chunk_size,
    check_expects_grad,
    distinct_tensors,
    identity_cotangents,
    jacobian_rows,
    leaf_tensors,
)

__all__ = ["backward", "jac"]


def _given_rows(
    tensors: list[Tensor], given: Sequence[Tensor] | Tensor | None, name: str
) -> list[Tensor] | None:
    """The checked ``jac_tensors``/``jac_outputs`` (``None`` if not given: the identity)."""
    if given is None:
        if sum(t.numel() for t in tensors) == 0:
            raise ValueError(
                f"The tensors to differentiate have no element (shapes "
                f"{[list(t.shape) for t in tensors]}): there is no row to compute. Give at least "
                "one loss."
            )
        return None
    rows = as_tensors(given, name)
    if len(rows) != len(tensors):
        raise ValueError(
            f"`{name}` has {len(rows)} tensors but there are {len(tensors)} tensors to "
            "differentiate: give one Jacobian per tensor."
        )
    for i, (row, tensor) in enumerate(zip(rows, tensors, strict=True)):
        if row.ndim == 0 or row.shape[1:] != tensor.shape:
            raise ValueError(
                f"`{name}[{i}]` must have shape [k, *{list(tensor.shape)}], got {list(row.shape)}."
            )
    if len({row.shape[0] for row in rows}) != 1:
        raise ValueError(
            f"The tensors of `{name}` must all have the same number of rows (first dim), got "
            f"{[row.shape[0] for row in rows]}."
        )
    if rows[0].shape[0] == 0:
        raise ValueError(f"`{name}` has no row (first dim 0): give at least one row.")
    return rows


def _check_differentiable(tensors: list[Tensor], name: str) -> None:
    for i, tensor in enumerate(tensors):
        if not tensor.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` does not require grad: it was not computed from parameters "
                "that require grad (or the graph was built under `torch.no_grad`)."
            )


def backward(
    tensors: Sequence[Tensor] | Tensor,
    /,
    *,
    jac_tensors: Sequence[Tensor] | Tensor | None = None,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """Computes the Jacobian of ``tensors`` w.r.t. ``inputs`` and adds it to their ``.jac``.

    The Jacobian has one row per scalar of ``tensors`` (``M = Σ numel``); ``input.jac`` has
    shape ``[M, *input.shape]``. With ``jac_tensors`` (one ``[k, *t.shape]`` per tensor), the
    ``k`` rows ``Σ_t jac_tensors[t] ∂t/∂input`` are computed instead (the chain rule). Aggregate
    the stored Jacobians into ``.grad`` with :func:`jac_to_grad`. Rows are computed with
    vector-Jacobian products through the autograd graph, vmapped ``parallel_chunk_size`` at a
    time (one chunked helper shared with the functional core).

    Args:
        tensors: The tensors to differentiate (e.g. a vector of losses).
        jac_tensors: Optional Jacobians of some downstream quantity w.r.t. ``tensors``.
        inputs: The tensors that receive ``.jac`` (a tensor repeated is counted once); default:
            the leaves requiring grad in the graph of ``tensors``. An empty iterable is a no-op,
            as in TorchJD: nothing is computed, no ``.jac`` is touched and the graph is kept
            (``tensors`` and ``jac_tensors`` are still checked).
        retain_graph: Keep the graph (to differentiate it again).
        parallel_chunk_size: Rows differentiated at once; ``None``: all, ``1``: one at a time
            without ``vmap``. Any positive integer (``int``, ``numpy.int64``, a 0-d integer
            tensor); not a bool.

    Raises:
        ValueError: empty or repeated tensors, tensors with no element, tensors that do not
            require grad, mismatched ``jac_tensors`` or ones with no row, a chunk size that is
            not a positive integer, or inputs that do not require grad or are not leaves (and do
            not retain grad). Every check runs before anything is computed or stored.
        TypeError: an element of ``tensors``, ``jac_tensors`` or ``inputs`` that is not a Tensor.

    Example:
        >>> import torch
        >>> from torchjd_func.autojac import backward
        >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> losses = torch.stack([param.sum(), (param**2).sum()])
        >>> backward(losses)
        >>> param.jac
        tensor([[1., 1.],
                [2., 4.]])

        A repeated input gets its Jacobian once; no input is a no-op:

        >>> losses = torch.stack([param.sum(), (param**2).sum()])
        >>> backward(losses, inputs=[param, param], retain_graph=True)
        >>> param.jac  # the first Jacobian plus this one
        tensor([[2., 2.],
                [4., 8.]])
        >>> backward(losses, inputs=[])
        >>> param.jac
        tensor([[2., 2.],
                [4., 8.]])
    """
    chunk_size = check_chunk_size(parallel_chunk_size)
    outputs = as_tensors(tensors, "tensors")
    if inputs is None:
        _check_differentiable(outputs, "tensors")
        given = _given_rows(outputs, jac_tensors, "jac_tensors")
        targets = leaf_tensors(outputs)
        if not targets:
            raise ValueError("`tensors` depend on no leaf tensor that requires grad.")
    else:
        targets = distinct_tensors(inputs, "inputs")
        given = _given_rows(outputs, jac_tensors, "jac_tensors")
        if not targets:
            return  # as TorchJD: nothing to differentiate, the graph is left as it is
        _check_differentiable(outputs, "tensors")
        check_expects_grad(targets, "inputs", ".jac")
    cotangents = identity_cotangents(outputs) if given is None else given
    jacs = jacobian_rows(outputs, targets, cotangents, retain_graph, chunk_size)
    accumulate_jacs(targets, jacs)


def jac(
    outputs: Sequence[Tensor] | Tensor,
    inputs: Sequence[Tensor] | Tensor,
    *,
    jac_outputs: Sequence[Tensor] | Tensor | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    """The Jacobian of ``outputs`` w.r.t. each of ``inputs``, returned (nothing is stored).

    Args:
        outputs: The tensors to differentiate.
        inputs: The tensors to differentiate with respect to (leaves or not, requiring grad). A
            tensor repeated is differentiated once and its Jacobian returned at each place.
        jac_outputs: Optional Jacobians ``[k, *output.shape]`` to chain with (see
            :func:`backward`).
        retain_graph: Keep the graph.
        parallel_chunk_size: Rows differentiated at once (see :func:`backward`).

    Returns:
        One ``[M, *input.shape]`` tensor per input, in the order of ``inputs``; ``()`` for no
        input, as in TorchJD (nothing is computed and the graph is kept; ``outputs`` and
        ``jac_outputs`` are still checked).

    Raises:
        ValueError: as :func:`backward`; inputs need not be leaves but must require grad.
        TypeError: an element of ``outputs``, ``jac_outputs`` or ``inputs`` that is not a Tensor.

    Example:
        >>> import torch
        >>> from torchjd_func.autojac import jac
        >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (jacobian,) = jac(torch.stack([param.sum(), (param**2).sum()]), param)
        >>> jacobian
        tensor([[1., 1.],
                [2., 4.]])
        >>> jac(param.sum(), [])
        ()
    """
    chunk_size = check_chunk_size(parallel_chunk_size)
    differentiated = as_tensors(outputs, "outputs")
    targets = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    distinct = distinct_tensors(targets, "inputs")
    given = _given_rows(differentiated, jac_outputs, "jac_outputs")
    if not distinct:
        return ()  # as TorchJD: no input, no Jacobian, the graph is left as it is
    _check_differentiable(differentiated, "outputs")
    for i, target in enumerate(targets):
        if not target.requires_grad:
            raise ValueError(
                f"`inputs[{i}]` does not require grad: there is no Jacobian with respect to it. "
                "Give tensors that require grad (leaves or intermediate results)."
            )
    cotangents = identity_cotangents(differentiated) if given is None else given
    rows = jacobian_rows(differentiated, distinct, cotangents, retain_graph, chunk_size)
    by_id = {id(t): row for t, row in zip(distinct, rows, strict=True)}
    return tuple(by_id[id(t)] for t in targets)
