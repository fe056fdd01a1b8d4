"""Type aliases shared by the public modules."""

from collections.abc import Callable, Sequence
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

# The arguments of user functions are ``...``: ``Callable[Concatenate[TensorDict, ...], Tensor]``
# would also check the params' type, but mypy then cannot infer the type of a lambda.
LossFn: TypeAlias = Callable[..., Tensor]
"""``fn(params, *args) -> losses``: the params (a TensorDict) first, then any inputs."""

FeaturesFn: TypeAlias = Callable[..., Tensor | Sequence[Tensor]]
"""``trunk_fn(shared_params, *args) -> features``: a Tensor or a sequence of Tensors."""
