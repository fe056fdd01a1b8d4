"""Type aliases shared by the public modules."""

from typing import TypeAlias

from tensordict import TensorDict
from torch import Tensor

Params: TypeAlias = TensorDict
"""Parameters as a ``TensorDict`` whose nested keys mirror the module tree (leaf = parameter)."""

Jacobian: TypeAlias = TensorDict
"""A Jacobian: same keys as the params, leaves ``[*loss_shape, *param.shape]``,
``batch_size = loss_shape``."""

Gramian: TypeAlias = Tensor
"""A Gramian ``[m, m]``, or a generalized Gramian ``[*s, *reversed(s)]`` for losses of shape ``s``."""

Weights: TypeAlias = Tensor
"""Weights over the losses: ``[m]`` or ``loss_shape``."""

LeafKey: TypeAlias = tuple[str, ...]
"""The full nested key of one leaf of a TensorDict, e.g. ``("0", "weight")``."""
