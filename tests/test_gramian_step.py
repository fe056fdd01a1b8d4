"""The Gramian step: per-sample Gramians from probes against a loop of ``torch.autograd.grad``, its
updates against ``per_sample_step``, one graph under ``torch.compile``, and its errors."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from tests.architectures import ARCHITECTURES, M_OUT, ReusedLayer
from tests.settings import DEVICE
from tests.utils import assert_close, dotted_leaves, reference_gramian, token_ids
from torchjd_func import call, params_of
from torchjd_func._probes import value_and_per_sample_gramian
from torchjd_func.aggregation import PureWeighting, gradvac, mean, random_, upgrad
from torchjd_func.autogram import _fast
from torchjd_func.optim import sgd
from torchjd_func.step import StepOutput, gramian_step, per_sample_step

BATCH = 4
DTYPE = torch.float64
VOCABULARY = 12


class Conv1dModel(nn.Module):
    """Conv1d (padding) -> Conv1d (stride) -> Linear, on ``[B, 2, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(4, 3, kernel_size=3, stride=2)
        self.head = nn.Linear(3 * 3, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.flatten(1))


class SequenceModel(nn.Module):
    """Embedding (with padding_idx) -> Linear on ``[B, T, d]`` -> mean over ``T`` -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 5, padding_idx=0)
        self.linear = nn.Linear(5, 6)
        self.head = nn.Linear(6, M_OUT)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.linear(self.embedding(ids))).mean(dim=1))


def _floats(*shape: int) -> Callable[[int], Tensor]:
    return lambda batch: torch.randn(batch, *shape, dtype=DTYPE, device=DEVICE)


def _token_ids(batch: int) -> Tensor:
    return token_ids(VOCABULARY, batch, 6, DEVICE)


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Tensor]

    def __str__(self) -> str:
        return self.name

    def make(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().to(dtype=DTYPE, device=DEVICE)


_ARCHITECTURES = {arch.name: arch for arch in ARCHITECTURES}
MODELS = {
    "mlp": Model("mlp", _ARCHITECTURES["mlp"].build, _floats(5)),
    "cnn": Model("cnn", _ARCHITECTURES["cnn"].build, _floats(2, 6, 6)),
    "conv1d": Model("conv1d", Conv1dModel, _floats(2, 8)),
    "sequence": Model("sequence", SequenceModel, _token_ids),
    "reused_layer": Model("reused_layer", ReusedLayer, _floats(5)),  # one Linear called twice
    "frozen": Model("frozen", _ARCHITECTURES["frozen"].build, _floats(5)),  # layer 0 frozen
}


def _mlp() -> nn.Sequential:
    model = MODELS["mlp"].make()
    assert isinstance(model, nn.Sequential)
    return model


def iwrm(outputs: Tensor, y: Tensor) -> Tensor:
    return (outputs - y).pow(2).mean(dim=1)  # [B]


def iwmtl(outputs: Tensor, y: Tensor) -> Tensor:
    return (outputs - y).pow(2)  # [B, m]


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"[B]": iwrm, "[B, m]": iwmtl}


def _targets(batch: int = BATCH) -> Tensor:
    return torch.randn(batch, M_OUT, dtype=DTYPE, device=DEVICE)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialise"])
@pytest.mark.parametrize("loss_shape", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_gramian_equals_autograd_reference(
    model_name: str, loss_shape: str, ghost: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fast, "use_ghost", lambda operands: ghost)
    spec, losses_fn = MODELS[model_name], LOSSES[loss_shape]
    model = spec.make()
    x, y = spec.inputs(BATCH), _targets()

    losses, gramian, combine = value_and_per_sample_gramian(
        model, params_of(model), (x,), losses_fn, (y,)
    )

    expected_losses = losses_fn(model(x), y)
    expected = reference_gramian((model,), expected_losses)  # a loop of autograd.grad
    assert_close(losses, expected_losses.detach())
    assert gramian.shape == (expected_losses.numel(), expected_losses.numel())
    assert_close(gramian, expected)
    # The update J^T w: the gradient of the weighted sum of the losses.
    weights = torch.rand_like(expected_losses)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((expected_losses * weights).sum(), [p for _, p in trainable])
    update = dotted_leaves(combine(weights))
    assert list(update) == [n for n, _ in trainable]
    for (name, _), grad in zip(trainable, grads, strict=True):
        assert_close(update[name], grad)
    assert all(not m._forward_hooks for m in model.modules())


def _sample_losses_fn(
    model: nn.Module, losses_fn: Callable[[Tensor, Tensor], Tensor]
) -> Callable[..., Tensor]:
    """The same losses written for one sample, for ``per_sample_step``."""

    def sample_losses(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return losses_fn(call(model, params, x.unsqueeze(0)), y.unsqueeze(0))[0]

    return sample_losses


WEIGHTINGS: dict[str, Callable[[], PureWeighting[Any]]] = {
    "upgrad": upgrad,
    "gradvac": gradvac,
    "random": random_,
}


@pytest.mark.parametrize(
    ("model_name", "loss_shape", "weighting"),
    [
        ("mlp", "[B]", "upgrad"),
        ("sequence", "[B, m]", "upgrad"),
        ("cnn", "[B, m]", "gradvac"),
        ("conv1d", "[B]", "random"),
    ],
)
def test_step_equals_per_sample_step(model_name: str, loss_shape: str, weighting: str) -> None:
    spec, losses_fn, make = MODELS[model_name], LOSSES[loss_shape], WEIGHTINGS[weighting]
    model = spec.make()
    n_losses = BATCH * (M_OUT if loss_shape == "[B, m]" else 1)
    optimizer = sgd(0.1, momentum=0.9)
    fast = gramian_step(model, losses_fn, make(), optimizer)
    reference = per_sample_step(_sample_losses_fn(model, losses_fn), make(), optimizer)
    params = params_of(model)
    state = (params, optimizer.init(params), make().init(n_losses, dtype=DTYPE, device=DEVICE))
    expected_state = state
    for _ in range(3):
        x, y = spec.inputs(BATCH), _targets()
        actual = fast(*state, ((x,), (y,)))
        expected = reference(*expected_state, (x, y))
        for name in ("losses", "weights", "decrease"):
            assert actual.metrics[name].shape == expected.metrics[name].shape
            torch.testing.assert_close(
                actual.metrics[name], expected.metrics[name], rtol=1e-6, atol=1e-6
            )
        expected_params = dotted_leaves(expected.params)
        for name, value in dotted_leaves(actual.params).items():
            torch.testing.assert_close(value, expected_params[name], rtol=1e-6, atol=1e-6)
        state = (actual.params, actual.opt_state, actual.agg_state)
        expected_state = (expected.params, expected.opt_state, expected.agg_state)


def _assert_same_output(actual: StepOutput[Any, Any], expected: StepOutput[Any, Any]) -> None:
    for key, value in dotted_leaves(expected.params).items():
        assert_close(dotted_leaves(actual.params)[key], value)
    for name in ("losses", "weights", "decrease"):
        assert_close(actual.metrics[name], expected.metrics[name])


def _run_steps(
    step: Callable[..., StepOutput[Any, Any]],
    compiled: Callable[..., StepOutput[Any, Any]],
    state: tuple[Any, ...],
    spec: Model,
    n_steps: int,
) -> None:
    eager_state = compiled_state = state
    for _ in range(n_steps):
        batch = ((spec.inputs(BATCH),), (_targets(),))
        expected = step(*eager_state, batch)
        actual = compiled(*compiled_state, batch)
        _assert_same_output(actual, expected)
        eager_state = (expected.params, expected.opt_state, expected.agg_state)
        compiled_state = (actual.params, actual.opt_state, actual.agg_state)


@pytest.mark.parametrize(
    ("model_name", "loss_shape"), [("mlp", "[B]"), ("cnn", "[B, m]"), ("sequence", "[B, m]")]
)
def test_compiles_once_without_graph_break_and_equals_eager(
    model_name: str, loss_shape: str
) -> None:
    spec = MODELS[model_name]
    model = spec.make()
    step = gramian_step(model, LOSSES[loss_shape], gradvac(), sgd(0.1, momentum=0.9))
    params = params_of(model)
    n_losses = BATCH * (M_OUT if loss_shape == "[B, m]" else 1)
    state = (
        params,
        sgd(0.1, 0.9).init(params),
        gradvac().init(n_losses, dtype=DTYPE, device=DEVICE),
    )
    batch = ((spec.inputs(BATCH),), (_targets(),))

    explanation = torch._dynamo.explain(step)(*state, batch)
    assert explanation.graph_break_count == 0

    torch._dynamo.reset()
    counter = CompileCounter()
    _run_steps(step, torch.compile(step, fullgraph=True, backend=counter), state, spec, 5)
    assert counter.frame_count == 1
    assert all(not m._forward_hooks for m in model.modules())


def test_inductor_compiled_step_equals_eager() -> None:
    """The mean weighting keeps inductor's compile short; the Gramian is still checked, through
    the ``decrease`` metric ``G w``."""
    spec = MODELS["mlp"]
    model = spec.make()
    step = gramian_step(model, iwmtl, mean(), sgd(0.1))
    params = params_of(model)
    state = (params, sgd(0.1).init(params), mean().init(BATCH * M_OUT))
    _run_steps(step, torch.compile(step, fullgraph=True), state, spec, 2)


def test_user_hooks_are_kept_and_called() -> None:
    model = _mlp()
    seen: list[torch.Size] = []
    handle = model[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    x = _floats(5)(BATCH)
    value_and_per_sample_gramian(model, params_of(model), (x,), iwrm, (_targets(),))
    assert seen == [torch.Size([BATCH, 7])] * 2  # the shape-discovery and differentiated passes
    assert list(model[0]._forward_hooks) == [handle.id]
    handle.remove()


class Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.linear(x)))


class Scaled(nn.Module):
    """A module with a parameter of its own, used in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(M_OUT))
        self.linear = nn.Linear(5, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) * self.scale


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.second = nn.Linear(5, 5)
        self.second.weight = self.first.weight
        self.head = nn.Linear(5, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.second(torch.tanh(self.first(x))))


