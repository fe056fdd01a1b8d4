"""Jacobians from the functional core against a loop of ``torch.autograd.grad``."""

from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tests.architectures import (
    ARCHITECTURES,
    M_OUT,
    REDUCTIONS,
    Architecture,
    build,
    reference_jacobian,
)
from tests.settings import DEVICE
from tests.utils import assert_close, assert_leaves_close, dotted_leaves
from torchjd_func import (
    call,
    jacobian,
    params_of,
    per_sample_jacobian,
    value_and_jacobian,
    value_and_per_sample_jacobian,
)

BATCH = 4
DTYPES = [torch.float32, torch.float64]


def _data(arch: Architecture, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = torch.randn(BATCH, *arch.input_shape, dtype=dtype, device=DEVICE)
    y = torch.randn(BATCH, M_OUT, dtype=dtype, device=DEVICE)
    return x, y


def _losses_fn(module: nn.Module, reduction: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def losses_fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return reduction((call(module, params, x) - y) ** 2)

    return losses_fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(REDUCTIONS))
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_jacobian_matches_autograd(arch: Architecture, shape: str, dtype: torch.dtype) -> None:
    module = build(arch, dtype, DEVICE)
    x, y = _data(arch, dtype)
    reduction = REDUCTIONS[shape]
    expected_losses = reduction((module(x) - y) ** 2)
    expected = reference_jacobian(module, expected_losses)

    losses, jac, aux = value_and_jacobian(_losses_fn(module, reduction), params_of(module), x, y)

    assert_close(losses, expected_losses.detach())
    assert jac.batch_size == expected_losses.shape
    assert aux is None
    assert_leaves_close(jac, expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5, 12, 100])
@pytest.mark.parametrize("arch", ARCHITECTURES[:3], ids=str)
def test_every_chunk_size_gives_the_same_jacobian(
    arch: Architecture, chunk_size: int | None
) -> None:
    dtype = torch.float64
    module = build(arch, dtype, DEVICE)
    x, y = _data(arch, dtype)
    reduction = REDUCTIONS["[B, m]"]  # 12 rows
    expected = reference_jacobian(module, reduction((module(x) - y) ** 2))

    jac = jacobian(_losses_fn(module, reduction), params_of(module), x, y, chunk_size=chunk_size)

    assert_leaves_close(jac, expected)


def test_aux_is_returned_and_forward_runs_once() -> None:
    module = nn.Linear(3, 2).to(DEVICE)
    calls = []

    def fn(params: TensorDict, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        calls.append(1)
        out = call(module, params, x)
        return out.pow(2).mean(0), {"prediction": out}

    x = torch.randn(5, 3, device=DEVICE)
    losses, jac, aux = value_and_jacobian(fn, params_of(module), x, has_aux=True)

    assert len(calls) == 1
    torch.testing.assert_close(aux["prediction"], module(x).detach())
    torch.testing.assert_close(losses, module(x).pow(2).mean(0).detach())
    assert jac["weight"].shape == (2, 2, 3)


def test_unused_parameter_gets_zero_rows() -> None:
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).to(DEVICE)

    def fn(params: TensorDict, x: Tensor) -> Tensor:
        return call(model["used"], params["used"], x).sum(0)

    jac = jacobian(fn, params_of(model), torch.randn(4, 3, device=DEVICE))

    assert torch.count_nonzero(jac["unused", "weight"]) == 0
    assert torch.count_nonzero(jac["unused", "bias"]) == 0
    assert torch.count_nonzero(jac["used", "bias"]) > 0


def test_jacobian_does_not_touch_the_module() -> None:
    module = nn.Linear(3, 2).to(DEVICE)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    params = params_of(module) + 1.0

    jacobian(lambda p, x: call(module, p, x).sum(0), params, torch.randn(4, 3, device=DEVICE))

    for name, param in module.named_parameters():
        assert torch.equal(param, before[name])
        assert param.grad is None


def _sample_fn(module: nn.Module, per_task: bool) -> Callable[..., Tensor]:
    def sample_losses(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        squared = (call(module, params, x.unsqueeze(0)).squeeze(0) - y) ** 2
        return squared if per_task else squared.mean()

    return sample_losses


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_task", [False, True], ids=["IWRM", "IWMTL"])
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_per_sample_jacobian_matches_autograd(
    arch: Architecture, per_task: bool, dtype: torch.dtype
) -> None:
    module = build(arch, dtype, DEVICE)
    x, y = _data(arch, dtype)
    squared = (module(x) - y) ** 2
    expected_losses = squared if per_task else squared.mean(dim=1)
    expected = reference_jacobian(module, expected_losses)

    losses, jac, _ = value_and_per_sample_jacobian(
        _sample_fn(module, per_task), params_of(module), x, y
    )

    assert_close(losses, expected_losses.detach())
    assert jac.batch_size == expected_losses.shape
    assert_leaves_close(jac, expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4, 10])
def test_per_sample_chunk_sizes_and_unbatched_inputs(chunk_size: int | None) -> None:
    dtype = torch.float64
    module = build(ARCHITECTURES[0], dtype, DEVICE)
    x, y = _data(ARCHITECTURES[0], dtype)
    scale = torch.tensor(2.0, dtype=dtype, device=DEVICE)
    expected = reference_jacobian(module, scale * ((module(x) - y) ** 2).mean(dim=1))

    def sample_loss(params: TensorDict, x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
        return scale * ((call(module, params, x) - y) ** 2).mean()

    jac = per_sample_jacobian(
        sample_loss,
        params_of(module),
        x,
        y,
        scale,
        in_dims=(0, 0, None),
        chunk_size=chunk_size,
    )

    assert_leaves_close(jac, expected)


def test_per_sample_equals_jacobian_of_batched_losses() -> None:
    module = build(ARCHITECTURES[1], torch.float64, DEVICE)
    x, y = _data(ARCHITECTURES[1], torch.float64)
    params = params_of(module)

    batched = jacobian(_losses_fn(module, REDUCTIONS["[B]"]), params, x, y)
    per_sample = per_sample_jacobian(_sample_fn(module, per_task=False), params, x, y)

    assert_leaves_close(per_sample, dotted_leaves(batched))
