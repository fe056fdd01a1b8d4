"""The autogram Engine against a Gramian built from a loop of ``torch.autograd.grad``."""

import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.architectures import ARCHITECTURES, M_OUT, REDUCTIONS, Architecture, build
from tests.settings import DEVICE
from tests.utils import reference_gramian
from torchjd_func import call, combine, flatten_gramian, gramian, params_of, value_and_jacobian
from torchjd_func.aggregation import Flattening, UPGradWeighting
from torchjd_func.autogram import Engine

BATCH = 4
DTYPES = [torch.float32, torch.float64]
TOLERANCES = {torch.float32: (1e-4, 3e-5), torch.float64: (1e-9, 1e-11)}


def assert_close(actual: Tensor, expected: Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


class Transformer(nn.Module):
    """A Transformer encoder layer (no dropout, batch first) and a linear head on the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


ENGINE_ARCHITECTURES = [*ARCHITECTURES, Architecture("transformer", Transformer, (3, 8))]


def engine_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """The whole model, except for the multi-head model: its shared trunk only."""
    trunk = getattr(model, "trunk", None)
    return (trunk,) if isinstance(trunk, nn.Module) else (model,)


def squared_errors(model: nn.Module, arch: Architecture, dtype: torch.dtype) -> Tensor:
    x = torch.randn(BATCH, *arch.input_shape, dtype=dtype, device=DEVICE)
    y = torch.randn(BATCH, M_OUT, dtype=dtype, device=DEVICE)
    result: Tensor = (model(x) - y) ** 2  # [B, m]
    return result


def check_against_reference(engine: Engine, modules: tuple[nn.Module, ...], output: Tensor) -> None:
    generalized = engine.compute_gramian(output)
    assert generalized.shape == (*output.shape, *reversed(output.shape))
    assert_close(flatten_gramian(generalized), reference_gramian(modules, output))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("shape", ["[]", "[B]", "[B, m]"])
@pytest.mark.parametrize("arch", ENGINE_ARCHITECTURES, ids=str)
def test_gramian_matches_reference(
    arch: Architecture, shape: str, batch_dim: int | None, dtype: torch.dtype
) -> None:
    model = build(arch, dtype, DEVICE)
    modules = engine_modules(model)
    engine = Engine(*modules, batch_dim=batch_dim)
    output = REDUCTIONS[shape](squared_errors(model, arch, dtype))
    check_against_reference(engine, modules, output)


@pytest.mark.parametrize("shape", ["[]", "[B, m]"])
@pytest.mark.parametrize("arch", ENGINE_ARCHITECTURES, ids=str)
def test_generic_path_matches_reference(arch: Architecture, shape: str) -> None:
    """With the closed-form per-layer Gramians switched off (``_fast_gramians``), every module
    takes the generic per-sample re-run, with the same result."""
    dtype = torch.float64
    model = build(arch, dtype, DEVICE)
    modules = engine_modules(model)
    engine = Engine(*modules, batch_dim=0)
    engine._fast_gramians = False
    output = REDUCTIONS[shape](squared_errors(model, arch, dtype))
    check_against_reference(engine, modules, output)


@pytest.mark.parametrize("arch", ENGINE_ARCHITECTURES[:4], ids=str)
def test_batch_on_another_dim_and_reduced_outputs(arch: Architecture) -> None:
    dtype = torch.float64
    model = build(arch, dtype, DEVICE)
    modules = engine_modules(model)
    # Losses [m, B] with the batch on dim 1.
    check_against_reference(
        Engine(*modules, batch_dim=1), modules, squared_errors(model, arch, dtype).T
    )
    # Per-task means [m] have no dim 1: taken as reduced over the batch.
    check_against_reference(
        Engine(*modules, batch_dim=1), modules, squared_errors(model, arch, dtype).mean(dim=0)
    )
    check_against_reference(
        Engine(*modules, batch_dim=None), modules, squared_errors(model, arch, dtype).mean(dim=0)
    )


def test_several_modules_and_a_module_called_on_several_inputs() -> None:
    dtype = torch.float64
    first, second = nn.Linear(5, 4), nn.Linear(4, 2)
    first, second = first.to(dtype=dtype, device=DEVICE), second.to(dtype=dtype, device=DEVICE)
    for batch_dim in [0, None]:
        engine = Engine(first, second, batch_dim=batch_dim)
        x, z = (torch.randn(BATCH, 5, dtype=dtype, device=DEVICE) for _ in range(2))
        output = second(torch.tanh(first(x))) * second(first(z)).sin()  # [B, 2]
        check_against_reference(engine, (first, second), output)


class SeveralOutputs(nn.Module):
    """Returns one tensor twice and its input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = x * self.scale
        return y, y, x


class SeveralOutputsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
        self.outputs = SeveralOutputs()

    def forward(self, x: Tensor) -> Tensor:
        y1, y2, h = self.outputs(self.linear(x))
        return y1 * 2 + y2.sin() + h


def test_several_outputs_a_returned_input_and_an_in_place_relu() -> None:
    model = SeveralOutputsModel().to(dtype=torch.float64, device=DEVICE)
    for batch_dim in [0, None]:
        engine = Engine(model, batch_dim=batch_dim)
        output = model(torch.randn(BATCH, 3, dtype=torch.float64, device=DEVICE)) ** 2
        check_against_reference(engine, (model,), output)


def test_iwmtl_gramian_shape() -> None:
    trunk = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3)).to(DEVICE)
    engine = Engine(trunk, batch_dim=0)
    losses = trunk(torch.randn(16, 10, device=DEVICE))[:, :2] ** 2  # [16, 2]
    assert engine.compute_gramian(losses).shape == (16, 2, 2, 16)


