"""The autograd front door against autograd references and the functional core."""

from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tests.architectures import ARCHITECTURES, M_OUT, TRANSFORMER, Architecture, build
from tests.architectures import reference_jacobian as reference
from tests.settings import DEVICE
from tests.utils import assert_close, dotted_leaves
from torchjd_func import call, gramian, mtl_jacobian, params_of, value_and_jacobian
from torchjd_func.aggregation import (
    MGDA,
    Aggregator,
    Constant,
    DualProj,
    GradVac,
    GramianWeightedAggregator,
    Mean,
    PCGrad,
    Random,
    Sum,
    UPGrad,
    aggregate,
    upgrad,
    upgrad_weights,
)
from torchjd_func.autojac import backward, jac, jac_to_grad, mtl_backward

FRONT_DOOR_ARCHITECTURES = [*ARCHITECTURES, TRANSFORMER]


def _losses(arch: Architecture, per_sample: bool) -> tuple[nn.Module, Tensor]:
    module = build(arch, torch.float64, DEVICE)
    x = torch.randn(4, *arch.input_shape, dtype=torch.float64, device=DEVICE)
    y = torch.randn(4, M_OUT, dtype=torch.float64, device=DEVICE)
    squared = (module(x) - y) ** 2
    return module, squared if per_sample else squared.mean(dim=0)


def _jacs(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.jac for n, p in module.named_parameters() if hasattr(p, "jac")}


@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("per_sample", [False, True], ids=["[m]", "[B, m]"])
@pytest.mark.parametrize("arch", FRONT_DOOR_ARCHITECTURES, ids=str)
def test_backward_matches_autograd(
    arch: Architecture, per_sample: bool, chunk_size: int | None
) -> None:
    module, losses = _losses(arch, per_sample)
    expected = {
        k: v.reshape(losses.numel(), *v.shape[losses.ndim :])
        for k, v in reference(module, losses).items()
    }

    backward(losses, parallel_chunk_size=chunk_size)

    found = _jacs(module)
    assert list(found) == list(expected)
    for name, value in found.items():
        assert_close(value, expected[name])


def test_backward_with_inputs_jac_tensors_and_accumulation() -> None:
    module, losses = _losses(ARCHITECTURES[0], per_sample=False)
    full = reference(module, losses)
    weight = module[0].weight  # type: ignore[index]
    chain = torch.randn(5, M_OUT, dtype=torch.float64, device=DEVICE)

    backward(losses, jac_tensors=chain, inputs=[weight], retain_graph=True)
    assert_close(weight.jac, torch.einsum("km,m...->k...", chain, full["0.weight"]))
    assert not hasattr(module[0].bias, "jac")  # type: ignore[index]

    backward(losses, jac_tensors=[chain], inputs=[weight])
    assert_close(weight.jac, 2 * torch.einsum("km,m...->k...", chain, full["0.weight"]))


def test_retain_graph_semantics() -> None:
    module, losses = _losses(ARCHITECTURES[0], per_sample=False)
    backward(losses, retain_graph=True)
    backward(losses)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        backward(losses)
    del module


def test_jac_returns_rows_in_input_order() -> None:
    module, losses = _losses(ARCHITECTURES[1], per_sample=False)
    expected = reference(module, losses)
    params = dict(module.named_parameters())
    names = ["4.weight", "0.bias", "4.weight"]

    rows = jac(losses, [params[n] for n in names], parallel_chunk_size=2)

    for name, row in zip(names, rows, strict=True):
        assert_close(row, expected[name])


def test_backward_and_jac_errors() -> None:
    param = torch.ones(2, requires_grad=True)
    losses = torch.stack([param.sum(), param.prod()])
    with pytest.raises(ValueError, match="same tensor twice"):
        backward([losses, losses])
    with pytest.raises(ValueError, match="empty"):
        backward([])
    with pytest.raises(ValueError, match="does not require grad"):
        backward(torch.ones(2))
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        backward(losses, parallel_chunk_size=0)
    with pytest.raises(ValueError, match=r"must have shape \[k, \*\[2\]\]"):
        backward(losses, jac_tensors=torch.ones(3, 3))
    with pytest.raises(ValueError, match="one Jacobian per tensor"):
        backward(losses, jac_tensors=[torch.ones(1, 2), torch.ones(1, 2)])
    with pytest.raises(ValueError, match="leaf tensors"):
        backward(losses, inputs=[param * 2])
    with pytest.raises(TypeError, match="not a Tensor"):
        jac(losses, [param], jac_outputs=[3.0])  # type: ignore[list-item]


class MTLModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])

    def task_losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [
            (head(features).squeeze(1) - y[:, i]).pow(2).mean() for i, head in enumerate(self.heads)
        ]


