"""What the Jacobian aggregators share: the leaves of a Jacobian in a fixed order, the dtype they
are computed in, and the layout of their flattened concatenation.

The order is that of the sorted leaf keys (not the TensorDict's insertion order), so that two
Jacobians of the same parameters built in different ways lay out identically; a state stored
flattened (ExcessMTL's running sum ``[m, n]``) relies on it.
"""

import torch
from tensordict import TensorDictBase
from torch import Tensor

from torchjd_func._tree import leaves
from torchjd_func._types import LeafKey

__all__ = ["check_m", "ordered_leaves", "params_layout", "work_dtype"]


def ordered_leaves(td: TensorDictBase) -> list[tuple[LeafKey, Tensor]]:
    """The leaves of ``td`` (a Jacobian or the parameters), in sorted key order."""
    found = leaves(td)
    return [(key, found[key]) for key in sorted(found)]


def work_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The promoted dtype of ``tensors``, at least float32 (float16 and bfloat16 are computed in
    float32, as :func:`~torchjd_func.combine` does)."""
    out = torch.float32
    for tensor in tensors:
        out = torch.promote_types(out, tensor.dtype)
    return out


def params_layout(params: TensorDictBase) -> tuple[int, torch.dtype, torch.device]:
    """``(n, dtype, device)`` of ``params``: the total number of entries of its leaves, their
    work dtype (:func:`work_dtype`) and their device.

    Raises:
        TypeError: ``params`` is not a TensorDict, or a leaf is not floating-point.
        ValueError: ``params`` has no leaf.
    """
    if not isinstance(params, TensorDictBase):
        raise TypeError(
            "`init` takes the parameters (or a Jacobian) as a TensorDict, got "
            f"{type(params).__name__}."
        )
    values = [value for _, value in ordered_leaves(params)]
    if not values:
        raise ValueError("The parameters have no leaf: there is nothing to aggregate.")
    for value in values:
        if not value.is_floating_point():
            raise TypeError(f"Expected floating-point parameters, got dtype {value.dtype}.")
    # A Jacobian (batch_size [m]) has the layout of its parameters: its leading dim is not one.
    batch = len(params.batch_size)
    n = sum(value.shape[batch:].numel() for value in values)
    return n, work_dtype(values), values[0].device


def check_m(m: object) -> int:
    """Checks the number of losses given to an ``init``: a positive int."""
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"The number of losses `m` must be an int, got {type(m).__name__}.")
    if m < 1:
        raise ValueError(
            f"The number of losses must be positive, got m = {m}: there is no loss to weight."
        )
    return m
