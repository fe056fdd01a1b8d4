"""A user's training script, type-checked with ``mypy --strict`` against the installed package
(``tests/test_typed_usage.py``): it must pass, and the types must be the precise ones."""

from typing import assert_type

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import (
    JacobianOutput,
    Params,
    call,
    combine,
    gramian,
    params_of,
    value_and_jacobian,
)
from torchjd_func.aggregation import (
    Aggregation,
    EmptyState,
    GradVacState,
    PureWeighting,
    UPGrad,
    aggregate,
    gradvac,
    upgrad,
)
from torchjd_func.optim import AdamState, Optimizer, SGDState, adam, sgd
from torchjd_func.step import StepFn, StepOutput, jd_step, per_sample_step

model = nn.Linear(4, 2)
params: Params = params_of(model)
x, y = torch.randn(16, 4), torch.randn(16, 2)


def losses_fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(model, params, x) - y).pow(2).mean(dim=0)


def losses_and_outputs(params: TensorDict, x: Tensor) -> tuple[Tensor, Tensor]:
    outputs = call(model, params, x)
    return outputs.pow(2).mean(dim=0), outputs


assert_type(call(model, params, x), Tensor)
value, jac, aux = value_and_jacobian(losses_fn, params, x, y)
assert_type(value_and_jacobian(losses_fn, params, x, y), JacobianOutput[None])
assert_type(value_and_jacobian(losses_and_outputs, params, x, has_aux=True), JacobianOutput[Tensor])
assert_type(gramian(jac), Tensor)
update: TensorDict = combine(jac, torch.full((2,), 0.5))

weighting = upgrad()
assert_type(weighting, PureWeighting[EmptyState])
state = weighting.init(2)
assert_type(state, EmptyState)
weights, state = weighting.update(gramian(jac), state)
assert_type(aggregate(jac, weighting, state), Aggregation[EmptyState])

vaccine = gradvac(beta=0.5)
assert_type(vaccine.init(2).targets, Tensor)
assert_type(aggregate(jac, vaccine, vaccine.init(2)).state, GradVacState)

optimizer = sgd(lr=0.1, momentum=0.9)
assert_type(optimizer, Optimizer[SGDState])
opt_state = optimizer.init(params)
assert_type(adam(lr=1e-3).init(params), AdamState)

step = jd_step(losses_fn, weighting, optimizer)
assert_type(step, StepFn[SGDState, EmptyState])
compiled = torch.compile(step, fullgraph=True)
out = step(params, opt_state, state, (x, y))
assert_type(out, StepOutput[SGDState, EmptyState])
params, opt_state, state = out.params, out.opt_state, out.agg_state
losses: Tensor = out.metrics["losses"]

sample_step = per_sample_step(
    lambda p, xi, yi: (call(model, p, xi) - yi).pow(2).sum(), gradvac(), adam()
)
assert_type(sample_step, StepFn[AdamState, GradVacState])

aggregator = UPGrad()
direction: Tensor = aggregator(torch.randn(2, 5))
