"""The autogram Engine and the closed-form step machinery on in-place operations after recorded
modules (``nn.ReLU(inplace=True)``, ``out += identity``), against independent references: a
float64 per-sample Jacobian from ``torch.func`` (``vmap`` of ``jacrev``), ``G = J Jᵀ``, and
TorchJD 0.18's ``Engine`` run side by side."""

import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from tests.settings import DEVICE, DTYPE
from torchjd_func import flatten_gramian, params_of
from torchjd_func._probes import value_and_mtl_gramian, value_and_per_sample_gramian
from torchjd_func.autogram import Engine

torchjd_autogram = pytest.importorskip("torchjd.autogram")

BATCH = 3
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-11)}


def assert_close(actual: Tensor, expected: Tensor) -> None:
    rtol, atol = TOLERANCES[DTYPE]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


class Residual(nn.Module):
    """``out = inner(x); out += x`` (or ``out.add_(x)``), as torchvision's blocks do."""

    def __init__(self, inner: nn.Module, method: bool = False) -> None:
        super().__init__()
        self.inner, self.method = inner, method

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        if self.method:
            out.add_(x)
        else:
            out += x
        return out


class ViewOutput(nn.Module):
    """A module holding a parameter whose output is a view (``.view``, slicing, transpose)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.weight
        if self.how == "view":
            return h.view(x.shape[0], 2, 4)
        if self.how == "slice":
            return h[:, :5]
        return h.unsqueeze(-1).transpose(1, 2)


class Tokens(nn.Module):
    """Token plus position embeddings added in place, then an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(10, 6), nn.Embedding(5, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tokens(ids)
        h += self.positions(torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
        return self.head(h.relu_().mean(1))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out: in-place ReLUs and ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's Bottleneck, written out, with GroupNorm: ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(channels, 2, 1, bias=False), nn.GroupNorm(1, 2)
        self.conv2, self.gn2 = nn.Conv2d(2, 2, 3, 1, 1, bias=False), nn.GroupNorm(1, 2)
        self.conv3, self.gn3 = nn.Conv2d(2, channels, 1, bias=False), nn.GroupNorm(2, channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.relu(self.gn2(self.conv2(out)))
        out = self.gn3(self.conv3(out))
        out += x
        return self.relu(out)


def relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def resnet(norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(
        BasicBlock(3, 4, 2, norm),
        BasicBlock(4, 4, 1, norm),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def eval_batchnorm_resnet() -> nn.Module:
    model = resnet(nn.BatchNorm2d)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics
            assert module.running_mean is not None
            assert module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    integer: bool = False
    """Token ids rather than floating-point inputs."""
    torchjd: bool = True
    """Whether TorchJD 0.18's Engine supports it (it refuses BatchNorm even in eval mode)."""


CASES: dict[str, Case] = {
    "instance_norm2d_relu": Case(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.InstanceNorm2d(4, affine=True),
            relu(),
            nn.Flatten(),
            nn.Linear(144, 2),
        ),
        (3, 8, 8),
    ),
    "instance_norm1d_relu6": Case(
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3),
            nn.InstanceNorm1d(4, affine=True),
            nn.ReLU6(inplace=True),
            nn.Flatten(),
            nn.Linear(16, 2),
        ),
        (3, 6),
    ),
    "linear_relu": Case(lambda: nn.Sequential(nn.Linear(5, 6), relu(), nn.Linear(6, 2)), (5,)),
    "linear3d_leaky_relu": Case(
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.LeakyReLU(0.1, inplace=True), nn.Flatten(), nn.Linear(18, 2)
        ),
        (3, 5),
    ),
    "linear3d_hardswish": Case(
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.Hardswish(inplace=True), nn.Flatten(), nn.Linear(18, 2)
        ),
        (3, 5),
    ),
    "linear3d_silu": Case(
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.SiLU(inplace=True), nn.Flatten(), nn.Linear(18, 2)
        ),
        (3, 5),
    ),
    "linear3d_dropout_eval": Case(
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.Dropout(0.5, inplace=True), nn.Flatten(), nn.Linear(18, 2)
        ).eval(),
        (3, 5),
    ),
    "conv1d_relu": Case(
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3), relu(), nn.Flatten(), nn.Linear(16, 2)),
        (3, 6),
    ),
    "conv2d_silu": Case(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.SiLU(inplace=True), nn.Flatten(), nn.Linear(16, 2)
        ),
        (3, 4, 4),
    ),
    "layer_norm3d_relu": Case(
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.LayerNorm(6), relu(), nn.Flatten(), nn.Linear(18, 2)
        ),
        (3, 5),
    ),
    "group_norm_relu": Case(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), relu(), nn.Flatten(), nn.Linear(16, 2)
        ),
        (3, 4, 4),
    ),
    "residual_add_assign": Case(
        lambda: nn.Sequential(Residual(nn.Linear(6, 6)), nn.Linear(6, 2)), (6,)
    ),
    "residual3d_add_": Case(
        lambda: nn.Sequential(
            Residual(nn.Linear(6, 6), method=True), nn.Flatten(), nn.Linear(18, 2)
        ),
        (3, 6),
    ),
    "view_output_relu": Case(
        lambda: nn.Sequential(ViewOutput("view"), relu(), nn.Flatten(), nn.Linear(8, 2)),
        (6,),
    ),
    "slice_output_relu": Case(
        lambda: nn.Sequential(ViewOutput("slice"), relu(), nn.Linear(5, 2)), (6,)
    ),
    "transpose_output_relu": Case(
        lambda: nn.Sequential(ViewOutput("transpose"), relu(), nn.Flatten(), nn.Linear(8, 2)),
        (6,),
    ),
    "embedding_add_assign": Case(Tokens, (4,), integer=True),
    "basic_block_group_norm": Case(lambda: resnet(lambda c: nn.GroupNorm(2, c)), (3, 6, 6)),
    "basic_block_batch_norm_eval": Case(eval_batchnorm_resnet, (3, 6, 6), torchjd=False),
    "bottleneck_group_norm": Case(
        lambda: nn.Sequential(
            Bottleneck(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
        ),
        (4, 5, 5),
    ),
}