def batchnorm_train() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, M_OUT))


class RNNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(5, 6, batch_first=True)
        self.head = nn.Linear(6, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        hidden, _ = self.rnn(x)
        return self.head(hidden[:, -1])


def instancenorm_train() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(5, M_OUT, 1),
        nn.InstanceNorm1d(M_OUT, affine=True, track_running_stats=True),
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
    )


NOT_BATCHABLE = [
    Architecture("batchnorm_train", batchnorm_train, (5,)),
    Architecture("rnn", RNNModel, (3, 5)),
    Architecture("instancenorm_train", instancenorm_train, (5, 3)),
]


@pytest.mark.parametrize("arch", NOT_BATCHABLE, ids=str)
def test_samples_not_independent_work_without_batch_dim_only(arch: Architecture) -> None:
    dtype = torch.float64
    model = build(arch, dtype, DEVICE)
    with pytest.raises(ValueError, match="batch_dim=None"):
        Engine(model, batch_dim=0)
    engine = Engine(model, batch_dim=None)
    check_against_reference(engine, (model,), squared_errors(model, arch, dtype).sum(dim=1))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_ops_without_a_batching_rule_fall_back_to_one_backward_per_row(
    monkeypatch: pytest.MonkeyPatch, batch_dim: int | None
) -> None:
    """cuDNN's RNN backward (CUDA) has no vmap batching rule: the batched backward raises, and
    the engine then runs one backward pass per row. Simulated here by a failing batched call."""
    real_grad = torch.autograd.grad
    batched_calls = []

    def grad(*args: Any, is_grads_batched: bool = False, **kwargs: Any) -> Any:
        if is_grads_batched:
            batched_calls.append(kwargs.get("grad_outputs"))
            raise RuntimeError(
                "Batching rule not implemented for aten::_cudnn_rnn_backward. "
                "We could not generate a fallback."
            )
        return real_grad(*args, **kwargs)

    model = build(ARCHITECTURES[0], torch.float64, DEVICE)
    engine = Engine(model, batch_dim=batch_dim)
    output = squared_errors(model, ARCHITECTURES[0], torch.float64)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    generalized = engine.compute_gramian(output)
    monkeypatch.undo()
    assert batched_calls
    assert_close(flatten_gramian(generalized), reference_gramian((model,), output))


def test_other_runtime_errors_of_the_batched_backward_propagate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def grad(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    model = build(ARCHITECTURES[0], torch.float64, DEVICE)
    engine = Engine(model, batch_dim=None)
    output = squared_errors(model, ARCHITECTURES[0], torch.float64)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.compute_gramian(output)


def test_mode_is_checked_again_at_compute_time() -> None:
    model = batchnorm_train().to(DEVICE).eval()
    engine = Engine(model, batch_dim=0)
    model.train()
    losses = model(torch.randn(BATCH, 5, device=DEVICE)).sum(dim=1)
    with pytest.raises(ValueError, match="batch_dim=None"):
        engine.compute_gramian(losses)


def test_dropout_inside_a_module_with_parameters_needs_batch_dim_none() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dropout=0.1, batch_first=True)
    with pytest.raises(ValueError, match="dropout"):
        Engine(layer.to(DEVICE), batch_dim=0)
    # Dropout layers between the modules holding parameters are fine: the mask of the forward pass
    # is the one differentiated.
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 2)).to(DEVICE)
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(BATCH, 5, device=DEVICE)).sum(dim=1)
    check_against_reference(engine, (model,), output)


