"""torchjd_func: functional Jacobian descent for PyTorch.

Jacobian descent trains a model on a vector of losses: compute the Jacobian of the losses (or only
its Gramian) with ``torch.func``, turn it into one update direction with an aggregator, and step.
Parameters, Jacobians and updates are TensorDicts keyed like the model's parameters.

Example:
    >>> import torch
    >>> from torchjd_func import call, combine, gramian, params_of, value_and_jacobian
    >>> model = torch.nn.Linear(4, 2)
    >>> params = params_of(model)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
    >>> def losses_fn(params, x, y):  # one loss per output: shape [2]
    ...     return (call(model, params, x) - y).pow(2).mean(dim=0)
    >>> losses, jac, _ = value_and_jacobian(losses_fn, params, x, y)
    >>> gramian(jac).shape
    torch.Size([2, 2])
    >>> update = combine(jac, torch.full((2,), 0.5))  # the mean of the two gradients
    >>> params = params - 0.1 * update
"""

from torchjd_func._gramian import (
    accumulate_grads,
    combine,
    flatten_gramian,
    gramian,
    inner_products,
    reshape_weights,
)
from torchjd_func._grouping import (
    GroupingStrategy,
    Groups,
    group_gramians,
    group_params,
    split_by_group,
)
from torchjd_func._jacobian import (
    JacobianOutput,
    MTLJacobian,
    jacobian,
    mtl_jacobian,
    per_sample_jacobian,
    value_and_jacobian,
    value_and_per_sample_jacobian,
)
from torchjd_func._tree import call, params_of
from torchjd_func._types import Gramian, Jacobian, Params, Weights

__all__ = [
    "Gramian",
    "GroupingStrategy",
    "Groups",
    "Jacobian",
    "JacobianOutput",
    "MTLJacobian",
    "Params",
    "Weights",
    "accumulate_grads",
    "call",
    "combine",
    "flatten_gramian",
    "gramian",
    "group_gramians",
    "group_params",
    "inner_products",
    "jacobian",
    "mtl_jacobian",
    "params_of",
    "per_sample_jacobian",
    "reshape_weights",
    "split_by_group",
    "value_and_jacobian",
    "value_and_per_sample_jacobian",
]

__version__ = "0.1.0.dev0"
