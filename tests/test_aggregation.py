"""Class-style aggregators, published values, explicit state, and aggregation of Jacobians."""

import io
from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tests.settings import DEVICE
from tests.utils import dotted_leaves
from torchjd_func import (
    call,
    combine,
    flatten_gramian,
    gramian,
    group_params,
    jacobian,
    params_of,
    reshape_weights,
)
from torchjd_func.aggregation import (
    MGDA,
    Aggregator,
    Constant,
    ConstantWeighting,
    DualProj,
    DualProjWeighting,
    Flattening,
    GradVac,
    GradVacState,
    GradVacWeighting,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    PCGrad,
    PCGradWeighting,
    Random,
    RandomWeighting,
    Sum,
    SumWeighting,
    UPGrad,
    UPGradWeighting,
    Weighting,
    aggregate,
    aggregate_groups,
    gradvac,
    init_group_states,
    mean,
    upgrad,
    upgrad_weights,
)

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], device=DEVICE)

# TorchJD 0.18's outputs on J_base in float32 (shared/reference/torchjd-contract.md §5).
PUBLISHED_AGGREGATIONS: list[tuple[Callable[[], Aggregator], list[float]]] = [
    (Mean, [1.0, 1.0, 1.0]),
    (Sum, [2.0, 2.0, 2.0]),
    (lambda: Constant(torch.tensor([1.0, 2.0], device=DEVICE)), [8.0, 3.0, 3.0]),
    (UPGrad, [0.292902, 1.900352, 1.900352]),
    (DualProj, [0.556316, 1.110921, 1.110921]),
    (MGDA, [0.0, 1.0, 1.0]),
    (PCGrad, [0.584795, 3.801170, 3.801170]),
    (GradVac, [0.584795, 3.801170, 3.801170]),
]
PUBLISHED_WEIGHTINGS: list[tuple[Callable[[], Weighting], list[float]]] = [
    (MeanWeighting, [0.5, 0.5]),
    (SumWeighting, [1.0, 1.0]),
    (lambda: ConstantWeighting(torch.tensor([1.0, 2.0], device=DEVICE)), [1.0, 2.0]),
    (UPGradWeighting, [1.110921, 0.789431]),
    (DualProjWeighting, [0.610921, 0.5]),
    (MGDAWeighting, [0.6, 0.4]),
    (PCGradWeighting, [2.222222, 1.578947]),
    (GradVacWeighting, [2.222222, 1.578947]),
]


@pytest.mark.parametrize(("make", "expected"), PUBLISHED_AGGREGATIONS)
def test_published_aggregations(make: Callable[[], Aggregator], expected: list[float]) -> None:
    torch.testing.assert_close(
        make()(J_BASE), torch.tensor(expected, device=DEVICE), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(("make", "expected"), PUBLISHED_WEIGHTINGS)
def test_published_weightings(make: Callable[[], Weighting], expected: list[float]) -> None:
    torch.testing.assert_close(
        make()(J_BASE @ J_BASE.T), torch.tensor(expected, device=DEVICE), atol=1e-4, rtol=0
    )


def test_gradvac_second_call_matches_torchjd_and_reset_restarts() -> None:
    aggregator = GradVac()
    first = aggregator(J_BASE)
    second = aggregator(J_BASE)
    expected = torch.tensor([1.006540, 3.264403, 3.264403], device=DEVICE)
    torch.testing.assert_close(second, expected, atol=1e-4, rtol=0)
    aggregator.reset()
    torch.testing.assert_close(aggregator(J_BASE), first)


def test_random_weights_are_positive_sum_to_one_and_vary() -> None:
    weighting = RandomWeighting(seed=0)
    first = weighting(torch.eye(4, device=DEVICE))
    second = weighting(torch.eye(4, device=DEVICE))
    for weights in (first, second):
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, device=DEVICE))
    assert not torch.equal(first, second)
    # The seed makes runs reproducible; torch.manual_seed controls the default seed.
    torch.testing.assert_close(RandomWeighting(seed=0)(torch.eye(4, device=DEVICE)), first)
    torch.manual_seed(5)
    a = Random()(J_BASE)
    torch.manual_seed(5)
    torch.testing.assert_close(Random()(J_BASE), a)


def _pcgrad_rule(matrix: Tensor) -> Tensor:
    """PCGrad for two rows, written independently: project each gradient onto the normal plane
    of the other if they conflict, and sum."""
    g1, g2 = matrix[0], matrix[1]
    dot = g1 @ g2
    if dot >= 0:
        return g1 + g2
    return (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)