SEED_000 = (Path(__file__).resolve().parent.parent / "examples" / "seed_000_iwmtl.py").read_text()
"""Seed 000, verbatim but for the import names."""


def check_seed_step(namespace: dict[str, Any]) -> None:
    """At ``optimizer.step()``: the seed's Gramian and ``.grad`` fields against the functional
    core (the Jacobian of the same losses, its Gramian, and ``combine`` with the same weights)."""
    modules = {
        "shared": namespace["shared_module"],
        "task1": namespace["task1_module"],
        "task2": namespace["task2_module"],
    }
    params = TensorDict({key: params_of(module) for key, module in modules.items()})

    def losses_fn(params: TensorDict, x: Tensor, y1: Tensor, y2: Tensor) -> Tensor:
        features = call(modules["shared"], params["shared"], x)
        out1 = call(modules["task1"], params["task1"], features).squeeze(1)
        out2 = call(modules["task2"], params["task2"], features).squeeze(1)
        return torch.stack([(out1 - y1) ** 2, (out2 - y2) ** 2], dim=1)

    x, y1, y2 = namespace["input"], namespace["target1"], namespace["target2"]
    losses, jac, _ = value_and_jacobian(losses_fn, params, x, y1, y2)
    assert_close(namespace["losses"].detach(), losses)
    assert namespace["gramian"].shape == (16, 2, 2, 16)
    assert_close(namespace["gramian"], gramian(jac["shared"]))
    expected = combine(jac, namespace["weights"])
    for key, module in modules.items():
        for name, param in module.named_parameters():
            assert param.grad is not None
            assert_close(param.grad, expected[(key, *name.split("."))])


def test_seed_000_runs_and_matches_the_functional_core() -> None:
    namespace: dict[str, Any] = {"__name__": "seed_000"}
    steps: list[int] = []

    def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        check_seed_step(namespace)
        steps.append(1)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        exec(compile(SEED_000, "seed_000", "exec"), namespace)
    finally:
        handle.remove()
    assert len(steps) == 8


@pytest.mark.parametrize("batch_dim", [0, None])
def test_same_gramian_as_torchjd(batch_dim: int | None) -> None:
    torchjd_autogram = pytest.importorskip("torchjd.autogram")
    trunk = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU())
    trunk = trunk.to(dtype=torch.float64, device=DEVICE)
    head = nn.Linear(3, 2).to(dtype=torch.float64, device=DEVICE)
    ours = Engine(trunk, batch_dim=batch_dim)
    theirs = torchjd_autogram.Engine(trunk, batch_dim=batch_dim)
    losses = head(trunk(torch.randn(16, 10, dtype=torch.float64, device=DEVICE))) ** 2  # [16, 2]
    assert_close(flatten_gramian(ours.compute_gramian(losses)), theirs.compute_gramian(losses))


def forward_and_grads(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    output = model(x)
    (output**2).sum().backward()
    return output.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("batch_dim", [0, None])
def test_hooks_change_neither_outputs_nor_ordinary_backward(batch_dim: int | None) -> None:
    model = build(ENGINE_ARCHITECTURES[-1], torch.float32, DEVICE)
    x = torch.randn(BATCH, 3, 8, device=DEVICE)
    output_before, grads_before = forward_and_grads(model, x)
    engine = Engine(model, batch_dim=batch_dim)
    output_after, grads_after = forward_and_grads(model, x)
    torch.testing.assert_close(output_after, output_before, rtol=0, atol=0)
    for after, before in zip(grads_after, grads_before, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    del engine


def recording_probe(model: nn.Sequential) -> Callable[[], bool]:
    """Whether the input of ``model[2]`` (an intermediate activation) of the latest forward pass
    is still alive."""
    refs: list[weakref.ref[Tensor]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        refs[:] = [weakref.ref(args[0])]

    model[2].register_forward_pre_hook(hook)

    def alive() -> bool:
        gc.collect()
        return refs[0]() is not None

    return alive


def test_no_activation_outlives_its_step() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DEVICE)
    engine = Engine(model, batch_dim=0)
    alive = recording_probe(model)
    x = torch.randn(BATCH, 5, device=DEVICE)

    losses = model(x).pow(2)
    weights = Flattening(UPGradWeighting())(engine.compute_gramian(losses))
    losses.backward(weights)
    # The backward pass freed the graph's saved tensors; the engine kept nothing either, though
    # `losses` (and so the graph's nodes) is still referenced.
    assert not alive()

    # A forward pass never given to compute_gramian: its records go with its graph.
    losses = model(x).pow(2)
    assert alive()
    del losses
    assert not alive()

    # Two more training steps work as the first.
    for _ in range(2):
        losses = model(x).pow(2)
        check_against_reference(engine, (model,), losses)
        losses.backward(torch.ones_like(losses))


def test_one_compute_gramian_per_forward() -> None:
    model = nn.Linear(5, 2).to(DEVICE)
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randn(BATCH, 5, device=DEVICE)).pow(2)
    engine.compute_gramian(losses)
    with pytest.raises(ValueError, match="once per forward pass"):
        engine.compute_gramian(losses)


class ReadsChildParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + x[:, :2] @ self.linear.weight[:, :2].T


def test_parameter_used_outside_its_module() -> None:
    model = ReadsChildParameter().to(DEVICE)
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randn(BATCH, 5, device=DEVICE)).sum(dim=1)
    with pytest.raises(ValueError, match=r"'linear\.weight' of module 0"):
        engine.compute_gramian(losses)
    # Without batch_dim, any code is differentiated exactly.
    engine = Engine(model, batch_dim=None)
    check_against_reference(
        engine, (model,), model(torch.randn(BATCH, 5, device=DEVICE)).sum(dim=1)
    )


