"""PCD (Priority-Constrained Descent) against TorchJD 0.18, its KKT conditions, and its edge cases."""

import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from torchjd_func.aggregation import (
    PCD,
    PCDState,
    PCDWeighting,
    pcd,
    pcd_scales,
    pcd_weights,
)

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=_generator(seed), dtype=F64)


def _low_rank(m: int, n: int, rank: int, seed: int) -> Tensor:
    generator = _generator(seed)
    left = torch.randn(m, rank, generator=generator, dtype=F64)
    return left @ torch.randn(rank, n, generator=generator, dtype=F64)


def _conflicting(m: int, n: int, seed: int) -> Tensor:
    """Secondary gradients pulled against the primary one."""
    matrix = _random(m, n, seed)
    matrix[1:] -= 2.0 * matrix[0]
    return matrix


def _row_scaled(m: int, n: int, seed: int) -> Tensor:
    scales = 10.0 ** torch.randint(-3, 4, (m, 1), generator=_generator(seed + 100))
    return scales.to(F64) * _random(m, n, seed)


FAMILIES: dict[str, Callable[[int, int], Tensor]] = {
    "random": lambda m, seed: _random(m, 2 * m + 1, seed),
    "wide": lambda m, seed: _random(m, 50, seed),
    "low_rank": lambda m, seed: _low_rank(m, 2 * m, max(1, m // 3), seed),
    "more_losses_than_params": lambda m, seed: _random(m, max(1, m // 2), seed),
    "conflicting": lambda m, seed: _conflicting(m, 2 * m, seed),
    "row_scaled": lambda m, seed: _row_scaled(m, 2 * m, seed),
}
SIZES = [1, 2, 3, 5, 8, 16]


def _sequence(family: str, m: int, steps: int = 4) -> list[Tensor]:
    """A few Jacobians of one family (changing from step to step, as in training)."""
    return [FAMILIES[family](m, 10 * m + step) for step in range(steps)]


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    scale = float(expected.abs().max().clamp(min=1e-12))
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


# --- Against TorchJD, step by step, from fresh instances. -------------------------------------


@pytest.mark.parametrize("tau", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weights_match_torchjd_over_several_steps(family: str, m: int, tau: float) -> None:
    ours, theirs = PCDWeighting(tau=tau), torchjd_aggregation.PCDWeighting(tau=tau)
    for matrix in _sequence(family, m):
        gramian = matrix @ matrix.T
        expected = theirs(gramian)
        actual = ours(gramian)
        # The same iterations: the multipliers are TorchJD's even when they are not unique.
        _close(actual, expected)
        _close(actual @ matrix, expected @ matrix)
    torch.testing.assert_close(ours.state.sq_norm_ema, theirs._sq_norm_ema, rtol=1e-12, atol=0)
    assert int(ours.state.n_steps) == int(theirs._n_steps)


@pytest.mark.parametrize("family", ["random", "conflicting", "low_rank"])
def test_aggregator_matches_torchjd_over_several_steps(family: str) -> None:
    ours, theirs = PCD(tau=0.1, beta=0.9), torchjd_aggregation.PCD(tau=0.1, beta=0.9)
    for matrix in _sequence(family, 6, steps=6):
        _close(ours(matrix), theirs(matrix))


@pytest.mark.parametrize(("beta", "eps"), [(0.0, 1e-8), (0.5, 0.0), (0.999, 1.0)])
def test_beta_and_eps_match_torchjd(beta: float, eps: float) -> None:
    ours = PCDWeighting(tau=0.2, beta=beta, eps=eps)
    theirs = torchjd_aggregation.PCDWeighting(tau=0.2, beta=beta, eps=eps)
    for matrix in _sequence("row_scaled", 5, steps=5):
        gramian = matrix @ matrix.T
        _close(ours(gramian), theirs(gramian))


def test_tensor_tau_matches_torchjd() -> None:
    tau = torch.tensor([0.0, 0.5, 1.0, 0.1], dtype=F64)
    ours, theirs = PCD(tau=tau), torchjd_aggregation.PCD(tau=tau)
    for matrix in _sequence("conflicting", 5):
        _close(ours(matrix), theirs(matrix))


def test_infeasible_constraints_give_the_primary_gradient_as_torchjd() -> None:
    # g_3 = -g_2: both cannot receive positive progress, so the constraints are dropped.
    primary, secondary = _random(1, 6, 0), _random(1, 6, 1)
    matrix = torch.cat([primary, secondary, -secondary, _random(1, 6, 2)])
    gramian = matrix @ matrix.T
    expected = torchjd_aggregation.PCDWeighting()(gramian)
    actual = PCDWeighting()(gramian)
    torch.testing.assert_close(actual, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))
    torch.testing.assert_close(actual, expected)


def test_nearly_dependent_gradients_follow_torchjd_tolerance() -> None:
    # g_3 = -g_2 + δ, with ‖δ‖²/‖g‖² ≈ 1e-12, below the dependence tolerance (1e-9): TorchJD
    # treats it as infeasible; and with δ ≈ 1e-3 as feasible (with large multipliers).
    primary, secondary, noise = _random(1, 6, 0), _random(1, 6, 1), _random(1, 6, 2)
    for size in [1e-6, 1e-3]:
        matrix = torch.cat([primary, secondary, -secondary + size * noise])
        gramian = matrix @ matrix.T
        expected = torchjd_aggregation.PCDWeighting(tau=0.3)(gramian)
        _close(PCDWeighting(tau=0.3)(gramian), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_published_values_on_j_base(dtype: torch.dtype) -> None:
    matrix = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=dtype)
    aggregator, weighting = PCD(), PCDWeighting()
    for _ in range(2):  # the contract's call 2 gives the same values
        torch.testing.assert_close(
            aggregator(matrix),
            torch.tensor([-0.820033, 2.943429, 2.943429], dtype=dtype),
            rtol=0,
            atol=1e-4,
        )
        torch.testing.assert_close(
            weighting(matrix @ matrix.T),
            torch.tensor([1.848061, 1.095368], dtype=dtype),
            rtol=0,
            atol=1e-4,
        )


def test_float32_input_matches_torchjd() -> None:
    ours, theirs = PCDWeighting(tau=0.3), torchjd_aggregation.PCDWeighting(tau=0.3)
    for matrix in _sequence("conflicting", 5):
        gramian = (matrix @ matrix.T).float()
        expected = theirs(gramian)
        actual = ours(gramian)
        assert actual.dtype == torch.float32
        _close(actual, expected)


# --- Optimality. -------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.02, 0.5, 1.0])
@pytest.mark.parametrize("m", [2, 3, 6, 12, 24])
@pytest.mark.parametrize("family", ["random", "wide", "conflicting", "row_scaled"])
def test_kkt_conditions(family: str, m: int, tau: float) -> None:
    matrix = FAMILIES[family](m, m)
    gramian = matrix @ matrix.T
    weights = pcd_weights(gramian, torch.ones(m, dtype=F64), tau=tau)
    # With unit scales the weights are [1, μ] · ‖g_1‖ / ‖d‖.
    multipliers = weights / weights[0]
    direction = multipliers @ matrix
    torch.testing.assert_close(multipliers[0], torch.ones((), dtype=F64))
    scale = float(gramian.diagonal().max())
    # Stationarity holds by construction; dual feasibility, primal feasibility, complementarity.
    assert bool((multipliers[1:] >= 0).all())
    slacks = matrix[1:] @ direction - tau * gramian.diagonal()[1:]
    feasible = bool((slacks >= -1e-6 * scale).all())
    if feasible:
        assert float((multipliers[1:] * slacks).abs().max()) <= 1e-6 * scale * max(
            1.0, float(multipliers.abs().max())
        )
    else:
        # Only infeasible constraints give the primary gradient unchanged.
        torch.testing.assert_close(multipliers[1:], torch.zeros(m - 1, dtype=F64))


@pytest.mark.parametrize("m", [3, 6, 10])
def test_solution_is_the_projection(m: int) -> None:
    """Against a generic solver: the nearest feasible d to g_1, by projected gradient on the dual."""
    matrix = _conflicting(m, 3 * m, m)
    gramian = matrix @ matrix.T
    tau = 0.3
    weights = pcd_weights(gramian, torch.ones(m, dtype=F64), tau=tau)
    direction = (weights / weights[0]) @ matrix
    secondary = gramian[1:, 1:]
    b = tau * secondary.diagonal() - gramian[1:, 0]
    mu = torch.zeros(m - 1, dtype=F64)
    step = 1.0 / float(torch.linalg.eigvalsh(secondary)[-1])
    for _ in range(20000):
        mu = (mu - step * (secondary @ mu - b)).clamp(min=0)
    reference = matrix[0] + mu @ matrix[1:]
    torch.testing.assert_close(direction, reference, rtol=1e-6, atol=1e-6)


# --- Special cases. ----------------------------------------------------------------------------


def test_zero_primary_gradient_gives_zeros() -> None:
    matrix = _random(4, 6, 0)
    matrix[0] = 0.0
    weighting = PCDWeighting()
    weights = weighting(matrix @ matrix.T)
    torch.testing.assert_close(weights, torch.zeros(4, dtype=F64))
    assert int(weighting.state.n_steps) == 1  # the EMA still sees the step, as in TorchJD
    torch.testing.assert_close(weights, torchjd_aggregation.PCDWeighting()(matrix @ matrix.T))


def test_zero_gramian_and_zero_secondary_gradient() -> None:
    torch.testing.assert_close(PCDWeighting()(torch.zeros(3, 3)), torch.zeros(3))
    matrix = _random(3, 5, 0)
    matrix[2] = 0.0
    gramian = matrix @ matrix.T
    _close(PCDWeighting()(gramian), torchjd_aggregation.PCDWeighting()(gramian))


def test_one_loss_gives_weight_one() -> None:
    for value in [1e-20, 1.0, 1e20]:
        weights = PCDWeighting()(torch.tensor([[value]], dtype=F64))
        torch.testing.assert_close(weights, torch.ones(1, dtype=F64))
    torch.testing.assert_close(PCDWeighting()(torch.zeros(1, 1)), torch.zeros(1))


def test_no_loss_gives_an_empty_vector_and_keeps_the_state() -> None:
    weighting = PCDWeighting()
    weighting(torch.eye(2))
    state = weighting.state
    assert weighting(torch.zeros(0, 0)).shape == (0,)
    assert torchjd_aggregation.PCDWeighting()(torch.zeros(0, 0)).shape == (0,)
    assert weighting.state is state


def test_secondary_scale_does_not_matter() -> None:
    # The normalisation makes τ scale-free: a secondary row scaled by the same constant at every
    # call gives the same update (up to ε).
    matrices = _sequence("conflicting", 4)
    plain, scaled = PCD(eps=0.0), PCD(eps=0.0)
    factor = torch.tensor([[1.0], [1e3], [1e-3], [7.0]], dtype=F64)
    for matrix in matrices:
        torch.testing.assert_close(scaled(factor * matrix), plain(matrix), rtol=1e-9, atol=1e-9)


def test_the_update_has_the_norm_of_the_primary_gradient() -> None:
    for matrix in _sequence("conflicting", 5):
        update = PCD(tau=0.5)(matrix)
        torch.testing.assert_close(update.norm(), matrix[0].norm())


def test_the_state_resets_when_m_changes_as_in_torchjd() -> None:
    ours, theirs = PCDWeighting(), torchjd_aggregation.PCDWeighting()
    for m in [3, 3, 4, 4]:
        matrix = _random(m, 5, m)
        _close(ours(matrix @ matrix.T), theirs(matrix @ matrix.T))
    assert int(ours.state.n_steps) == 2


def test_weights_are_detached() -> None:
    matrix = _random(3, 4, 0).requires_grad_()
    gramian = matrix @ matrix.T
    assert not pcd_weights(gramian, torch.ones(3, dtype=F64)).requires_grad
    assert not PCD()(matrix).requires_grad


# --- Batches, loops, compile. ------------------------------------------------------------------


def _stack(m: int, count: int = 5) -> tuple[Tensor, Tensor]:
    matrices = [FAMILIES[f](m, i) for i, f in enumerate(["random", "conflicting", "low_rank"] * 2)]
    gramians = torch.stack([j @ j.T for j in matrices[:count]])
    scales = gramians.diagonal(dim1=-2, dim2=-1).rsqrt()
    return gramians, scales


@pytest.mark.parametrize("m", [2, 5, 12])
def test_batch_equals_a_loop_and_every_loop_form_agrees(m: int) -> None:
    gramians, scales = _stack(m)
    batched = pcd_weights(gramians, scales, tau=0.4)
    fixed = pcd_weights(gramians, scales, tau=0.4, early_exit=False)
    assert torch.equal(batched, fixed)
    for gramian, s, weights in zip(gramians, scales, batched, strict=True):
        torch.testing.assert_close(pcd_weights(gramian, s, tau=0.4), weights)
    vmapped = torch.vmap(lambda g, s: pcd_weights(g, s, tau=0.4))(gramians, scales)
    torch.testing.assert_close(vmapped, batched)


def test_batched_update_gives_a_batched_state() -> None:
    gramians, _ = _stack(4, 3)
    weighting = pcd()
    weights, state = weighting.update(gramians, weighting.init(4))
    assert weights.shape == (3, 4)
    assert state.sq_norm_ema.shape == (3, 4)
    assert state.n_steps.shape == ()
    for i, gramian in enumerate(gramians):
        expected, expected_state = weighting.update(gramian, weighting.init(4))
        torch.testing.assert_close(weights[i], expected)
        torch.testing.assert_close(state.sq_norm_ema[i], expected_state.sq_norm_ema)


def test_inductor_compile_matches_eager() -> None:
    torch._dynamo.reset()
    weighting = pcd(tau=0.3)
    compiled = torch.compile(weighting.update, fullgraph=True)
    state = weighting.init(6)
    eager_state = state
    for matrix in _sequence("conflicting", 6, steps=3):
        gramian = matrix @ matrix.T
        expected, eager_state = weighting.update(gramian, eager_state)
        actual, state = compiled(gramian, state)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.sq_norm_ema, eager_state.sq_norm_ema)
    torch._dynamo.reset()


def test_budget_and_its_validation() -> None:
    matrix = _conflicting(4, 6, 0)
    gramian = matrix @ matrix.T
    ones = torch.ones(4, dtype=F64)
    # With no iteration, the multipliers are zero: the (rescaled) primary gradient.
    torch.testing.assert_close(
        pcd_weights(gramian, ones, max_iters=0), torch.tensor([1.0, 0, 0, 0], dtype=F64)
    )
    torch.testing.assert_close(
        pcd_weights(gramian, ones, max_iters=1000), pcd_weights(gramian, ones)
    )
    for bad in [-1, 1.5, True]:
        with pytest.raises(ValueError, match="max_iters"):
            pcd_weights(gramian, ones, max_iters=bad)  # type: ignore[arg-type]


# --- Non-finite and low-precision input. -------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gramian_gives_nan_and_keeps_the_state(bad: float) -> None:
    matrices = _sequence("random", 3, steps=5)
    clean, hit = PCDWeighting(), PCDWeighting()
    expected = [clean(j @ j.T) for j in matrices]
    poisoned = matrices[0] @ matrices[0].T
    poisoned[0, 1] = poisoned[1, 0] = bad
    assert bool(hit(poisoned).isnan().all())
    assert hit.state is None or int(hit.state.n_steps) == 0
    theirs = torchjd_aggregation.PCDWeighting()
    assert bool(theirs(poisoned).isnan().all())
    for matrix, reference in zip(matrices, expected, strict=True):
        assert torch.equal(hit(matrix @ matrix.T), reference)


def test_one_bad_gramian_of_a_batch() -> None:
    gramians, scales = _stack(4, 3)
    gramians[1, 2, 2] = float("nan")
    bad_scales = scales.clone()
    bad_scales[2, 0] = -1.0
    weights = pcd_weights(gramians, bad_scales)
    assert bool(weights[1].isnan().all())
    assert bool(weights[2].isnan().all())
    assert bool(weights[0].isfinite().all())
    state = pcd().init(4)
    _, new_state = pcd().update(gramians, state)
    assert torch.equal(new_state.sq_norm_ema, state.sq_norm_ema.expand(3, 4))


def test_tau_tensor_out_of_range_gives_nan_in_the_kernel() -> None:
    gramian = torch.eye(3, dtype=F64)
    weights = pcd_weights(gramian, torch.ones(3, dtype=F64), tau=torch.tensor([0.5, 2.0]))
    assert bool(weights.isnan().all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(dtype: torch.dtype) -> None:
    weighting = pcd()
    state = weighting.init(3, dtype=dtype)
    matrix = _random(3, 5, 0)
    gramian = (matrix @ matrix.T).to(dtype)
    for _ in range(3):
        weights, state = weighting.update(gramian, state)
        assert weights.dtype == dtype
        assert bool(weights.isfinite().all())
    expected = torchjd_aggregation.PCDWeighting()(gramian)
    torch.testing.assert_close(weights.double(), expected.double(), rtol=0, atol=1e-2)


# --- Hyperparameters, errors, state. -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau": 1.5}, ValueError, "tau"),
        ({"tau": -0.1}, ValueError, "tau"),
        ({"tau": "0.1"}, TypeError, "tau"),
        ({"tau": True}, TypeError, "tau"),
        ({"tau": torch.tensor([[0.1]])}, ValueError, "1-D"),
        ({"tau": torch.tensor([0.1, 1.2])}, ValueError, r"\[0, 1\]"),
        ({"tau": torch.tensor([1])}, TypeError, "floating"),
        ({"beta": 1.0}, ValueError, "beta"),
        ({"beta": -0.5}, ValueError, "beta"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"eps": float("nan")}, ValueError, "eps"),
    ],
)
def test_bad_hyperparameters_are_refused(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    for make in (pcd, PCDWeighting, PCD):
        with pytest.raises(error, match=match):
            make(**kwargs)


def test_bad_inputs_get_clear_errors() -> None:
    gramian = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="one value per secondary objective"):
        PCD(tau=torch.tensor([0.1, 0.2, 0.3]))(torch.ones(3, 4))
    with pytest.raises(ValueError, match="scales"):
        pcd_weights(gramian, torch.ones(2))
    with pytest.raises(TypeError, match="scales"):
        pcd_weights(gramian, [1.0, 1.0, 1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        pcd_weights(torch.eye(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(TypeError, match="PCDState"):
        pcd().update(gramian, (torch.zeros(3), torch.tensor(0)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="re-initialise"):
        pcd().update(gramian, pcd().init(4))


def test_setters_take_effect_keep_the_state_and_validate_as_in_torchjd() -> None:
    matrices = _sequence("conflicting", 4, steps=6)
    ours, theirs = PCD(), torchjd_aggregation.PCD()
    for matrix in matrices[:3]:
        _close(ours(matrix), theirs(matrix))
    for name, value in [("tau", 0.4), ("beta", 0.5), ("eps", 1e-3)]:
        setattr(ours, name, value)
        setattr(theirs, name, value)
        assert getattr(ours.gramian_weighting, name) == value
    for matrix in matrices[3:]:
        _close(ours(matrix), theirs(matrix))
    assert int(ours.state.n_steps) == 6  # the EMA was kept
    with pytest.raises(ValueError, match="beta"):
        ours.beta = 1.0
    assert ours.beta == 0.5
    tau = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    ours.tau = tau
    assert ours.tau is tau
    assert repr(ours) == repr(theirs).replace("tau=0.4", f"tau={tau!r}")


def test_repr_and_str_as_in_torchjd() -> None:
    for ours, theirs in [
        (PCD(), torchjd_aggregation.PCD()),
        (PCDWeighting(0.5, 0.9, 0.0), torchjd_aggregation.PCDWeighting(0.5, 0.9, 0.0)),
    ]:
        assert repr(ours) == repr(theirs)
    assert str(PCD()) == str(torchjd_aggregation.PCD()) == "PCD"


def test_state_restored_by_assignment_continues_identically() -> None:
    matrices = _sequence("random", 4, steps=6)
    original = PCD(tau=0.3)
    for matrix in matrices[:3]:
        original(matrix)
    buffer = io.BytesIO()
    torch.save(original.state, buffer)
    buffer.seek(0)
    resumed = PCD(tau=0.3)
    resumed.state = torch.load(buffer, weights_only=False)
    for matrix in matrices[3:]:
        assert torch.equal(resumed(matrix), original(matrix))


def test_pickled_objects_continue_identically() -> None:
    matrices = _sequence("random", 3, steps=4)
    weighting, aggregator = PCDWeighting(tau=0.2), PCD(beta=0.5)
    pure = pcd(tau=torch.tensor([0.1, 0.2], dtype=F64))
    state = pure.init(3)
    for matrix in matrices[:2]:
        weighting(matrix @ matrix.T)
        aggregator(matrix)
        _, state = pure.update(matrix @ matrix.T, state)
    copies = pickle.loads(pickle.dumps((weighting, aggregator, pure)))
    for matrix in matrices[2:]:
        assert torch.equal(copies[0](matrix @ matrix.T), weighting(matrix @ matrix.T))
        assert torch.equal(copies[1](matrix), aggregator(matrix))
        assert torch.equal(
            copies[2].update(matrix @ matrix.T, state)[0], pure.update(matrix @ matrix.T, state)[0]
        )


def test_scales_follow_torchjd_debiasing() -> None:
    state = PCDState(torch.zeros(2, dtype=F64), torch.tensor(0))
    beta, eps = 0.9, 1e-3
    norms = [torch.tensor([4.0, 1.0], dtype=F64), torch.tensor([1.0, 9.0], dtype=F64)]
    ema = torch.zeros(2, dtype=F64)
    for t, squared in enumerate(norms, start=1):
        scales, state = pcd_scales(torch.diag(squared), state, beta=beta, eps=eps)
        ema = beta * ema + (1 - beta) * squared
        expected = 1 / (ema / (1 - beta**t) + eps).sqrt()
        torch.testing.assert_close(scales, expected, rtol=1e-14, atol=0)
        assert int(state.n_steps) == t


def test_dtype_conversions_keep_the_float64_ema_and_tau() -> None:
    # (TorchJD's `.half()` rounds its EMA buffer to float16; here the run goes on unchanged.)
    tau = torch.tensor([0.1, 0.2], dtype=F64)
    ours, reference = PCD(tau=tau), PCD(tau=tau)
    matrices = _sequence("conflicting", 3, steps=4)
    for matrix in matrices[:2]:
        assert torch.equal(ours(matrix), reference(matrix))
    ours.half()
    assert ours.state.sq_norm_ema.dtype == F64
    assert isinstance(ours.tau, Tensor)
    assert ours.tau.dtype == F64
    ours.to("cpu")
    for matrix in matrices[2:]:
        assert torch.equal(ours(matrix), reference(matrix))
    assert int(ours.state.n_steps) == 4
