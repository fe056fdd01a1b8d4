"""Mistakes a user can make, each of which ``mypy --strict`` must report with the code in its
``# type: ignore[...]``: run with ``warn_unused_ignores`` (part of ``--strict``), a mistake that
stops being caught fails the check (``tests/test_typed_usage.py``)."""

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import call, params_of, value_and_jacobian
from torchjd_func.aggregation import GradVacState, gradvac, upgrad
from torchjd_func.optim import AdamState, SGDState, adam, sgd
from torchjd_func.step import jd_step

model = nn.Linear(4, 2)
params = params_of(model)
x = torch.randn(8, 4)

# The state of one optimizer given to another.
wrong_opt_state: AdamState = sgd(lr=0.1).init(params)  # type: ignore[assignment]
sgd(lr=0.1).update(params, adam().init(params), params)  # type: ignore[arg-type]

# The state of one weighting given to another.
wrong_agg_state: GradVacState = upgrad().init(2)  # type: ignore[assignment]
upgrad().update(torch.eye(2), gradvac().init(2))  # type: ignore[arg-type]


# A loss function that returns a float, not a Tensor.
def float_loss(params: TensorDict, x: Tensor) -> float:
    return 0.0


jd_step(float_loss, upgrad(), sgd(lr=0.1))  # type: ignore[arg-type]
value_and_jacobian(float_loss, params, x)  # type: ignore[arg-type]


# A wrong return annotation: a Linear module's output is a Tensor.
def features(params: TensorDict, x: Tensor) -> tuple[Tensor, Tensor]:
    return call(model, params, x)  # type: ignore[return-value]


# The step's states read back with the wrong types.
step = jd_step(lambda p, x: call(model, p, x).sum(0), gradvac(), sgd(lr=0.1))
out = step(params, sgd(lr=0.1).init(params), gradvac().init(2), (x,))
steps_taken: int = out.opt_state  # type: ignore[assignment]
vaccine_state: SGDState = out.agg_state  # type: ignore[assignment]
