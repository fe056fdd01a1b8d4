"""Whole training steps: correct, compiled into one graph once, equal to eager."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from tests.architectures import reference_jacobian
from tests.settings import DEVICE
from tests.utils import NoHostSync, assert_close, dotted_leaves
from torchjd_func import accumulate_grads, call, params_of, value_and_jacobian
from torchjd_func.aggregation import PureWeighting, aggregate, gradvac, upgrad, upgrad_weights
from torchjd_func.optim import adam, sgd
from torchjd_func.step import StepFn, jd_step, mtl_step, per_sample_step

torch.manual_seed(0)
TRUNK = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU()).to(DEVICE)
HEADS = nn.ModuleDict({f"task{i}": nn.Linear(8, 1) for i in range(3)}).to(DEVICE)
MODEL = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(DEVICE)
BATCH = 8


def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
    return call(TRUNK, params, x)


def heads_fn(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
    return torch.stack(
        [
            (call(HEADS[name], params[name], features).squeeze(1) - y[:, i]).pow(2).mean()
            for i, name in enumerate(HEADS)
        ]
    )


def losses_fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2).mean(dim=0)  # [m]


def iwrm_loss(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2).mean()  # one sample -> []


def iwmtl_losses(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2)  # one sample -> [m]


class Case:
    def __init__(
        self,
        name: str,
        build: Callable[[PureWeighting[Any]], StepFn[Any, Any]],
        params: Callable[[], TensorDict],
        batch: Callable[[], Any],
        n_losses: int,
    ) -> None:
        self.name, self.build, self.params, self.batch, self.n_losses = (
            name,
            build,
            params,
            batch,
            n_losses,
        )

    def __str__(self) -> str:
        return self.name


def _xy() -> tuple[Tensor, Tensor]:
    return torch.randn(BATCH, 6, device=DEVICE), torch.randn(BATCH, 3, device=DEVICE)


def _mtl_params() -> TensorDict:
    return TensorDict({"shared": params_of(TRUNK), "heads": params_of(HEADS)})


def _mtl_batch() -> tuple[tuple[Tensor], tuple[Tensor]]:
    x, y = _xy()
    return (x,), (y,)


CASES = [
    Case(
        "mtl", lambda w: mtl_step(trunk_fn, heads_fn, w, sgd(0.1, 0.9)), _mtl_params, _mtl_batch, 3
    ),
    Case("jd", lambda w: jd_step(losses_fn, w, adam(1e-2)), lambda: params_of(MODEL), _xy, 3),
    Case(
        "iwrm",
        lambda w: per_sample_step(iwrm_loss, w, sgd(0.1)),
        lambda: params_of(MODEL),
        _xy,
        BATCH,
    ),
    Case(
        "iwmtl",
        lambda w: per_sample_step(iwmtl_losses, w, adam(1e-2)),
        lambda: params_of(MODEL),
        _xy,
        3 * BATCH,
    ),
]
WEIGHTINGS: dict[str, Callable[[], PureWeighting[Any]]] = {"upgrad": upgrad, "gradvac": gradvac}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same_output(actual: Any, expected: Any) -> None:
    for key, value in dotted_leaves(expected.params).items():
        assert_close(dotted_leaves(actual.params)[key], value)
    for name in ("losses", "weights", "decrease"):
        assert_close(actual.metrics[name], expected.metrics[name])


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiles_once_without_graph_break_and_equals_eager(case: Case, weighting: str) -> None:
    make = WEIGHTINGS[weighting]
    step = case.build(make())
    params = case.params()
    opt_state = step_optimizer_state(case, params)
    agg_state = make().init(case.n_losses, device=DEVICE)

    explanation = torch._dynamo.explain(step)(params, opt_state, agg_state, case.batch())
    assert explanation.graph_break_count == 0

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager_state = (params, opt_state, agg_state)
    compiled_state = (params, opt_state, agg_state)
    for _ in range(5):
        batch = case.batch()
        expected = step(*eager_state, batch)
        actual = compiled(*compiled_state, batch)
        _assert_same_output(actual, expected)
        eager_state = (expected.params, expected.opt_state, expected.agg_state)
        compiled_state = (actual.params, actual.opt_state, actual.agg_state)
    assert counter.frame_count == 1


def step_optimizer_state(case: Case, params: TensorDict) -> Any:
    """The optimizer state the case's step expects (the optimizer is inside the step)."""
    optimizer = {"mtl": sgd(0.1, 0.9), "jd": adam(1e-2), "iwrm": sgd(0.1), "iwmtl": adam(1e-2)}
    return optimizer[case.name].init(params)  # type: ignore[attr-defined]


def test_inductor_compiled_mtl_step_equals_eager() -> None:
    case = CASES[0]
    step = case.build(upgrad())
    params = case.params()
    opt_state, agg_state = step_optimizer_state(case, params), upgrad().init(3, device=DEVICE)
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        batch = case.batch()
        expected = step(params, opt_state, agg_state, batch)
        actual = compiled(params, opt_state, agg_state, batch)
        _assert_same_output(actual, expected)
        params, opt_state = expected.params, expected.opt_state


