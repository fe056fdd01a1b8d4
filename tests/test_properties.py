"""Property-based checks of the Gramian and ``combine`` on random Jacobians (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tests.utils import dotted_leaves
from torchjd_func import combine, flatten_gramian, gramian, reshape_weights

loss_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3)
param_shapes = st.lists(
    st.lists(st.integers(min_value=1, max_value=3), min_size=0, max_size=3), min_size=1, max_size=3
)


def _jacobian(loss_shape: list[int], shapes: list[list[int]], seed: int) -> TensorDict:
    generator = torch.Generator().manual_seed(seed)
    leaves = {
        f"p{i}": torch.randn((*loss_shape, *shape), generator=generator, dtype=torch.float64)
        for i, shape in enumerate(shapes)
    }
    return TensorDict(leaves, batch_size=loss_shape)


@settings(max_examples=60, deadline=None)
@given(loss_shapes, param_shapes, st.integers(min_value=0, max_value=2**16))
def test_gramian_is_the_psd_matrix_of_row_inner_products(
    loss_shape: list[int], shapes: list[list[int]], seed: int
) -> None:
    jac = _jacobian(loss_shape, shapes, seed)
    n_rows = torch.Size(loss_shape).numel()
    rows = torch.cat([leaf.reshape(n_rows, -1) for leaf in dotted_leaves(jac).values()], dim=1)

    square = flatten_gramian(gramian(jac))

    torch.testing.assert_close(square, rows @ rows.T)
    assert torch.linalg.eigvalsh(square).min() >= -1e-9 * max(1.0, square.trace().item())


@settings(max_examples=60, deadline=None)
@given(loss_shapes, param_shapes, st.integers(min_value=0, max_value=2**16))
def test_combine_norm_is_the_gramian_quadratic_form(
    loss_shape: list[int], shapes: list[list[int]], seed: int
) -> None:
    jac = _jacobian(loss_shape, shapes, seed)
    n_rows = torch.Size(loss_shape).numel()
    flat_weights = torch.randn(
        n_rows, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )

    update = combine(jac, reshape_weights(flat_weights, loss_shape))

    norm2 = sum(leaf.pow(2).sum() for leaf in dotted_leaves(update).values())
    expected = flat_weights @ flatten_gramian(gramian(jac)) @ flat_weights
    torch.testing.assert_close(torch.as_tensor(norm2, dtype=torch.float64), expected)
