"""Hardening of the weightings: restored and pickled state, low-precision dtypes, non-finite
Gramians (NaN weights, state unchanged), and clear errors for bad arguments."""

import io
import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from torchjd_func._prng import key_from_seed, normal, permutations, uniform
from torchjd_func.aggregation import (
    MGDA,
    Constant,
    ConstantWeighting,
    DualProj,
    EmptyState,
    Flattening,
    GradVac,
    GradVacWeighting,
    GramianWeightedAggregator,
    GramianWeighting,
    Mean,
    PCGrad,
    PCGradWeighting,
    PureWeighting,
    Random,
    RandomWeighting,
    Sum,
    UPGrad,
    UPGradWeighting,
    Weighting,
    aggregate,
    constant,
    dualproj,
    gradvac,
    mean,
    mgda,
    pcgrad,
    random_,
    sum_,
    upgrad,
)
from torchjd_func.aggregation._base import Aggregator

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
STATEFUL: list[Callable[[], Weighting]] = [
    lambda: GradVacWeighting(beta=0.3, seed=11),
    lambda: PCGradWeighting(seed=11),
    lambda: RandomWeighting(seed=11),
]
FACTORIES: dict[str, Callable[[], PureWeighting[Any]]] = {
    "mean": mean,
    "sum": sum_,
    "constant": lambda: constant(torch.tensor([1.0, 2.0, 3.0])),
    "random": lambda: random_(seed=3),
    "pcgrad": lambda: pcgrad(seed=3),
    "gradvac": lambda: gradvac(seed=3),
    "upgrad": upgrad,
}


def _gramians(count: int, m: int = 3, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    jacobians = [torch.randn(m, 5, generator=generator, dtype=torch.float64) for _ in range(count)]
    return [j @ j.T for j in jacobians]


def _save(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("make", STATEFUL)
def test_state_assigned_to_a_fresh_object_continues_identically(
    make: Callable[[], Weighting],
) -> None:
    gramians = _gramians(8)
    uninterrupted = make()
    expected = [uninterrupted(g) for g in gramians]
    first = make()
    results = [first(g) for g in gramians[:4]]
    resumed = make()
    resumed.state = torch.load(_save(first.state), weights_only=False)
    results += [resumed(g) for g in gramians[4:]]
    for actual, reference in zip(results, expected, strict=True):
        assert torch.equal(actual, reference)


def test_aggregator_state_restored_in_a_fresh_process(tmp_path: Any) -> None:
    matrices = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    uninterrupted = GradVac(seed=5)
    expected = torch.stack([uninterrupted(j) for j in matrices])
    first = GradVac(seed=5)
    for j in matrices[:3]:
        first(j)
    torch.save({"state": first.weighting.state, "matrices": matrices}, tmp_path / "s.pt")
    script = (
        "import sys, torch\n"
        "from torchjd_func.aggregation import GradVac\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "resumed = GradVac(seed=5)\n"
        "resumed.weighting.state = saved['state']\n"
        "torch.save(torch.stack([resumed(j) for j in saved['matrices'][3:]]), sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s.pt"), str(tmp_path / "out.pt")],
        check=True,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected[3:])


def test_assigned_state_for_another_m_dtype_or_device_is_refused() -> None:
    weighting = GradVacWeighting(seed=0)
    weighting(_gramians(1)[0])
    saved = weighting.state
    for gramian, problem in [
        (_gramians(1, m=4)[0], r"`targets` is \[3, 3\].*expected \[4, 4\]"),
        (_gramians(1)[0].float(), "float64 on cpu, expected .*float32"),
    ]:
        fresh = GradVacWeighting(seed=0)
        fresh.state = saved
        with pytest.raises(ValueError, match=problem):
            fresh(gramian)
    fresh = GradVacWeighting(seed=0)
    fresh.state = gradvac().init(3, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="on meta"):
        fresh(_gramians(1)[0])
    fresh.state = EmptyState()
    with pytest.raises(ValueError, match="a EmptyState, expected a GradVacState"):
        fresh(_gramians(1)[0])
    # The object's own state still follows a change of m (TorchJD's behaviour).
    weighting(_gramians(1, m=4)[0])
    assert weighting.state.targets.shape == (4, 4)