def test_iwrm_step_is_sgd_along_the_upgrad_direction() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).to(DEVICE, torch.float64)
    x = torch.randn(BATCH, 6, device=DEVICE, dtype=torch.float64)
    y = torch.randn(BATCH, device=DEVICE, dtype=torch.float64)
    losses = (model(x).squeeze(1) - y) ** 2
    expected_jac = reference_jacobian(model, losses)  # independent: a loop of autograd.grad
    matrix = torch.cat([j.reshape(BATCH, -1) for j in expected_jac.values()], dim=1)
    weights = upgrad_weights(matrix @ matrix.T)

    def sample_loss(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return (call(model, params, x).squeeze(0) - y) ** 2

    step = per_sample_step(sample_loss, upgrad(), sgd(0.5))
    params = params_of(model)
    out = step(params, sgd(0.5).init(params), upgrad().init(BATCH), (x, y))

    assert_close(out.metrics["weights"], weights)
    # UPGrad's direction decreases every sample's loss to first order: J d >= 0.
    assert_close(out.metrics["decrease"], matrix @ (weights @ matrix))
    assert (out.metrics["decrease"] >= -1e-6 * matrix.norm() ** 2).all()
    new_params = dotted_leaves(out.params)
    for name, param in model.named_parameters():
        direction = torch.tensordot(weights, expected_jac[name], dims=1)
        assert_close(new_params[name], param.detach() - 0.5 * direction)


def test_torch_optim_through_grad_matches_the_functional_step() -> None:
    """The pattern for torch.optim users: the update into `.grad`, then `optimizer.step()`."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(DEVICE)
    params = params_of(model).clone()
    step = jd_step(losses_fn_for(model), upgrad(), sgd(0.1, 0.9))
    opt_state, agg_state = sgd(0.1, 0.9).init(params), upgrad().init(3)
    torch_optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        batch = _xy()
        out = step(params, opt_state, agg_state, batch)
        params, opt_state, agg_state = out.params, out.opt_state, out.agg_state
        _, jacobian, _ = value_and_jacobian(losses_fn_for(model), params_of(model), *batch)
        update, _, _ = aggregate(jacobian, upgrad(), upgrad().init(3))
        torch_optimizer.zero_grad()
        accumulate_grads(model, update)
        torch_optimizer.step()
    new_params = dotted_leaves(params)
    for name, param in model.named_parameters():
        torch.testing.assert_close(new_params[name], param.detach())


def losses_fn_for(model: nn.Module) -> Callable[..., Tensor]:
    def fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return (call(model, params, x) - y).pow(2).mean(dim=0)

    return fn


def test_step_errors() -> None:
    with pytest.raises(TypeError, match="PureWeighting"):
        jd_step(losses_fn, upgrad_weights, sgd(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Optimizer"):
        jd_step(losses_fn, upgrad(), torch.optim.SGD)  # type: ignore[arg-type]
    step = mtl_step(trunk_fn, heads_fn, upgrad(), sgd(0.1))
    with pytest.raises(ValueError, match="shared"):
        step(params_of(MODEL), None, upgrad().init(3), _mtl_batch())  # type: ignore[arg-type]


def _upgrad_state(case: Case) -> tuple[TensorDict, Any, Any]:
    params = case.params()
    return params, step_optimizer_state(case, params), upgrad().init(case.n_losses, device=DEVICE)


def _control_flow_in_graph(case: Case) -> set[str]:
    """The higher-order control-flow operators in the step's dynamo graph."""
    found: set[str] = set()

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        for node in gm.graph.nodes:
            name = getattr(node.target, "__name__", "")
            if node.op == "call_function" and name in ("cond", "while_loop"):
                found.add(name)
        return gm.forward

    step = case.build(upgrad())
    state = _upgrad_state(case)
    torch.compile(step, fullgraph=True, backend=backend)(*state, case.batch())
    return found


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_steps_with_few_losses_have_no_host_sync_nor_control_flow(case: Case) -> None:
    """With m ≤ 6 losses (m ≤ 8 on CUDA) UPGrad's weights come from the enumeration of the active
    sets: the step reads nothing on the host and its graph has no ``cond`` or ``while_loop``, as
    CUDA graphs (``mode="reduce-overhead"``) need. Checked with m = 3."""
    step = case.build(upgrad())
    state = _upgrad_state(case)
    step(*state, case.batch())  # lazy initialisations first
    with NoHostSync():
        step(*state, case.batch())
    assert _control_flow_in_graph(case) == set()


def test_steps_with_many_losses_have_control_flow() -> None:
    """The converse, so that the check above can fail: 24 losses take PDAS and its fallback."""
    assert _control_flow_in_graph(CASES[3]) == {"cond", "while_loop"}
