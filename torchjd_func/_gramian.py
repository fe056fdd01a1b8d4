"""Gramians of Jacobian TensorDicts, generalized Gramians, and combining Jacobian rows.

For a Jacobian ``J`` of losses of shape ``s`` (leaves ``[*s, *param.shape]``), the Gramian is the
matrix of inner products of its rows, ``G = Σ_leaves J_leaf J_leafᵀ``: ``G[i, j] = <∇L_i, ∇L_j>``.
It is summed leaf by leaf, so the Jacobian is never concatenated into one ``[m, n]`` matrix.
"""

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from torchjd_func._tree import dotted, from_leaves, leaves
from torchjd_func._types import Gramian, Weights

__all__ = [
    "accumulate_grads",
    "combine",
    "flatten_gramian",
    "gramian",
    "inner_products",
    "reshape_weights",
]


def _check_jacobian(jac: object) -> dict[tuple[str, ...], Tensor]:
    if not isinstance(jac, TensorDictBase):
        raise TypeError(
            f"Expected a Jacobian TensorDict (from `jacobian`), got {type(jac).__name__}."
        )
    found = leaves(jac)
    if not found:
        raise ValueError("The Jacobian is empty: it has no leaf.")
    devices = {leaf.device for leaf in found.values()}
    if len(devices) > 1:
        raise ValueError(
            f"The Jacobian's leaves are on several devices: {sorted(map(str, devices))}."
        )
    return found


def _accumulation(leaf: Tensor) -> torch.dtype:
    """The dtype to reduce ``leaf`` in: its own, and at least float32 (float16 sums overflow)."""
    return torch.promote_types(leaf.dtype, torch.float32)


def gramian(jac: TensorDictBase) -> Gramian:
    """The (generalized) Gramian of a Jacobian TensorDict.

    For a Jacobian of losses of shape ``s`` (``jac.batch_size == s``) with ``k = len(s)``, returns
    the generalized Gramian of shape ``[*s, *reversed(s)]``:
    ``G[i_1, …, i_k, j_k, …, j_1] = <∇L[i_1, …, i_k], ∇L[j_1, …, j_k]>``. For losses ``[m]`` this
    is the usual ``[m, m]`` Gramian ``J Jᵀ``; for per-sample, per-task losses ``[B, m]`` it is
    ``[B, m, m, B]``, as TorchJD's autogram engine gave it (seed 000); for a scalar loss it is the
    0-d squared gradient norm. :func:`flatten_gramian` turns it into a square matrix.

    The sum runs leaf by leaf (``J_leaf J_leafᵀ``), in the promoted dtype of the leaves and at
    least float32: float16 and bfloat16 leaves are accumulated, and returned, in float32, since
    ``‖∇L_i‖²`` overflows float16 once it exceeds 65504. Non-finite entries propagate.

    Args:
        jac: A Jacobian TensorDict, leaves ``[*s, *param.shape]``, ``batch_size = s``.

    Returns:
        A Tensor of shape ``[*s, *reversed(s)]``, symmetric positive semi-definite once flattened.

    Raises:
        TypeError: ``jac`` is not a TensorDict.
        ValueError: ``jac`` has no leaf, no row (a loss shape with a 0) or leaves on several
            devices.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import gramian
        >>> jac = TensorDict({"w": torch.tensor([[-4.0, 1.0], [6.0, 1.0]]), "b": torch.ones(2, 1)}, [2])
        >>> gramian(jac)
        tensor([[ 18., -22.],
                [-22.,  38.]])
    """
    found = _check_jacobian(jac)
    loss_shape = jac.batch_size
    n_rows = loss_shape.numel()
    if n_rows == 0:
        raise ValueError(
            f"The Jacobian has no row (batch_size {list(loss_shape)}): there is no loss to take "
            "the Gramian of. Give at least one loss."
        )
    dtype = torch.float32
    for leaf in found.values():
        dtype = torch.promote_types(dtype, leaf.dtype)
    flat: Tensor | None = None
    for leaf in found.values():
        rows = leaf.reshape(n_rows, -1).to(dtype)
        term = rows @ rows.T
        flat = term if flat is None else flat + term
    assert flat is not None  # _check_jacobian guarantees a leaf
    k = len(loss_shape)
    squared = flat.reshape((*loss_shape, *loss_shape))
    return squared.permute((*range(k), *reversed(range(k, 2 * k))))


