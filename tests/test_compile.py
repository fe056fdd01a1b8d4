"""The functional core under ``torch.compile(fullgraph=True)``: no graph break, no recompile."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from tests.settings import DEVICE
from tests.utils import dotted_leaves
from torchjd_func import (
    call,
    combine,
    gramian,
    mtl_jacobian,
    params_of,
    value_and_jacobian,
    value_and_per_sample_jacobian,
)

MLP = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
HEADS = nn.ModuleList([nn.Linear(16, 1) for _ in range(3)])
MLP.to(DEVICE)
HEADS.to(DEVICE)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def jd_step(params: TensorDict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, TensorDict]:
    """Jacobian, Gramian and the mean-weighted update of three regression losses."""

    def losses_fn(p: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return (call(MLP, p, x) - y).pow(2).mean(dim=0)

    losses, jac, _ = value_and_jacobian(losses_fn, params, x, y, chunk_size=2)
    weights = torch.full_like(losses, 1.0 / losses.numel())
    return losses, gramian(jac), combine(jac, weights)


def per_sample_step(params: TensorDict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, TensorDict]:
    def sample_losses(p: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return (call(MLP, p, x) - y).pow(2)  # IWMTL: [m] per sample

    losses, jac, _ = value_and_per_sample_jacobian(sample_losses, params, x, y)
    return losses, gramian(jac), combine(jac, torch.ones_like(losses))


def mtl_step(params: TensorDict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, TensorDict]:
    def trunk_fn(p: TensorDict, x: Tensor) -> Tensor:
        return call(MLP[:4], p, x)

    def heads_fn(p: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        outs = [call(head, p[str(i)], features).squeeze(1) for i, head in enumerate(HEADS)]
        return torch.stack([(out - y[:, i]).pow(2).mean() for i, out in enumerate(outs)])

    trunk_params = params.select("0", "2")
    out = mtl_jacobian(trunk_fn, heads_fn, trunk_params, params_of(HEADS), (x,), (y,))
    return out.losses, gramian(out.jacobian), combine(out.jacobian, torch.ones_like(out.losses))


STEPS = [jd_step, per_sample_step, mtl_step]


def _data() -> tuple[Tensor, Tensor]:
    return torch.randn(8, 6, device=DEVICE), torch.randn(8, 3, device=DEVICE)


def _assert_same(actual: Any, expected: Any) -> None:
    losses, gram, update = actual
    torch.testing.assert_close(losses, expected[0])
    torch.testing.assert_close(gram, expected[1])
    expected_update = dotted_leaves(expected[2])
    for name, value in dotted_leaves(update).items():
        torch.testing.assert_close(value, expected_update[name])


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
def test_no_graph_break_and_no_recompile(step: Callable[..., Any]) -> None:
    params = params_of(MLP)
    explanation = torch._dynamo.explain(step)(params, *_data())
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(3):
        x, y = _data()
        _assert_same(compiled(params, x, y), step(params, x, y))
    assert counter.frame_count == 1


def test_inductor_matches_eager() -> None:
    params = params_of(MLP)
    compiled = torch.compile(jd_step, fullgraph=True)
    x, y = _data()
    _assert_same(compiled(params, x, y), jd_step(params, x, y))