@pytest.mark.parametrize(
    ("build_model", "match"),
    [
        (Normalised, r"'norm\.weight' belongs to module 'norm' \(LayerNorm\).*per_sample_step"),
        (Scaled, r"'scale' belongs to the model itself \(Scaled\).*per_sample_step"),
        (Tied, r"'first\.weight' is shared by module 'first' \(Linear\), module 'second'"),
    ],
)
def test_unsupported_modules_are_type_errors(
    build_model: Callable[[], nn.Module], match: str
) -> None:
    """Raised when the step is built (item 14: outside any traced function), and again by the
    step itself for a model changed in between."""
    model = build_model().to(DEVICE, DTYPE)
    with pytest.raises(TypeError, match=match):
        gramian_step(model, iwrm, upgrad(), sgd(0.1))
    with pytest.raises(TypeError, match=match):
        value_and_per_sample_gramian(
            model, params_of(model), (_floats(5)(BATCH),), iwrm, (_targets(),)
        )


def test_frozen_unsupported_module_is_fine() -> None:
    model = Normalised().to(DEVICE, DTYPE)
    model.norm.requires_grad_(False)
    x, y = _floats(5)(BATCH), _targets()
    _, gramian, _ = value_and_per_sample_gramian(model, params_of(model), (x,), iwrm, (y,))
    assert_close(gramian, reference_gramian((model,), iwrm(model(x), y)))