def make(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    build, shape, integer, _ = CASES[name]
    torch.manual_seed(0)
    model = build().to(device=DEVICE, dtype=DTYPE)
    if integer:
        x = torch.randint(0, 10, (BATCH, *shape), device=DEVICE)
    else:
        x = torch.randn(BATCH, *shape, device=DEVICE, dtype=DTYPE)
    y = torch.randn(BATCH, 2, device=DEVICE, dtype=DTYPE)
    return model, x, y


def reference_jacobian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The float64 per-sample Jacobian ``[B·2, n_params]`` of ``(model(x) - y) ** 2``, by
    ``vmap`` over the samples of ``jacrev`` of a functional call on one sample."""
    double = copy.deepcopy(model).double()
    params = {name: p.detach() for name, p in double.named_parameters() if p.requires_grad}
    x64 = x if not x.is_floating_point() else x.double()

    def sample_losses(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        out: Tensor = functional_call(double, p, (xb.unsqueeze(0),))
        return (out.squeeze(0) - yb) ** 2

    jac = vmap(jacrev(sample_losses), in_dims=(None, 0, 0))(params, x64, y.double())
    return torch.cat([j.reshape(x.shape[0] * y.shape[1], -1) for j in jac.values()], dim=1)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", list(CASES))
def test_in_place_after_recorded_module(name: str, batch_dim: int | None) -> None:
    model, x, y = make(name)
    jacobian = reference_jacobian(model, x, y)
    engine = Engine(model, batch_dim=batch_dim)
    losses = (model(x) - y) ** 2  # [B, 2]
    ours = engine.compute_gramian(losses)
    assert ours.shape == (BATCH, 2, 2, BATCH)
    assert_close(flatten_gramian(ours), jacobian @ jacobian.T)

    # The weighted backward pass that follows is unchanged by the engine's hooks.
    weights = torch.rand_like(losses)
    losses.backward(weights)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    assert_close(flat, jacobian.T @ weights.double().reshape(-1))


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case.torchjd])
def test_in_place_matches_torchjd(name: str, batch_dim: int | None) -> None:
    model, x, y = make(name)
    ours = Engine(model, batch_dim=batch_dim).compute_gramian((model(x) - y) ** 2)
    twin = copy.deepcopy(model)
    theirs = torchjd_autogram.Engine(twin, batch_dim=batch_dim).compute_gramian((twin(x) - y) ** 2)
    assert_close(flatten_gramian(ours), theirs)  # TorchJD 0.18: the flattened [M, M] Gramian


class TwoOutputs(nn.Module):
    """A module holding a parameter and returning two outputs, the second computed from the
    first (``h, 2 h``), sharing its memory (``h, h[:, :3]``) or chunks of one tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6))
        self.how = how

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x @ self.weight
        if self.how == "derived":
            return h, h * 2
        if self.how == "view":
            return h, h[:, :3]
        first, second = h.chunk(2, dim=1)
        return first, second


class TwoOutputsNet(nn.Module):
    def __init__(self, how: str, in_place: bool) -> None:
        super().__init__()
        self.two = TwoOutputs(how)
        self.head = nn.Linear({"derived": 12, "view": 9, "chunk": 6}[how], 2)
        self.in_place = in_place

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.two(x)
        if self.in_place:
            b = b.relu_()
        return self.head(torch.cat([a, b], dim=1))