def _loss_shape_of(generalized: Tensor) -> torch.Size:
    if generalized.ndim % 2:
        raise ValueError(
            f"A generalized Gramian has an even number of dims ([*s, *reversed(s)]), got shape "
            f"{list(generalized.shape)}."
        )
    k = generalized.ndim // 2
    shape = generalized.shape
    if list(shape[:k]) != list(reversed(shape[k:])):
        raise ValueError(
            f"A generalized Gramian has shape [*s, *reversed(s)], got {list(shape)}: the last "
            f"{k} dims are not the first {k} reversed."
        )
    return shape[:k]


def flatten_gramian(generalized: Gramian) -> Gramian:
    """The square ``[M, M]`` Gramian of a generalized Gramian ``[*s, *reversed(s)]``.

    ``M = prod(s)`` and rows follow ``losses.flatten()`` order, so weights ``w`` of shape ``[M]``
    computed from the result are put back in the losses' shape by :func:`reshape_weights`.
    A ``[m, m]`` Gramian is returned unchanged; a 0-d one becomes ``[1, 1]``.

    Args:
        generalized: A Gramian of shape ``[*s, *reversed(s)]``.

    Returns:
        The ``[M, M]`` Gramian.

    Raises:
        ValueError: the shape is not of the form ``[*s, *reversed(s)]``.

    Example:
        >>> import torch
        >>> from torchjd_func import flatten_gramian, gramian, jacobian
        >>> from tensordict import TensorDict
        >>> jac = TensorDict({"p": torch.randn(16, 2, 5)}, batch_size=[16, 2])
        >>> gramian(jac).shape, flatten_gramian(gramian(jac)).shape
        (torch.Size([16, 2, 2, 16]), torch.Size([32, 32]))
    """
    loss_shape = _loss_shape_of(generalized)
    k = len(loss_shape)
    n_rows = loss_shape.numel()
    unreversed = generalized.permute((*range(k), *reversed(range(k, 2 * k))))
    return unreversed.reshape(n_rows, n_rows)


def reshape_weights(
    weights: Weights, loss_shape: torch.Size | list[int] | tuple[int, ...]
) -> Weights:
    """Puts weights ``[M]`` computed on a flattened Gramian back in the losses' shape ``s``.

    Args:
        weights: A vector ``[M]``, ``M = prod(loss_shape)``.
        loss_shape: The shape ``s`` of the losses.

    Returns:
        ``weights`` with shape ``loss_shape``.

    Raises:
        ValueError: ``weights`` is not a vector of ``prod(loss_shape)`` entries.

    Example:
        >>> import torch
        >>> from torchjd_func import reshape_weights
        >>> reshape_weights(torch.arange(6.0), [3, 2])
        tensor([[0., 1.],
                [2., 3.],
                [4., 5.]])
    """
    shape = torch.Size(loss_shape)
    if weights.ndim != 1 or weights.shape[0] != shape.numel():
        raise ValueError(
            f"Expected weights of shape [{shape.numel()}] for losses of shape {list(shape)}, got "
            f"{list(weights.shape)}."
        )
    return weights.reshape(shape)


def combine(jac: TensorDictBase, weights: Weights) -> TensorDict:
    """The weighted sum of the rows of a Jacobian: ``Σ_i w_i J_i``, params-shaped.

    With ``w`` the weights of an aggregator, this is the update direction ``Jᵀw``; with the
    ones, the gradient of the summed losses.

    Args:
        jac: A Jacobian TensorDict, leaves ``[*s, *param.shape]``.
        weights: Weights of shape ``s`` (``jac.batch_size``), on the Jacobian's device, of any
            floating dtype (e.g. float32 weights of a float16 Jacobian).

    Returns:
        A TensorDict with ``batch_size=[]`` and leaves ``param.shape``, each in its leaf's dtype.
        The sum runs in at least float32 (float16 and bfloat16 leaves are cast up, then the
        result back), so it overflows only if the update itself does. Non-finite entries
        propagate.

    Raises:
        TypeError: ``jac`` is not a TensorDict or ``weights`` is not a Tensor.
        ValueError: ``weights`` does not have the shape of the losses, or is on another device.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import combine
        >>> jac = TensorDict({"p": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, batch_size=[2])
        >>> combine(jac, torch.tensor([0.5, 0.5]))["p"]
        tensor([1., 1., 1.])
    """
    found = _check_jacobian(jac)
    if not isinstance(weights, Tensor):
        raise TypeError(f"`weights` must be a Tensor, got {type(weights).__name__}.")
    if weights.shape != jac.batch_size:
        raise ValueError(
            f"`weights` must have the shape of the losses, {list(jac.batch_size)}, got "
            f"{list(weights.shape)}. Use `reshape_weights` for weights from a flattened Gramian."
        )
    device = next(iter(found.values())).device
    if weights.device != device:
        raise ValueError(
            f"`weights` is on {weights.device} but the Jacobian is on {device}: move one of them."
        )
    k = weights.ndim
    combined = {
        key: torch.tensordot(
            weights.to(_accumulation(leaf)), leaf.to(_accumulation(leaf)), dims=k
        ).to(leaf.dtype)
        for key, leaf in found.items()
    }
    return from_leaves(combined, batch_size=[])