def test_upgrad_with_sum_preference_and_no_regularisation_is_pcgrad_for_two_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    aggregator = UPGrad(torch.ones(2, device=DEVICE), norm_eps=0.0, reg_eps=0.0)
    for _ in range(20):
        matrix = torch.randn(2, 5, generator=generator, dtype=torch.float64).to(DEVICE)
        expected = _pcgrad_rule(matrix)
        torch.testing.assert_close(aggregator(matrix), expected, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(PCGrad()(matrix), expected, atol=1e-8, rtol=1e-8)


def test_weighting_reinitialises_its_state_when_m_changes() -> None:
    weighting = GradVacWeighting()
    weighting(J_BASE @ J_BASE.T)
    three = torch.randn(3, 4, device=DEVICE)
    fresh = GradVacWeighting(seed=weighting.seed)
    torch.testing.assert_close(weighting(three @ three.T), fresh(three @ three.T))
    assert weighting.state.targets.shape == (3, 3)


def test_state_round_trips_through_torch_save() -> None:
    weighting = gradvac(seed=4)
    state = weighting.init(3, device=DEVICE)
    matrix = torch.randn(3, 6, device=DEVICE)
    for _ in range(3):
        _, state = weighting.update(matrix @ matrix.T, state)
    buffer = io.BytesIO()
    torch.save({"weighting": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)["weighting"]
    assert isinstance(loaded, GradVacState)
    assert torch.equal(loaded.targets, state.targets)
    assert torch.equal(loaded.key, state.key)


def test_gradvac_resumed_from_a_saved_state_continues_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(4, 6, generator=generator).to(DEVICE) for _ in range(8)]

    uninterrupted = GradVacWeighting(beta=0.3, seed=11)
    expected = [uninterrupted(j @ j.T) for j in matrices]

    first_run = GradVacWeighting(beta=0.3, seed=11)
    results = [first_run(j @ j.T) for j in matrices[:4]]
    buffer = io.BytesIO()
    torch.save(first_run.state, buffer)
    buffer.seek(0)
    resumed = GradVacWeighting(beta=0.3, seed=999)  # the saved key overrides the seed
    resumed.state = torch.load(buffer, weights_only=False)  # assigned before any call
    results += [resumed(j @ j.T) for j in matrices[4:]]

    for actual, reference in zip(results, expected, strict=True):
        assert torch.equal(actual, reference)


def test_flattening_on_a_generalized_gramian() -> None:
    jac = TensorDict({"w": torch.randn(16, 2, 5, device=DEVICE)}, batch_size=[16, 2])
    generalized = gramian(jac)
    weights = Flattening(UPGradWeighting())(generalized)
    assert weights.shape == (16, 2)
    expected = upgrad_weights(flatten_gramian(generalized)).reshape(16, 2)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(
        Flattening(MeanWeighting())(torch.eye(3, device=DEVICE)).sum(),
        torch.tensor(1.0, device=DEVICE),
    )


def test_class_errors() -> None:
    with pytest.raises(ValueError, match="matrix"):
        UPGrad()(torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="Flattening"):
        UPGradWeighting()(torch.ones(2, 3, 3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="one preference per loss"):
        UPGrad(torch.ones(3, device=DEVICE))(J_BASE)
    with pytest.raises(ValueError, match="one weight per loss"):
        Constant(torch.ones(3, device=DEVICE))(J_BASE)
    with pytest.raises(ValueError, match="non-negative"):
        UPGrad(reg_eps=-1.0)
    with pytest.raises(ValueError, match="positive"):
        MGDA(reg_eps=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GradVac(beta=1.5)
    elsewhere = gradvac().init(2, device="meta")  # a state created on another device
    with pytest.raises(ValueError, match=r"targets are on meta.*init\(m, device="):
        gradvac().update(J_BASE @ J_BASE.T, elsewhere)
    with pytest.raises(ValueError, match="vector"):
        UPGrad(torch.ones(2, 2, device=DEVICE))
    with pytest.raises(TypeError, match="Weighting"):
        GramianWeightedAggregator(upgrad())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        Random(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 losses"):
        Mean()(torch.ones(0, 3, device=DEVICE))
    with pytest.raises(TypeError, match="floating-point"):
        MeanWeighting()(torch.ones(2, 2, dtype=torch.long, device=DEVICE))


def test_nan_gramian_gives_nan_weights_without_hanging() -> None:
    nan = torch.full((3, 3), float("nan"), device=DEVICE)
    assert torch.isnan(UPGradWeighting()(nan)).all()
    assert torch.isnan(MGDAWeighting()(nan)).all()
    assert torch.isnan(DualProjWeighting()(nan)).all()


def test_repr() -> None:
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001)"
    assert repr(Flattening(MeanWeighting())) == "Flattening(MeanWeighting())"
    assert (
        repr(GramianWeightedAggregator(SumWeighting()))
        == "GramianWeightedAggregator(SumWeighting())"
    )


def _model_and_jacobian() -> tuple[nn.Module, TensorDict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DEVICE)
    x = torch.randn(10, 5, device=DEVICE)

    def losses(params: TensorDict, x: Tensor) -> Tensor:
        return call(model, params, x).pow(2).mean(0)

    return model, jacobian(losses, params_of(model), x)


def test_aggregate_is_weighting_of_the_gramian_then_combine() -> None:
    _, jac = _model_and_jacobian()
    weighting = upgrad()
    update, weights, _ = aggregate(jac, weighting, weighting.init(3, device=DEVICE))
    expected_weights = upgrad_weights(gramian(jac))
    torch.testing.assert_close(weights, expected_weights)
    expected = dotted_leaves(combine(jac, expected_weights))
    for name, leaf in dotted_leaves(update).items():
        torch.testing.assert_close(leaf, expected[name])
    # UPGrad's update conflicts with no loss: J @ update >= 0 (first-order decrease of none).
    rows = torch.cat([leaf.reshape(3, -1) for leaf in dotted_leaves(jac).values()], dim=1)
    flat = torch.cat([leaf.reshape(-1) for leaf in dotted_leaves(update).values()])
    assert (rows @ flat >= -1e-4 * rows.norm() ** 2).all()


def test_aggregate_flattens_generalized_gramians() -> None:
    jac = TensorDict({"w": torch.randn(4, 3, 5, device=DEVICE)}, batch_size=[4, 3])
    update, weights, _ = aggregate(jac, upgrad(), upgrad().init(12, device=DEVICE))
    assert weights.shape == (4, 3)
    expected = reshape_weights(upgrad_weights(flatten_gramian(gramian(jac))), [4, 3])
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(update["w"], torch.einsum("ab,abk->k", expected, jac["w"]))


@pytest.mark.parametrize("strategy", ["together", "per_network", "per_layer", "per_tensor"])
def test_aggregate_groups_equals_one_aggregation_per_group(strategy: str) -> None:
    model, jac = _model_and_jacobian()
    groups = group_params(params_of(model), strategy)  # type: ignore[arg-type]
    states = init_group_states(groups, gradvac(seed=1), m=3, device=DEVICE)

    update, weights, new_states = aggregate_groups(jac, groups, gradvac(seed=1), states)

    assert sorted(new_states) == sorted(groups)
    found = dotted_leaves(update)
    assert list(found) == list(dotted_leaves(jac))
    for name, members in groups.items():
        expected = aggregate(jac.select(*members), gradvac(seed=1), states[name])
        torch.testing.assert_close(weights[name], expected.weights)
        for key, leaf in dotted_leaves(expected.update).items():
            torch.testing.assert_close(found[key], leaf)
        torch.testing.assert_close(new_states[name].targets, expected.state.targets)


def test_aggregate_groups_with_one_weighting_per_group_and_errors() -> None:
    model, jac = _model_and_jacobian()
    groups = group_params(params_of(model), "per_layer")
    weightings = {"0": upgrad(), "2": mean()}
    states = init_group_states(groups, weightings, m=3, device=DEVICE)
    _, weights, _ = aggregate_groups(jac, groups, weightings, states)
    torch.testing.assert_close(weights["2"], torch.full((3,), 1 / 3, device=DEVICE))
    with pytest.raises(ValueError, match="exactly the groups"):
        aggregate_groups(jac, groups, {"0": upgrad()}, states)
    with pytest.raises(ValueError, match="init_group_states"):
        aggregate_groups(jac, groups, weightings, {"0": states["0"]})
    with pytest.raises(TypeError, match="PureWeighting"):
        aggregate(jac, UPGradWeighting(), None)  # type: ignore[call-overload]
