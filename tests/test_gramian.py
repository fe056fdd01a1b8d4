"""Gramians, generalized Gramians, ``combine`` and ``accumulate_grads``."""

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tests.architectures import ARCHITECTURES, M_OUT, Architecture, build
from tests.settings import DEVICE, DTYPE
from tests.utils import assert_close, dotted_leaves
from torchjd_func import (
    accumulate_grads,
    call,
    combine,
    flatten_gramian,
    gramian,
    inner_products,
    jacobian,
    params_of,
    reshape_weights,
)


def _concatenated(jac: TensorDict) -> Tensor:
    """The ``[M, n]`` matrix the library never builds: the reference."""
    n_rows = jac.batch_size.numel()
    return torch.cat([leaf.reshape(n_rows, -1) for leaf in dotted_leaves(jac).values()], dim=1)


def _random_jacobian(shape: tuple[int, ...], dtype: torch.dtype = DTYPE) -> TensorDict:
    return TensorDict(
        {
            "a": {"w": torch.randn(*shape, 3, 2, dtype=dtype, device=DEVICE)},
            "b": torch.randn(*shape, 4, dtype=dtype, device=DEVICE),
        },
        batch_size=list(shape),
    )


@pytest.mark.parametrize("shape", [(5,), (1,), (4, 3), (2, 3, 2)])
def test_gramian_equals_concatenated_product_and_generalized_layout(
    shape: tuple[int, ...],
) -> None:
    jac = _random_jacobian(shape, torch.float64)
    matrix = _concatenated(jac)
    expected_flat = matrix @ matrix.T

    generalized = gramian(jac)

    k = len(shape)
    assert generalized.shape == (*shape, *reversed(shape))
    torch.testing.assert_close(flatten_gramian(generalized), expected_flat)
    # Entry [i_1..i_k, j_k..j_1] is the inner product of rows i and j.
    rows = matrix.reshape(*shape, -1)
    for i in [(0,) * k, tuple(s - 1 for s in shape)]:
        for j in [(0,) * k, tuple(s - 1 for s in shape)]:
            expected = rows[i] @ rows[j]
            torch.testing.assert_close(generalized[(*i, *reversed(j))], expected)


def test_seed_000_shape_and_psd() -> None:
    jac = _random_jacobian((16, 2))
    generalized = gramian(jac)
    assert generalized.shape == (16, 2, 2, 16)
    square = flatten_gramian(generalized).double()
    torch.testing.assert_close(square, square.T)
    assert torch.linalg.eigvalsh(square).min() >= -1e-4 * square.diagonal().sum()


def test_scalar_loss_gramian_is_squared_norm() -> None:
    jac = _random_jacobian(())
    assert gramian(jac).shape == ()
    assert_close(gramian(jac), _concatenated(jac).pow(2).sum())
    assert flatten_gramian(gramian(jac)).shape == (1, 1)


def test_mixed_dtypes_are_promoted() -> None:
    jac = TensorDict(
        {"a": torch.ones(2, 3, dtype=torch.float32), "b": torch.ones(2, 1, dtype=torch.float64)},
        batch_size=[2],
    )
    assert gramian(jac).dtype == torch.float64
    torch.testing.assert_close(gramian(jac), torch.full((2, 2), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_combine_with_ones_is_autograd_gradient_of_the_sum(arch: Architecture) -> None:
    module = build(arch, torch.float64, DEVICE)
    x = torch.randn(4, *arch.input_shape, dtype=torch.float64, device=DEVICE)
    y = torch.randn(4, M_OUT, dtype=torch.float64, device=DEVICE)

    def fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
        return (call(module, params, x) - y) ** 2  # [B, m]

    jac = jacobian(fn, params_of(module), x, y)
    total = combine(jac, torch.ones(4, M_OUT, dtype=torch.float64, device=DEVICE))

    ((module(x) - y) ** 2).sum().backward()
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    found = dotted_leaves(total)
    assert list(found) == list(expected)
    for name, value in found.items():
        torch.testing.assert_close(value, expected[name])


def test_combine_equals_weighted_rows() -> None:
    jac = _random_jacobian((3, 2), torch.float64)
    weights = torch.randn(3, 2, dtype=torch.float64, device=DEVICE)
    expected = weights.reshape(-1) @ _concatenated(jac)

    combined = combine(jac, weights)

    assert combined.batch_size == ()
    assert combined["a", "w"].shape == (3, 2)
    flat = torch.cat([leaf.reshape(-1) for leaf in dotted_leaves(combined).values()])
    torch.testing.assert_close(flat, expected)


def test_weights_from_a_flattened_gramian_reshape_back() -> None:
    jac = _random_jacobian((4, 2), torch.float64)
    flat_weights = torch.arange(8.0, dtype=torch.float64, device=DEVICE)
    weights = reshape_weights(flat_weights, jac.batch_size)
    assert weights.shape == (4, 2)
    # Row order of the flattened Gramian is losses.flatten() order, so w^T G w agrees.
    quad_flat = flat_weights @ flatten_gramian(gramian(jac)) @ flat_weights
    update = combine(jac, weights)
    norm2 = sum(leaf.pow(2).sum() for leaf in dotted_leaves(update).values())
    torch.testing.assert_close(quad_flat, norm2)


def test_accumulate_grads_sets_then_adds() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)).to(DEVICE)
    grads = params_of(model) * 0.0 + 1.0
    frozen_before = model[1].bias.grad

    accumulate_grads(model, grads.select(("0", "weight"), ("0", "bias")))
    accumulate_grads(model, grads)

    assert frozen_before is None
    torch.testing.assert_close(model[0].weight.grad, torch.full((2, 3), 2.0, device=DEVICE))
    torch.testing.assert_close(model[1].bias.grad, torch.ones(1, device=DEVICE))


def test_accumulate_grads_then_optimizer_step_matches_autograd() -> None:
    model = nn.Linear(3, 2).to(DEVICE)
    reference = nn.Linear(3, 2).to(DEVICE)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 3, device=DEVICE)
    jac = jacobian(lambda p, x: call(model, p, x).pow(2).mean(0), params_of(model), x)

    accumulate_grads(model, combine(jac, torch.ones(2, device=DEVICE)))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    reference(x).pow(2).mean(0).sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()

    torch.testing.assert_close(model.weight, reference.weight)
    torch.testing.assert_close(model.bias, reference.bias)


def test_inner_products_equal_the_matrix_vector_product() -> None:
    jac = _random_jacobian((3, 2), torch.float64)
    direction = TensorDict(
        {
            "a": {"w": torch.randn(3, 2, dtype=torch.float64, device=DEVICE)},
            "b": torch.randn(4, dtype=torch.float64, device=DEVICE),
        }
    )
    flat = torch.cat([leaf.reshape(-1) for leaf in dotted_leaves(direction).values()])
    expected = (_concatenated(jac) @ flat).reshape(3, 2)
    torch.testing.assert_close(inner_products(jac, direction), expected)
    with pytest.raises(ValueError, match="keys of the Jacobian"):
        inner_products(jac, direction.exclude("b"))
    with pytest.raises(ValueError, match="expected"):
        inner_products(jac, direction.set("b", torch.ones(5, dtype=torch.float64, device=DEVICE)))