@pytest.mark.parametrize(
    "losses_fn",
    [
        lambda outputs, y: (outputs - y).pow(2).mean(),  # []
        lambda outputs, y: (outputs - y).pow(2).mean(dim=0),  # [m]: not per sample
        lambda outputs, y: (outputs - y).pow(2).unsqueeze(2),  # [B, m, 1]
    ],
    ids=["scalar", "per_task", "3d"],
)
def test_wrong_losses_shape_is_a_value_error(losses_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"\[B\] \(IWRM\) or \[B, m\] \(IWMTL\)"):
        value_and_per_sample_gramian(
            model, params_of(model), (_floats(5)(BATCH),), losses_fn, (_targets(),)
        )
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_are_removed_after_an_exception() -> None:
    model = _mlp()

    def failing(outputs: Tensor, y: Tensor) -> Tensor:
        raise RuntimeError("in the losses")

    def failing_forward(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        raise KeyError("in the model")

    with pytest.raises(RuntimeError, match="in the losses"):
        value_and_per_sample_gramian(
            model, params_of(model), (_floats(5)(BATCH),), failing, (_targets(),)
        )
    assert all(not m._forward_hooks for m in model.modules())

    handle = model[2].register_forward_hook(failing_forward)
    with pytest.raises(KeyError, match="in the model"):
        value_and_per_sample_gramian(
            model, params_of(model), (_floats(5)(BATCH),), iwrm, (_targets(),)
        )
    assert [list(m._forward_hooks) for m in model] == [[], [], [handle.id], [], []]
    handle.remove()


def test_batch_coupling_is_a_value_error() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, M_OUT))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) mixes the samples"):
        value_and_per_sample_gramian(
            model.to(DEVICE, DTYPE), params_of(model), (_floats(5)(BATCH),), iwrm, (_targets(),)
        )
    model.eval()  # running statistics: per sample
    x, y = _floats(5)(BATCH), _targets()
    _, gramian, _ = value_and_per_sample_gramian(model, params_of(model), (x,), iwrm, (y,))
    assert_close(gramian, reference_gramian((model,), iwrm(model(x), y)))


@pytest.mark.parametrize("vocabulary", [5, 100], ids=["ids_as_slots", "ranked_ids"])
def test_compiled_embedding_materialise_equals_eager(vocabulary: int) -> None:
    """Compiled, the token slots of an embedding's gradients have a static number (no
    ``torch.unique``): ``vocabulary`` when it is at most ``B·T``, else ``B·T`` ranked ids."""
    ids = torch.randint(0, vocabulary, (BATCH, 6), device=DEVICE)
    ids[1, 0] = ids[0, 1]
    cotangents = torch.randn(2, BATCH, 6, 3, dtype=DTYPE, device=DEVICE)

    def materialise(ids: Tensor, cotangents: Tensor) -> Tensor:
        return _fast._materialise(_fast._Operands("embedding", ids, cotangents, vocabulary))

    counter = CompileCounter()
    compiled = torch.compile(materialise, fullgraph=True, backend=counter)
    assert_close(compiled(ids, cotangents), materialise(ids, cotangents))
    assert counter.frame_count == 1
