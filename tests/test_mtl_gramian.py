"""``value_and_mtl_gramian`` and ``mtl_gramian_step``: MTL Gramians from the trunk layers' closed
forms, checked against the Jacobian of ``mtl_jacobian`` (vmapped autograd) and ``mtl_step``."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from tests.settings import DEVICE
from tests.utils import NoHostSync, assert_close, dotted_leaves
from torchjd_func import call, combine, gramian, mtl_jacobian, params_of
from torchjd_func._probes import value_and_mtl_gramian
from torchjd_func.aggregation import upgrad
from torchjd_func.autogram._fast import _Operands, task_gramian
from torchjd_func.optim import sgd
from torchjd_func.step import mtl_gramian_step, mtl_step

F64 = torch.float64
BATCH, TASKS = 6, 3


class Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def _mlp() -> tuple[nn.Module, Callable[[], Tensor]]:
    # Batch statistics couple the samples: fine here, the losses are reduced over the batch.
    trunk = nn.Sequential(
        nn.Linear(5, 7),
        nn.ReLU(),
        nn.BatchNorm1d(7, affine=False, track_running_stats=False),
        nn.Linear(7, 4),
        nn.Tanh(),
    )
    return trunk, lambda: torch.randn(BATCH, 5, device=DEVICE, dtype=F64)


def _cnn() -> tuple[nn.Module, Callable[[], Tensor]]:
    trunk = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    )
    return trunk, lambda: torch.randn(BATCH, 2, 4, 4, device=DEVICE, dtype=F64)


def _sequence() -> tuple[nn.Module, Callable[[], Tensor]]:
    trunk = nn.Sequential(nn.Embedding(9, 5), nn.Linear(5, 4), nn.ReLU(), Pool())
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    trunk.append(frozen)

    def ids() -> Tensor:
        out = torch.randint(0, 9, (BATCH, 5), device=DEVICE)
        out[1, 0] = out[0, 2]  # a token shared by two samples
        return out

    return trunk, ids


TRUNKS = {"mlp": _mlp, "cnn": _cnn, "sequence": _sequence}


def _heads() -> nn.ModuleList:
    return nn.ModuleList([nn.Linear(4, 1) for _ in range(TASKS)]).to(DEVICE, F64)


def _heads_fn(heads: nn.ModuleList) -> Callable[..., Tensor]:
    def heads_fn(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        outputs = [call(head, params[str(i)], features)[:, 0] for i, head in enumerate(heads)]
        losses = [(out - y[:, i]).pow(2).mean() for i, out in enumerate(outputs)]
        # The third task also reads the features directly (not only through its head).
        losses[2] = losses[2] + features.pow(2).mean()
        return torch.stack(losses)

    return heads_fn


def _targets() -> Tensor:
    return torch.randn(BATCH, TASKS, device=DEVICE, dtype=F64)


@pytest.mark.parametrize("name", list(TRUNKS))
def test_gramian_update_and_head_grads_equal_the_jacobian_route(name: str) -> None:
    torch.manual_seed(0)
    trunk, inputs = TRUNKS[name]()
    trunk = trunk.to(DEVICE, F64)
    heads = _heads()
    heads_fn = _heads_fn(heads)
    shared, head_params = params_of(trunk), params_of(heads)
    x, y = inputs(), _targets()

    out = value_and_mtl_gramian(trunk, shared, (x,), heads_fn, head_params, (y,))
    reference = mtl_jacobian(
        lambda p, x: call(trunk, p, x), heads_fn, shared, head_params, (x,), (y,)
    )

    assert_close(out.losses, reference.losses)
    assert_close(out.gramian, gramian(reference.jacobian))
    weights = torch.tensor([0.5, -1.5, 2.0], device=DEVICE, dtype=F64)
    expected_update = dotted_leaves(combine(reference.jacobian, weights))
    assert dotted_leaves(out.combine(weights)).keys() == expected_update.keys()
    for key, value in dotted_leaves(out.combine(weights)).items():
        assert_close(value, expected_update[key])
    for key, value in dotted_leaves(out.head_grads).items():
        assert_close(value, dotted_leaves(reference.head_grads)[key])


def test_without_head_parameters() -> None:
    trunk, inputs = _mlp()
    trunk = trunk.to(DEVICE, F64)

    def losses_fn(params: TensorDict, features: Tensor) -> Tensor:
        return torch.stack([features[:, 0].mean(), features.pow(2).mean()])

    x = inputs()
    out = value_and_mtl_gramian(trunk, params_of(trunk), (x,), losses_fn, TensorDict())
    reference = mtl_jacobian(
        lambda p, x: call(trunk, p, x), losses_fn, params_of(trunk), TensorDict(), (x,)
    )
    assert_close(out.gramian, gramian(reference.jacobian))


def _states(trunk: nn.Module, heads: nn.ModuleList) -> tuple[TensorDict, Any, Any]:
    params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)})
    return params, sgd(0.1, momentum=0.9).init(params), upgrad().init(TASKS, device=DEVICE)


def test_step_equals_mtl_step() -> None:
    torch.manual_seed(1)
    trunk, inputs = _cnn()
    trunk, heads = trunk.to(DEVICE, F64), _heads()
    heads_fn = _heads_fn(heads)
    ours = mtl_gramian_step(trunk, heads_fn, upgrad(), sgd(0.1, momentum=0.9))
    theirs = mtl_step(lambda p, x: call(trunk, p, x), heads_fn, upgrad(), sgd(0.1, momentum=0.9))
    state_ours = state_theirs = _states(trunk, heads)
    for _ in range(3):
        batch = ((inputs(),), (_targets(),))
        a, b = ours(*state_ours, batch), theirs(*state_theirs, batch)
        for key, value in dotted_leaves(b.params).items():
            assert_close(dotted_leaves(a.params)[key], value)
        for name in ("losses", "weights", "decrease"):
            assert_close(a.metrics[name], b.metrics[name])
        state_ours = (a.params, a.opt_state, a.agg_state)
        state_theirs = (b.params, b.opt_state, b.agg_state)


def test_compiles_once_without_graph_break_and_equals_eager() -> None:
    torch.manual_seed(2)
    trunk, inputs = _sequence()
    trunk, heads = trunk.to(DEVICE, F64), _heads()
    step = mtl_gramian_step(trunk, _heads_fn(heads), upgrad(), sgd(0.1))
    params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)})
    state = (params, sgd(0.1).init(params), upgrad().init(TASKS, device=DEVICE))

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*state, ((inputs(),), (_targets(),)))
    assert explanation.graph_break_count == 0

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager_state = compiled_state = state
    for _ in range(5):
        batch = ((inputs(),), (_targets(),))
        expected, actual = step(*eager_state, batch), compiled(*compiled_state, batch)
        for key, value in dotted_leaves(expected.params).items():
            assert_close(dotted_leaves(actual.params)[key], value)
        assert_close(actual.metrics["weights"], expected.metrics["weights"])
        eager_state = (expected.params, expected.opt_state, expected.agg_state)
        compiled_state = (actual.params, actual.opt_state, actual.agg_state)
    assert counter.frame_count == 1
    assert all(not m._forward_hooks for m in trunk.modules())
    torch._dynamo.reset()


def test_errors() -> None:
    trunk = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4)).to(DEVICE, F64)
    heads = _heads()
    params, opt_state, agg_state = _states(trunk, heads)
    batch = ((torch.randn(BATCH, 5, device=DEVICE, dtype=F64),), (_targets(),))
    unsupported = r"'1\.weight' belongs to module '1' \(LayerNorm\).*mtl_step"
    with pytest.raises(TypeError, match=unsupported):  # when the step is built
        mtl_gramian_step(trunk, _heads_fn(heads), upgrad(), sgd(0.1))
    trunk[1].requires_grad_(False)
    step = mtl_gramian_step(trunk, _heads_fn(heads), upgrad(), sgd(0.1))
    trunk[1].requires_grad_(True)
    with pytest.raises(TypeError, match=unsupported):  # and by the step, for a changed model
        step(params, opt_state, agg_state, batch)
    assert all(not m._forward_hooks for m in trunk.modules())
    with pytest.raises(ValueError, match=r'"shared": \.\.\., "heads"'):
        step(params["shared"], opt_state, agg_state, batch)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        mtl_gramian_step(lambda p, x: x, _heads_fn(heads), upgrad(), sgd(0.1))  # type: ignore[arg-type]

    mlp, inputs = _mlp()
    mlp = mlp.to(DEVICE, F64)
    with pytest.raises(ValueError, match=r"vector \[m\], got shape \[6, 4\]"):
        value_and_mtl_gramian(mlp, params_of(mlp), (inputs(),), lambda p, f: f.pow(2), TensorDict())


@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize(
    ("n_positions", "width"), [(4, 50), (100, 3)], ids=["ghost", "materialise"]
)
def test_task_gramian_both_ways_equal_materialised_gradients(
    kind: str, n_positions: int, width: int
) -> None:
    """``task_gramian`` takes ``⟨D_r, (A Aᵀ) D_s⟩`` for few positions and wide layers, and the
    materialised ``D_rᵀ A`` otherwise; both against gradients built here by einsum / index_add."""
    gen = torch.Generator().manual_seed(n_positions)
    n_rows, batch = 2, 2
    positions = n_positions // batch
    cots = torch.randn(n_rows, batch, positions, width, generator=gen, dtype=F64)
    if kind == "linear":
        inputs = torch.randn(batch, positions, width, generator=gen, dtype=F64)
        grads = torch.einsum("rbto,bti->roi", cots, inputs)
    else:
        inputs = torch.randint(0, 5, (batch, positions), generator=gen)
        flat = cots.reshape(n_rows, -1, width)
        grads = torch.zeros(n_rows, 5, width, dtype=F64).index_add(1, inputs.reshape(-1), flat)
    operands = _Operands(kind, inputs, cots, 5 if kind == "embedding" else width)
    flat_grads = grads.reshape(n_rows, -1)
    bias = cots.sum(dim=(1, 2))
    expected = flat_grads @ flat_grads.T + bias @ bias.T
    assert_close(task_gramian([operands], weight=True, bias=True), expected)
    assert_close(task_gramian([operands], weight=False, bias=True), bias @ bias.T)


def test_step_with_few_tasks_reads_nothing_on_the_host() -> None:
    """As for ``mtl_step`` (tests/test_step.py): with m ≤ 6 tasks (8 on CUDA) and no embedding,
    the step has no host synchronisation, as CUDA graphs need."""
    trunk, inputs = _mlp()
    trunk, heads = trunk.to(DEVICE, F64), _heads()
    step = mtl_gramian_step(trunk, _heads_fn(heads), upgrad(), sgd(0.1, momentum=0.9))
    state = _states(trunk, heads)
    step(*state, ((inputs(),), (_targets(),)))  # lazy initialisations first
    with NoHostSync():
        step(*state, ((inputs(),), (_targets(),)))


def _task_fns(heads: nn.ModuleList) -> dict[str, Callable[..., Tensor]]:
    """The tasks of ``_heads_fn`` as a mapping, each getting its own head's parameters."""

    def task(i: int) -> Callable[..., Tensor]:
        def loss(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
            out = (call(heads[i], params, features)[:, 0] - y[:, i]).pow(2).mean()
            return out + features.pow(2).mean() if i == 2 else out

        return loss

    return {str(i): task(i) for i in range(TASKS)}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mapping_of_task_functions_equals_one_function(name: str) -> None:
    torch.manual_seed(3)
    trunk, inputs = TRUNKS[name]()
    trunk, heads = trunk.to(DEVICE, F64), _heads()
    shared, head_params = params_of(trunk), params_of(heads)
    x, y = inputs(), _targets()
    one = value_and_mtl_gramian(trunk, shared, (x,), _heads_fn(heads), head_params, (y,))
    per_task = value_and_mtl_gramian(trunk, shared, (x,), _task_fns(heads), head_params, (y,))
    assert_close(per_task.losses, one.losses)
    assert_close(per_task.gramian, one.gramian)
    weights = torch.tensor([1.0, 0.2, -0.7], device=DEVICE, dtype=F64)
    for key, value in dotted_leaves(one.combine(weights)).items():
        assert_close(dotted_leaves(per_task.combine(weights))[key], value)
    assert dotted_leaves(per_task.head_grads).keys() == dotted_leaves(one.head_grads).keys()
    for key, value in dotted_leaves(one.head_grads).items():
        assert_close(dotted_leaves(per_task.head_grads)[key], value)


def test_mapping_errors() -> None:
    trunk, inputs = _mlp()
    trunk, heads = trunk.to(DEVICE, F64), _heads()
    shared, x, y = params_of(trunk), inputs(), _targets()
    fns = _task_fns(heads)
    del fns["2"]
    with pytest.raises(ValueError, match=r"exactly its keys.*\['0', '1'\].*\['0', '1', '2'\]"):
        value_and_mtl_gramian(trunk, shared, (x,), fns, params_of(heads), (y,))
    pair = nn.Sequential(trunk, Split()).to(DEVICE, F64)
    with pytest.raises(TypeError, match="one Tensor of features, got tuple"):
        value_and_mtl_gramian(pair, params_of(pair), (x,), _task_fns(heads), params_of(heads), (y,))


class Split(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


def test_mapping_step_compiles_once_without_graph_break() -> None:
    torch.manual_seed(4)
    trunk, inputs = _mlp()
    trunk, heads = trunk.to(DEVICE, F64), _heads()
    step = mtl_gramian_step(trunk, _task_fns(heads), upgrad(), sgd(0.1, momentum=0.9))
    state = _states(trunk, heads)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(3):
        batch = ((inputs(),), (_targets(),))
        expected, actual = step(*state, batch), compiled(*state, batch)
        assert_close(actual.metrics["weights"], expected.metrics["weights"])
        for key, value in dotted_leaves(expected.params).items():
            assert_close(dotted_leaves(actual.params)[key], value)
        state = (expected.params, expected.opt_state, expected.agg_state)
    assert counter.frame_count == 1
    torch._dynamo.reset()
