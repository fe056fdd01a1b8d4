"""Seed 000 (instance-wise multi-task learning, IWMTL) written with the functional core.

The seed computes the generalized Gramian ``[16, 2, 2, 16]`` of the per-sample, per-task losses
with respect to the shared module, weights it with ``Flattening(UPGradWeighting())`` and back-
propagates ``losses.backward(weights)`` into all parameters. Here the per-sample Jacobian of the
losses of one sample (``[2]``) is mapped over the batch, the Gramian is taken on its shared part,
and the same weights combine the Jacobian rows of every parameter. The models and data are created
in the same order as in the seed, so with the same ``torch.manual_seed`` both train to the same
weights.
"""

import torch
from tensordict import TensorDict
from torch import Tensor
from torch.nn import Linear, ReLU, Sequential

from torchjd_func import (
    call,
    combine,
    flatten_gramian,
    gramian,
    params_of,
    reshape_weights,
    value_and_per_sample_jacobian,
)
from torchjd_func.aggregation import upgrad_weights

shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)

inputs = torch.randn(8, 16, 10)  # 8 batches of 16 random input vectors of length 10
task1_targets = torch.randn(8, 16)  # 8 batches of 16 targets for the first task
task2_targets = torch.randn(8, 16)  # 8 batches of 16 targets for the second task


def sample_losses(params: TensorDict, x: Tensor, target1: Tensor, target2: Tensor) -> Tensor:
    """The two task losses of one sample: ``[2]``."""
    features = call(shared_module, params["shared"], x)
    out1 = call(task1_module, params["task1"], features).squeeze(0)
    out2 = call(task2_module, params["task2"], features).squeeze(0)
    return torch.stack([(out1 - target1) ** 2, (out2 - target2) ** 2])


params = TensorDict(
    {
        "shared": params_of(shared_module),
        "task1": params_of(task1_module),
        "task2": params_of(task2_module),
    }
)
lr = 0.1

for input, target1, target2 in zip(inputs, task1_targets, task2_targets, strict=True):
    losses, jacobian, _ = value_and_per_sample_jacobian(
        sample_losses, params, input, target1, target2
    )  # losses: [16, 2]; jacobian leaves: [16, 2, *param.shape]
    generalized = gramian(jacobian["shared"])  # [16, 2, 2, 16], w.r.t. the shared module only
    weights = reshape_weights(upgrad_weights(flatten_gramian(generalized)), losses.shape)
    params = params - lr * combine(jacobian, weights)  # what losses.backward(weights) gives