PICKLED: list[Callable[[], Aggregator | Weighting | Flattening]] = [
    UPGrad,
    DualProj,
    MGDA,
    Mean,
    Sum,
    lambda: Constant(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
    lambda: Random(seed=2),
    lambda: PCGrad(seed=2),
    lambda: GradVac(seed=2),
    lambda: GradVac(),  # a drawn seed survives the round trip
    lambda: GradVacWeighting(seed=2),
    lambda: Flattening(GradVacWeighting(seed=2)),
    lambda: GramianWeightedAggregator(UPGradWeighting()),
    lambda: ConstantWeighting(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
    # The generic wrapper of a PureWeighting (its functions are pickled, not rebuilt).
    lambda: GramianWeightedAggregator(GramianWeighting(upgrad(differentiable=True))),
    lambda: GramianWeighting(gradvac(beta=0.3, seed=2)),
    lambda: GramianWeighting(pcgrad(seed=3)),
]


@pytest.mark.parametrize("make", PICKLED)
def test_torch_save_round_trip_continues_identically(
    make: Callable[[], Aggregator | Weighting | Flattening],
) -> None:
    generator = torch.Generator().manual_seed(1)
    matrices = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(6)]
    inputs = matrices if isinstance(make(), Aggregator) else [j @ j.T for j in matrices]
    original = make()
    before = [original(x) for x in inputs[:3]]
    loaded = torch.load(_save(original), weights_only=False)
    assert repr(loaded) == repr(original)
    copy = torch.load(_save(original), weights_only=False)
    after, continued = [original(x) for x in inputs[3:]], [loaded(x) for x in inputs[3:]]
    for a, b in zip(after, continued, strict=True):
        assert torch.equal(a, b)
    # reset() of a loaded object restarts from its seed: the first call of the run again.
    copy.reset()
    assert torch.equal(copy(inputs[0]), before[0])


PURE: list[Callable[[], PureWeighting[Any]]] = [
    upgrad,
    dualproj,
    mgda,
    mean,
    sum_,
    lambda: constant(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
    lambda: random_(seed=4),
    lambda: pcgrad(seed=4),
    lambda: gradvac(beta=0.2, seed=4),
]


@pytest.mark.parametrize("make", PURE)
def test_pure_weightings_pickle_and_continue_identically(
    make: Callable[[], PureWeighting[Any]],
) -> None:
    generator = torch.Generator().manual_seed(2)
    matrices = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    original = make()
    state = original.init(3, dtype=torch.float64)
    loaded = pickle.loads(pickle.dumps(original))
    loaded_state = pickle.loads(pickle.dumps(state))
    for matrix in matrices:
        expected, state = original.update(matrix @ matrix.T, state)
        weights, loaded_state = loaded.update(matrix @ matrix.T, loaded_state)
        assert torch.equal(weights, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prng_gives_valid_samples_in_every_dtype(dtype: torch.dtype) -> None:
    samples = uniform(key_from_seed(0), (100_000,), dtype)
    assert samples.dtype == dtype
    assert bool((samples > 0).all())
    assert bool((samples < 1).all())
    assert abs(samples.double().mean().item() - 0.5) < 1e-2
    gaussian = normal(key_from_seed(1), (100_000,), dtype)
    assert gaussian.dtype == dtype
    assert bool(gaussian.isfinite().all())
    assert abs(gaussian.double().mean().item()) < 2e-2
    assert abs(gaussian.double().std().item() - 1) < 2e-2
    orders = permutations(key_from_seed(2), 5, torch.device("cpu"))
    assert sorted(orders[0].tolist()) == [1, 2, 3, 4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_weighting_in_every_dtype_is_finite(name: str, m: int, dtype: torch.dtype) -> None:
    if name == "constant" and m != 3:
        pytest.skip("three constant weights")
    if name == "upgrad" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the solver's low-precision dtypes are covered by tests/test_qp.py")
    weighting = FACTORIES[name]()
    gramian = _gramians(1, m=m)[0].to(dtype)
    state = weighting.init(m, dtype=dtype)
    for _ in range(3):
        weights, state = weighting.update(gramian, state)
        assert weights.dtype == dtype
        assert weights.shape == (m,)
        assert bool(weights.isfinite().all()), (name, dtype, weights)
    if name == "random":
        assert bool((weights > 0).all())
        torch.testing.assert_close(
            weights.double().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-2, rtol=0
        )


def _leaves(state: Any) -> list[Tensor]:
    return [leaf for leaf in state if isinstance(leaf, Tensor)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nonfinite_gramian_gives_nan_weights_and_keeps_the_state(name: str, bad: float) -> None:
    weighting = FACTORIES[name]()
    gramians = _gramians(5)
    state = weighting.init(3, dtype=torch.float64)
    _, state = weighting.update(gramians[0], state)
    reference_state = state
    poisoned = gramians[1].clone()
    poisoned[0, 1] = poisoned[1, 0] = bad
    weights, skipped_state = weighting.update(poisoned, state)
    assert bool(weights.isnan().all())
    for kept, old in zip(_leaves(skipped_state), _leaves(state), strict=True):
        assert torch.equal(kept, old)
    # The skipped step is as if it never happened: the run continues as without it.
    for g in gramians[2:]:
        after_skip, skipped_state = weighting.update(g, skipped_state)
        expected, reference_state = weighting.update(g, reference_state)
        assert torch.equal(after_skip, expected)


def test_batched_gramians_with_one_bad_one() -> None:
    gramians = torch.stack(_gramians(3))
    gramians[1, 2, 2] = float("nan")
    for make in FACTORIES.values():
        weighting = make()
        state = weighting.init(3, dtype=torch.float64)
        weights, new_state = weighting.update(gramians, state)
        assert bool(weights[1].isnan().all())
        assert bool(weights[[0, 2]].isfinite().all())
        for kept, old in zip(_leaves(new_state), _leaves(state), strict=True):
            assert torch.equal(kept, old.expand_as(kept))


def test_one_inf_jacobian_does_not_poison_gradvac() -> None:
    matrices = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    clean, hit = GradVac(seed=4), GradVac(seed=4)
    expected = [clean(j) for j in matrices]
    bad = matrices[0].clone()
    bad[0, 0] = float("inf")
    assert bool(hit(bad).isnan().any())
    for j, reference in zip(matrices, expected, strict=True):
        assert torch.equal(hit(j), reference)


def test_pcgrad_on_a_nan_gramian_gives_nan() -> None:
    nan = torch.full((2, 2), float("nan"))
    assert bool(PCGradWeighting(seed=0)(nan).isnan().all())


def test_aggregate_keeps_the_state_on_a_nonfinite_jacobian() -> None:
    from tensordict import TensorDict

    weighting = gradvac(seed=0)
    state = weighting.init(2)
    jac = TensorDict({"p": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, batch_size=[2])
    update, weights, new_state = aggregate(jac, weighting, state)
    assert bool(weights.isnan().all())
    assert not bool(update["p"].isfinite().all())
    assert torch.equal(new_state.targets, state.targets)
    assert torch.equal(new_state.key, state.key)


def test_guarded_update_compiles_without_graph_break() -> None:
    weighting = gradvac(seed=0)
    compiled = torch.compile(weighting.update, fullgraph=True)
    state = weighting.init(3, dtype=torch.float64)
    gramian = _gramians(1)[0]
    bad = gramian.clone()
    bad[0, 0] = float("nan")
    weights, new_state = compiled(bad, state)
    assert bool(weights.isnan().all())
    assert torch.equal(new_state.targets, state.targets)
    expected, _ = weighting.update(gramian, state)
    assert torch.equal(compiled(gramian, state)[0], expected)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Random(seed=1.5), TypeError, "`seed` must be an int"),  # type: ignore[arg-type]
        (lambda: random_(seed=1.5), TypeError, "`seed` must be an int"),  # type: ignore[arg-type]
        (lambda: pcgrad(seed=True), TypeError, "`seed` must be an int"),
        (lambda: gradvac(seed=-1), ValueError, r"\[0, 2\*\*32\)"),
        (lambda: GradVac(seed=2**40), ValueError, r"\[0, 2\*\*32\)"),
        (lambda: Constant(torch.tensor(1.0)), ValueError, "non-empty vector"),
        (lambda: Constant([1.0, 2.0]), TypeError, "must be a Tensor"),  # type: ignore[arg-type]
        (lambda: Constant(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
        (lambda: UPGrad(torch.tensor([1.0, float("inf")])), ValueError, "finite"),
        (lambda: UPGrad(torch.tensor(1.0)), ValueError, "non-empty vector"),
    ],
)
def test_bad_arguments_get_clear_errors(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


def test_wrong_state_type_names_the_expected_state() -> None:
    gramian = _gramians(1)[0]
    with pytest.raises(TypeError, match="Expected a GradVacState"):
        gradvac().update(gramian, EmptyState())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected a RandomState"):
        pcgrad().update(gramian, EmptyState())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="EmptyState"):
        mean().update(gramian, random_().init(3))  # type: ignore[arg-type]