@pytest.mark.parametrize(
    ("how", "in_place"), [("derived", False), ("derived", True), ("chunk", False)]
)
def test_several_outputs(how: str, in_place: bool) -> None:
    torch.manual_seed(0)
    model = TwoOutputsNet(how, in_place).to(device=DEVICE, dtype=DTYPE)
    x = torch.randn(BATCH, 6, device=DEVICE, dtype=DTYPE)
    y = torch.randn(BATCH, 2, device=DEVICE, dtype=DTYPE)
    jacobian = reference_jacobian(model, x, y)
    gramian = Engine(model, batch_dim=0).compute_gramian((model(x) - y) ** 2)
    expected = jacobian @ jacobian.T
    rtol, atol = TOLERANCES[DTYPE]
    torch.testing.assert_close(
        flatten_gramian(gramian).double(),
        expected,
        rtol=rtol,
        atol=atol * expected.abs().max().item(),
    )


@pytest.mark.parametrize("in_place", [False, True])
def test_outputs_sharing_memory_are_refused(in_place: bool) -> None:
    model = TwoOutputsNet("view", in_place).to(device=DEVICE, dtype=DTYPE)
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randn(BATCH, 6, device=DEVICE, dtype=DTYPE)) ** 2
    with pytest.raises(ValueError, match=r"TwoOutputs returned several outputs that share memory"):
        engine.compute_gramian(losses)
    # `batch_dim=None` differentiates through the graph: exact, against the reference.
    x = torch.randn(BATCH, 6, device=DEVICE, dtype=DTYPE)
    y = torch.zeros(BATCH, 2, device=DEVICE, dtype=DTYPE)
    jacobian = reference_jacobian(model, x, y)
    gramian = Engine(model, batch_dim=None).compute_gramian(model(x) ** 2)
    assert_close(flatten_gramian(gramian), jacobian @ jacobian.T)


class ModifiesLayerInput(nn.Module):
    """``h += b(h)``: the input of ``b`` is modified in place after ``b`` used it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h += self.b(h)
        out: Tensor = self.head(h)
        return out


def test_engine_refuses_modified_input() -> None:
    model = ModifiesLayerInput().to(device=DEVICE, dtype=DTYPE)
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randn(BATCH, 6, device=DEVICE, dtype=DTYPE)) ** 2
    with pytest.raises(ValueError, match="modified in place after the module used it"):
        engine.compute_gramian(losses)


# The closed-form step machinery (`gramian_step`, `mtl_gramian_step`): every trainable parameter
# in a Linear, Conv1d/Conv2d or Embedding.
STEP_CASES = [
    "linear_relu",
    "linear3d_silu",
    "conv1d_relu",
    "conv2d_silu",
    "residual_add_assign",
    "residual3d_add_",
    "embedding_add_assign",
]


def squared_errors(outputs: Tensor, y: Tensor) -> Tensor:
    return (outputs - y) ** 2


@pytest.mark.parametrize("name", STEP_CASES)
def test_per_sample_gramian_in_place(name: str) -> None:
    model, x, y = make(name)
    jacobian = reference_jacobian(model, x, y)
    _, square, _ = value_and_per_sample_gramian(model, params_of(model), (x,), squared_errors, (y,))
    assert_close(square, jacobian @ jacobian.T)


@pytest.mark.parametrize("name", STEP_CASES)
def test_mtl_gramian_in_place(name: str) -> None:
    model, x, y = make(name)
    task_jacobian = reference_jacobian(model, x, y).reshape(BATCH, 2, -1).mean(0)  # [2, n]

    def heads_fn(_: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return ((features - y) ** 2).mean(0)

    result = value_and_mtl_gramian(model, params_of(model), (x,), heads_fn, TensorDict({}), (y,))
    assert_close(result.gramian, task_jacobian @ task_jacobian.T)


def test_steps_refuse_modified_input() -> None:
    model = ModifiesLayerInput().to(device=DEVICE, dtype=DTYPE)
    x = torch.randn(BATCH, 6, device=DEVICE, dtype=DTYPE)
    y = torch.randn(BATCH, 2, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"module 'b' \(Linear\) was modified in place"):
        value_and_per_sample_gramian(model, params_of(model), (x,), squared_errors, (y,))

    def heads_fn(_: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return ((features - y) ** 2).mean(0)

    with pytest.raises(ValueError, match="mtl_step"):
        value_and_mtl_gramian(model, params_of(model), (x,), heads_fn, TensorDict({}), (y,))