def test_errors_at_construction() -> None:
    linear = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="at least one module"):
        Engine(batch_dim=0)
    with pytest.raises(TypeError, match="argument 1 is a Tensor"):
        Engine(linear, torch.ones(2), batch_dim=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`batch_dim` must be None or an int"):
        Engine(linear, batch_dim=True)
    with pytest.raises(ValueError, match="non-negative"):
        Engine(linear, batch_dim=-1)
    with pytest.raises(ValueError, match="given twice"):
        Engine(linear, linear, batch_dim=0)
    model = nn.Sequential(linear, nn.Linear(2, 1))
    with pytest.raises(ValueError, match="is inside module 0"):
        Engine(model, linear, batch_dim=None)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        Engine(frozen, batch_dim=0)
    # A submodule shared by two modules, one holding parameters directly.
    outer, shared = nn.Linear(2, 2), nn.Linear(2, 2)
    outer.extra = shared
    with pytest.raises(ValueError, match="counted twice"):
        Engine(outer, nn.Sequential(shared), batch_dim=0)
    Engine(outer, nn.Sequential(shared), batch_dim=None)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_errors_on_output(batch_dim: int | None) -> None:
    model = nn.Linear(3, 2).to(DEVICE)
    other = nn.Linear(3, 2).to(DEVICE)
    engine = Engine(model, batch_dim=batch_dim)
    x = torch.randn(BATCH, 3, device=DEVICE)
    with pytest.raises(TypeError, match="must be a Tensor"):
        engine.compute_gramian([model(x)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        engine.compute_gramian(model(x).long())
    with pytest.raises(ValueError, match="empty"):
        engine.compute_gramian(model(x)[:0])
    with pytest.raises(ValueError, match="does not require grad"):
        engine.compute_gramian(model(x).detach())
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        engine.compute_gramian(other(x))


def test_errors_on_batch_sizes() -> None:
    model = nn.Linear(3, 2).to(DEVICE)
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randn(BATCH, 3, device=DEVICE)).pow(2)
    with pytest.raises(ValueError, match="size 2 along batch_dim=0"):
        engine.compute_gramian(losses.T)

    class Broadcasting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x: Tensor, bias: Tensor) -> Tensor:
            return x * self.scale + bias  # `bias` [2] is not batched

    broadcasting = Broadcasting().to(DEVICE)
    engine = Engine(broadcasting, batch_dim=0)
    output = broadcasting(torch.randn(BATCH, 2, device=DEVICE), torch.randn(2, device=DEVICE))
    with pytest.raises(ValueError, match="same batch size"):
        engine.compute_gramian(output)


def test_input_modified_in_place_after_the_call() -> None:
    first, second = nn.Linear(3, 3).to(DEVICE), nn.Linear(3, 3).to(DEVICE)
    engine = Engine(first, second, batch_dim=0)
    hidden = first(torch.randn(BATCH, 3, device=DEVICE))
    output = second(hidden) * 1.0
    hidden.add_(1.0)  # `second` has already used it
    with pytest.raises(ValueError, match="modified in place"):
        engine.compute_gramian(output.sum(dim=1))
