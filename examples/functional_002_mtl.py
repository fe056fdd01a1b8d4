"""Seed 002 (multi-task learning with UPGrad) written with the functional core.

The same model, data and updates as ``seed_002_mtl.py`` (it creates them in the same order, so
with the same ``torch.manual_seed`` both train to the same weights), but functional: parameters
are TensorDicts passed in and returned, `mtl_jacobian` gives the trunk's Jacobian through the
features and the heads' gradients in one forward pass, `aggregate` applies the pure UPGrad
weighting, and SGD is a subtraction.
"""

import torch
from tensordict import TensorDict
from torch import Tensor
from torch.nn import Linear, ReLU, Sequential
from torch.nn.functional import mse_loss

from torchjd_func import call, mtl_jacobian, params_of
from torchjd_func.aggregation import aggregate, upgrad

shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)

inputs = torch.randn(8, 16, 10)  # 8 batches of 16 random input vectors of length 10
task1_targets = torch.randn(8, 16, 1)  # 8 batches of 16 targets for the first task
task2_targets = torch.randn(8, 16, 1)  # 8 batches of 16 targets for the second task


def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
    features: Tensor = call(shared_module, params, x)
    return features


def heads_fn(params: TensorDict, features: Tensor, target1: Tensor, target2: Tensor) -> Tensor:
    loss1 = mse_loss(call(task1_module, params["task1"], features), target1)
    loss2 = mse_loss(call(task2_module, params["task2"], features), target2)
    return torch.stack([loss1, loss2])


shared = params_of(shared_module)
heads = TensorDict({"task1": params_of(task1_module), "task2": params_of(task2_module)})
weighting = upgrad()
state = weighting.init(2)
lr = 0.1

for input, target1, target2 in zip(inputs, task1_targets, task2_targets, strict=True):
    out = mtl_jacobian(trunk_fn, heads_fn, shared, heads, (input,), (target1, target2))
    update, weights, state = aggregate(out.jacobian, weighting, state)
    shared = shared - lr * update
    heads = heads - lr * out.head_grads
