"""The shared property suite: every weighting of the registry, for the properties it claims."""

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor
from torch._dynamo.testing import CompileCounter
from torch.utils._pytree import tree_flatten, tree_map

from tests.registry import (
    LINEAR_UNDER_SCALING,
    MATRICES,
    NON_CONFLICTING,
    PERMUTATION_INVARIANT,
    REGISTRY,
    SCALED,
    SIMPLEX,
    STATEFUL,
    Entry,
)
from tests.settings import DEVICE, DTYPE


def _with(prop: str) -> list[Entry]:
    return [entry for entry in REGISTRY if prop in entry.properties]


def _weights(entry: Entry, matrix: Tensor) -> Tensor:
    m = matrix.shape[0]
    if m < entry.min_m:
        pytest.skip(f"{entry} takes at least {entry.min_m} losses")
    weighting = entry.make(m)
    weights, _ = weighting.update(matrix @ matrix.T, weighting.init(m, dtype=DTYPE, device=DEVICE))
    return weights


def _aggregate(entry: Entry, matrix: Tensor) -> Tensor:
    return _weights(entry, matrix) @ matrix


def _ids(cases: list[tuple[str, Tensor]]) -> list[Any]:
    return [pytest.param(matrix, id=name) for name, matrix in cases]


@pytest.mark.parametrize("matrix", _ids(MATRICES + SCALED))
@pytest.mark.parametrize("entry", REGISTRY, ids=str)
def test_structure(entry: Entry, matrix: Tensor) -> None:
    weights = _weights(entry, matrix)
    assert weights.shape == (matrix.shape[0],)
    assert weights.dtype == DTYPE
    assert weights.device == matrix.device
    assert torch.isfinite(weights).all()
    assert torch.isfinite(weights @ matrix).all()


@pytest.mark.parametrize("matrix", _ids(MATRICES + SCALED[::3]))
@pytest.mark.parametrize("entry", _with(NON_CONFLICTING), ids=str)
def test_non_conflicting(entry: Entry, matrix: Tensor) -> None:
    weights = _weights(entry, matrix)
    products = matrix @ (weights @ matrix)
    # As in TorchJD's tests, the positive part carries (almost) all the norm; the absolute
    # tolerance is relative to the size of the products, ‖J‖² ‖w‖.
    scale = matrix.norm() ** 2 * weights.norm().clamp(min=1)
    torch.testing.assert_close(
        products.clamp(min=0).norm(), products.norm(), rtol=4e-4, atol=float(4e-4 * scale)
    )


@pytest.mark.parametrize("matrix", _ids(MATRICES))
@pytest.mark.parametrize("entry", _with(PERMUTATION_INVARIANT), ids=str)
def test_permutation_invariant(entry: Entry, matrix: Tensor) -> None:
    expected = _aggregate(entry, matrix)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        permutation = torch.randperm(matrix.shape[0], generator=generator).to(DEVICE)
        torch.testing.assert_close(
            _aggregate(entry, matrix[permutation]),
            expected,
            rtol=1e-4,
            atol=1e-5 * (1 + expected.abs().max().item()),
        )


@pytest.mark.parametrize("matrix", _ids(MATRICES))
@pytest.mark.parametrize("entry", _with(LINEAR_UNDER_SCALING), ids=str)
def test_linear_under_scaling(entry: Entry, matrix: Tensor) -> None:
    generator = torch.Generator().manual_seed(1)
    m = matrix.shape[0]
    for _ in range(5):
        c1, c2 = (torch.rand(m, generator=generator, dtype=DTYPE).to(DEVICE) + 0.1 for _ in "12")
        alpha, beta = (float(torch.rand(1, generator=generator)) + 0.1 for _ in "ab")
        combined = _aggregate(entry, (alpha * c1 + beta * c2)[:, None] * matrix)
        separate = alpha * _aggregate(entry, c1[:, None] * matrix) + beta * _aggregate(
            entry, c2[:, None] * matrix
        )
        scale = 1 + separate.abs().max().item()
        torch.testing.assert_close(
            combined, separate, rtol=entry.linearity_tol, atol=entry.linearity_tol * scale
        )


@pytest.mark.parametrize("matrix", _ids(MATRICES))
@pytest.mark.parametrize("entry", _with(SIMPLEX), ids=str)
def test_simplex(entry: Entry, matrix: Tensor) -> None:
    weights = _weights(entry, matrix)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(), torch.ones((), dtype=DTYPE, device=DEVICE))


def _leaves(tree: Any) -> list[Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def _gramian(m: int, seed: int) -> Tensor:
    matrix = torch.randn(m, 2 * m, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    matrix = matrix.to(DEVICE)
    return matrix @ matrix.T


@pytest.mark.parametrize("entry", REGISTRY, ids=str)
def test_pure_and_state_stable(entry: Entry) -> None:
    m = 5
    weighting = entry.make(m)
    state = weighting.init(m, dtype=DTYPE, device=DEVICE)
    gramian = _gramian(m, 0)
    gramian_copy, state_copy = gramian.clone(), tree_map(torch.clone, state)

    first, new_state = weighting.update(gramian, state)
    again, again_state = weighting.update(gramian, state)

    # Pure: same inputs, same outputs; inputs untouched.
    assert torch.equal(first, again)
    for a, b in zip(_leaves(new_state), _leaves(again_state), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(gramian, gramian_copy)
    for a, b in zip(_leaves(state), _leaves(state_copy), strict=True):
        assert torch.equal(a, b)
    # Stable: the new state has the structure, shapes, dtypes and devices of the initial one.
    assert type(new_state) is type(state)
    for a, b in zip(_leaves(new_state), _leaves(state), strict=True):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
    changed = any(
        not torch.equal(a, b) for a, b in zip(_leaves(new_state), _leaves(state), strict=True)
    )
    assert changed == (STATEFUL in entry.properties)


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("entry", REGISTRY, ids=str)
def test_compiles_fullgraph_without_recompiling(entry: Entry) -> None:
    m = 4
    weighting = entry.make(m)
    state = weighting.init(m, dtype=DTYPE, device=DEVICE)
    counter = CompileCounter()
    compiled = torch.compile(weighting.update, fullgraph=True, backend=counter)

    for seed in range(2):
        gramian = _gramian(m, seed)
        expected, expected_state = weighting.update(gramian, state)
        actual, actual_state = compiled(gramian, state)
        torch.testing.assert_close(actual, expected)
        for a, b in zip(_leaves(actual_state), _leaves(expected_state), strict=True):
            torch.testing.assert_close(a, b)
        state = expected_state
    assert counter.frame_count == 1


@pytest.mark.parametrize("entry", REGISTRY, ids=str)
def test_vmap_over_gramians_equals_a_loop(entry: Entry) -> None:
    m = 4
    weighting = entry.make(m)
    state = weighting.init(m, dtype=DTYPE, device=DEVICE)
    gramians = torch.stack([_gramian(m, seed) for seed in range(3)])

    batched, batched_states = torch.vmap(weighting.update, in_dims=(0, None))(gramians, state)

    for i, gramian in enumerate(gramians):
        expected, expected_state = weighting.update(gramian, state)
        torch.testing.assert_close(batched[i], expected)
        for a, b in zip(_leaves(batched_states), _leaves(expected_state), strict=True):
            torch.testing.assert_close(a[i] if a.ndim > b.ndim else a, b)