def inner_products(jac: TensorDictBase, direction: TensorDictBase) -> Tensor:
    """The product ``J d`` of a Jacobian with a params-shaped direction: one value per loss.

    ``(J d)_i = <∇L_i, d>`` is the first-order change of loss ``i`` along ``d``; for an update
    ``d`` applied as ``params - lr * d``, the losses change by ``-lr * (J d)`` to first order, so
    a non-negative ``J d`` means no loss increases. UPGrad guarantees it up to its
    regularisation: its weights satisfy ``J d = G w ≥ −reg_eps·tr(G)·w`` entrywise (exactly
    non-negative with ``reg_eps=0``).

    Args:
        jac: A Jacobian TensorDict (leaves ``[*s, *param.shape]``).
        direction: A TensorDict with the same keys, leaves ``param.shape`` (e.g. from
            :func:`combine`).

    Returns:
        A tensor of the losses' shape ``s``, in the promoted dtype of the leaves and at least
        float32 (as :func:`gramian`). Non-finite entries propagate.

    Raises:
        ValueError: the keys or shapes of ``direction`` do not match the Jacobian's.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import combine, inner_products
        >>> jac = TensorDict({"p": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, batch_size=[2])
        >>> inner_products(jac, combine(jac, torch.tensor([0.5, 0.5])))  # the mean conflicts
        tensor([-2., 8.])
    """
    found = _check_jacobian(jac)
    if not isinstance(direction, TensorDictBase):
        raise TypeError(f"`direction` must be a TensorDict, got {type(direction).__name__}.")
    directions = leaves(direction)
    if set(directions) != set(found):
        raise ValueError(
            "`direction` must have the keys of the Jacobian: "
            f"{sorted(map(dotted, found))}, got {sorted(map(dotted, directions))}."
        )
    k = len(jac.batch_size)
    total: Tensor | None = None
    for key, leaf in found.items():
        d = directions[key]
        if leaf.shape[k:] != d.shape:
            raise ValueError(
                f"`direction[{dotted(key)!r}]` has shape {list(d.shape)}, expected "
                f"{list(leaf.shape[k:])}."
            )
        dtype = _accumulation(leaf)
        term = torch.tensordot(leaf.to(dtype), d.to(dtype), dims=d.ndim)
        total = term if total is None else total + term
    assert total is not None  # _check_jacobian guarantees a leaf
    return total


def accumulate_grads(module: nn.Module, grads: TensorDictBase) -> None:
    """Adds a params-shaped TensorDict of gradients into the ``.grad`` fields of ``module``.

    For ``torch.optim`` users: compute an update with the functional API, accumulate it, then
    call ``optimizer.step()``. ``.grad`` is set where it is ``None`` and added to otherwise, as
    autograd does. Parameters that ``grads`` does not name are left untouched.

    Args:
        module: The module whose parameters receive the gradients.
        grads: Gradients keyed like :func:`params_of` keys the module (e.g. from :func:`combine`).

    Raises:
        TypeError: ``module`` is not a Module or ``grads`` is not a TensorDict.
        ValueError: ``grads`` names a parameter the module does not have, or a gradient's shape
            differs from its parameter's.

    Example:
        >>> import torch
        >>> from torchjd_func import accumulate_grads, params_of
        >>> model = torch.nn.Linear(2, 1)
        >>> accumulate_grads(model, params_of(model).apply(torch.ones_like))
        >>> model.weight.grad
        tensor([[1., 1.]])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    if not isinstance(grads, TensorDictBase):
        raise TypeError(f"`grads` must be a TensorDict, got {type(grads).__name__}.")
    named = dict(module.named_parameters())
    found = {dotted(key): value for key, value in leaves(grads).items()}
    unknown = sorted(set(found) - set(named))
    if unknown:
        raise ValueError(f"{type(module).__name__} has no parameter named {unknown}.")
    for name, grad in found.items():
        param = named[name]
        if grad.shape != param.shape:
            raise ValueError(
                f"The gradient for {name!r} has shape {list(grad.shape)}, but the parameter has "
                f"shape {list(param.shape)}."
            )
        update = grad.detach().to(device=param.device, dtype=param.dtype)
        if param.grad is None:
            param.grad = update.clone()
        else:
            param.grad += update