def _mtl_setup() -> tuple[MTLModel, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MTLModel().to(DEVICE, torch.float64)
    x = torch.randn(10, 5, device=DEVICE, dtype=torch.float64)
    y = torch.randn(10, 3, device=DEVICE, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_mtl_backward_matches_autograd(chunk_size: int | None) -> None:
    model, x, y = _mtl_setup()
    features, losses = model.task_losses(x, y)
    full = reference(model, torch.stack(losses))

    mtl_backward(losses=losses, features=features, parallel_chunk_size=chunk_size)

    for name, param in model.named_parameters():
        if name.startswith("trunk."):
            assert_close(param.jac, full[name])  # type: ignore[attr-defined]
            assert param.grad is None
        else:
            task = int(name.split(".")[1])
            assert_close(param.grad, full[name][task])
            assert not hasattr(param, "jac")


def test_mtl_backward_with_aggregator_equals_the_functional_core() -> None:
    model, x, y = _mtl_setup()
    features, losses = model.task_losses(x, y)
    mtl_backward(losses, features, UPGrad())

    def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
        return call(model.trunk, params, x)

    def heads_fn(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return torch.stack(
            [
                (call(head, params[str(i)], features).squeeze(1) - y[:, i]).pow(2).mean()
                for i, head in enumerate(model.heads)
            ]
        )

    out = mtl_jacobian(
        trunk_fn, heads_fn, params_of(model.trunk), params_of(model.heads), (x,), (y,)
    )
    update, _, _ = aggregate(out.jacobian, upgrad(), upgrad().init(3, device=DEVICE))
    expected = dotted_leaves(update) | {
        f"heads.{k}": v for k, v in dotted_leaves(out.head_grads).items()
    }
    for name, param in model.named_parameters():
        key = name.removeprefix("trunk.")
        assert param.grad is not None
        assert_close(param.grad, expected[key])


def test_mtl_backward_explicit_params_and_several_features() -> None:
    torch.manual_seed(0)
    trunk = nn.Linear(4, 6).to(DEVICE)
    head_a, head_b = nn.Linear(3, 1).to(DEVICE), nn.Linear(3, 1).to(DEVICE)
    out = trunk(torch.randn(7, 4, device=DEVICE))
    features = [out[:, :3].tanh(), out[:, 3:].sin()]
    losses = [head_a(features[0]).pow(2).mean(), head_b(features[1]).abs().mean()]
    full = reference(trunk, torch.stack(losses))
    grad_a = torch.autograd.grad(losses[0], head_a.weight, retain_graph=True)[0]

    mtl_backward(
        losses,
        features,
        tasks_params=[[head_a.weight], [head_b.weight, head_b.bias]],
        shared_params=trunk.parameters(),
    )

    assert_close(trunk.weight.jac, full["weight"])  # type: ignore[attr-defined]
    assert_close(head_a.weight.grad, grad_a)
    assert head_a.bias.grad is None


def test_mtl_backward_errors() -> None:
    model, x, y = _mtl_setup()
    features, losses = model.task_losses(x, y)
    with pytest.raises(ValueError, match="one scalar loss per task"):
        mtl_backward([torch.stack(losses)], features)
    with pytest.raises(ValueError, match="overlap"):
        mtl_backward(
            losses,
            features,
            tasks_params=[model.trunk.parameters(), [], []],
            shared_params=model.trunk.parameters(),
        )
    with pytest.raises(ValueError, match="one set per task"):
        mtl_backward(losses, features, tasks_params=[[]])
    with pytest.raises(ValueError, match="does not require grad"):
        mtl_backward(losses, [x])


AGGREGATORS: list[Callable[[], Aggregator]] = [
    UPGrad,
    DualProj,
    MGDA,
    Mean,
    Sum,
    lambda: Constant(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, device=DEVICE)),
    lambda: Random(seed=0),
    lambda: PCGrad(seed=0),
    lambda: GradVac(seed=0),
]


@pytest.mark.parametrize("make", AGGREGATORS)
def test_jac_to_grad_with_every_aggregator(make: Callable[[], Aggregator]) -> None:
    module, losses = _losses(ARCHITECTURES[0], per_sample=False)
    full = reference(module, losses)
    matrix = torch.cat([j.reshape(M_OUT, -1) for j in full.values()], dim=1)
    aggregator = make()
    assert isinstance(aggregator, GramianWeightedAggregator)
    expected_weights = aggregator.gramian_weighting(matrix @ matrix.T)
    backward(losses)

    weights = jac_to_grad(module.parameters(), make())

    assert weights is not None
    assert_close(weights, expected_weights)
    for name, param in module.named_parameters():
        assert_close(param.grad, torch.tensordot(expected_weights, full[name], dims=1))
        assert not hasattr(param, "jac")


def test_jac_to_grad_retain_jac_accumulates_and_errors() -> None:
    module, losses = _losses(ARCHITECTURES[0], per_sample=False)
    backward(losses)
    params = list(module.parameters())
    jac_to_grad(params, Mean(), retain_jac=True)
    first = [p.grad.clone() for p in params if p.grad is not None]
    jac_to_grad(params, Mean())
    for param, grad in zip(params, first, strict=True):
        assert_close(param.grad, 2 * grad)
    with pytest.raises(ValueError, match=r"no `\.jac`"):
        jac_to_grad(params, Mean())
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    a.jac, b.jac = torch.ones(2, 2), torch.ones(3, 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="different numbers of rows"):
        jac_to_grad([a, b], Mean())
    with pytest.raises(TypeError, match="Aggregator"):
        jac_to_grad([a], upgrad(), retain_jac=False)  # type: ignore[arg-type]
    assert hasattr(a, "jac")  # nothing is freed when the call is refused


def test_backward_and_jac_to_grad_equal_the_functional_core() -> None:
    module = build(TRANSFORMER, torch.float64, DEVICE)
    x = torch.randn(4, 4, 8, dtype=torch.float64, device=DEVICE)
    losses = module(x).pow(2).mean(dim=0)

    backward(losses)
    jac_to_grad(module.parameters(), UPGrad())

    _, jacobian, _ = value_and_jacobian(
        lambda p, x: call(module, p, x).pow(2).mean(dim=0), params_of(module), x
    )
    weights = upgrad_weights(gramian(jacobian))
    for name, leaf in dotted_leaves(jacobian).items():
        param = dict(module.named_parameters())[name]
        assert_close(param.grad, torch.tensordot(weights, leaf, dims=1))
