"""The aggregation kinds besides Gramian weightings: JacobianAggregator (TrimmedMean as the
reference one), CrossWeighting and cross_gramian, and how the steps and aggregate take them."""

import pickle
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from tests.settings import DEVICE
from tests.utils import assert_close, dotted_leaves
from torchjd_func import (
    call,
    combine,
    group_params,
    params_of,
    value_and_jacobian,
    value_and_per_sample_jacobian,
)
from torchjd_func.aggregation import (
    CrossWeighting,
    EmptyState,
    JacobianAggregating,
    JacobianAggregator,
    TrimmedMean,
    aggregate,
    aggregate_groups,
    cross_gramian,
    guard_nonfinite_jacobian,
    init_group_states,
    mean,
    trimmed_mean,
    trimmed_mean_update,
    upgrad,
)
from torchjd_func.optim import sgd
from torchjd_func.step import gramian_step, jd_step, mtl_gramian_step, mtl_step, per_sample_step

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(DEVICE)


def losses_fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2).mean(dim=0)  # [5]


def sample_loss(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2).mean()


def _batch() -> tuple[Tensor, Tensor]:
    return torch.randn(8, 4, device=DEVICE), torch.randn(8, 5, device=DEVICE)


def _jac(m: int = 5, dtype: torch.dtype = torch.float64) -> TensorDict:
    return TensorDict(
        {
            "a": torch.randn(m, 3, 2, dtype=dtype, device=DEVICE),
            "b": {"c": torch.randn(m, 4, dtype=dtype, device=DEVICE)},
        },
        batch_size=[m],
    )


# --- TrimmedMean against TorchJD and its definition. ---------------------------------------------


@pytest.mark.parametrize(("m", "trim"), [(1, 0), (3, 1), (5, 2), (9, 3), (10, 2)])
def test_trimmed_mean_equals_torchjd(m: int, trim: int) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    matrix = torch.randn(m, 7, dtype=torch.float64)
    expected = torchjd_aggregation.TrimmedMean(trim_number=trim)(matrix)
    assert_close(TrimmedMean(trim_number=trim)(matrix), expected)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    jac = _jac(m=7)
    update = trimmed_mean_update(jac, trim_number=2)
    for key, value in dotted_leaves(jac).items():
        flat = value.reshape(7, -1)
        expected = torch.stack([column.sort().values[2:5].mean() for column in flat.T]).reshape(
            value.shape[1:]
        )
        assert_close(dotted_leaves(update)[key], expected)


def test_trimmed_mean_of_a_tensordict_is_that_of_the_concatenated_matrix() -> None:
    jac = _jac(m=5)
    matrix = torch.cat([v.reshape(5, -1) for v in dotted_leaves(jac).values()], dim=1)
    update = trimmed_mean(1).update(jac, trimmed_mean(1).init(jac[0], 5))[0]
    flat = torch.cat([v.reshape(-1) for v in dotted_leaves(update).values()])
    assert_close(flat, TrimmedMean(1)(matrix))


def test_trimmed_mean_bad_input() -> None:
    with pytest.raises(ValueError, match=r"at least 5 rows"):
        trimmed_mean_update(_jac(m=4), trim_number=2)
    with pytest.raises(ValueError, match="at least 3 rows"):
        TrimmedMean(1)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        trimmed_mean(-1)
    with pytest.raises(TypeError, match="int"):
        trimmed_mean(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TensorDict"):
        trimmed_mean_update(torch.randn(3, 2), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        trimmed_mean_update(_jac(m=3).reshape(3, 1), 1)
    with pytest.raises(TypeError, match="floating-point"):
        trimmed_mean_update(TensorDict({"a": torch.ones(3, 2, dtype=torch.long)}, [3]), 1)


def test_trimmed_mean_hyperparameter_is_validated_and_takes_effect() -> None:
    aggregator = TrimmedMean(trim_number=0)
    matrix = torch.tensor([[1.0], [2.0], [30.0]])
    assert_close(aggregator(matrix), torch.tensor([11.0]))
    aggregator.trim_number = 1
    assert aggregator.trim_number == 1
    assert_close(aggregator(matrix), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        aggregator.trim_number = -2
    assert aggregator.trim_number == 1
    assert (repr(aggregator), str(aggregator)) == ("TrimmedMean(trim_number=1)", "TM1")
    restored = pickle.loads(pickle.dumps(aggregator))
    assert_close(restored(matrix), torch.tensor([2.0]))


def test_nonfinite_jacobian_gives_a_nan_update() -> None:
    jac = _jac(m=3)
    jac["a"][1, 0, 0] = float("inf")
    update, weights, _ = trimmed_mean(1).update(jac, trimmed_mean(1).init(jac[0], 3))
    assert weights is None
    for value in dotted_leaves(update).values():
        assert value.isnan().all()


# --- A stateful Jacobian aggregator: state threading, guarding, class front door. --------------


class CountState(NamedTuple):
    calls: Tensor
    total: Tensor
    """The running sum of the Jacobian's first leaf, shaped like it (a params-shaped state)."""


class _CountInit:
    def __call__(self, params: TensorDictBase, m: int, /) -> CountState:
        first = next(iter(dotted_leaves(params).values()))
        return CountState(torch.zeros((), device=first.device), first.new_zeros((m, *first.shape)))


class _CountUpdate:
    def __call__(
        self, jacobian: TensorDictBase, state: CountState, /
    ) -> tuple[TensorDict, Tensor | None, CountState]:
        first = next(iter(dotted_leaves(jacobian).values()))
        m = jacobian.batch_size[0]
        weights = torch.ones(m, dtype=first.dtype, device=first.device) / (state.calls + 1.0)
        return combine(jacobian, weights), weights, CountState(state.calls + 1, state.total + first)


def counting() -> JacobianAggregator[CountState]:
    """A test aggregator: weights ``1 / (calls so far + 1)``, and a params-shaped running sum."""
    return JacobianAggregator(_CountInit(), guard_nonfinite_jacobian(_CountUpdate()))


def test_guard_keeps_the_state_on_a_nonfinite_jacobian() -> None:
    aggregator = counting()
    jac = _jac(m=3)
    state = aggregator.init(jac[0], 3)
    _, _, state = aggregator.update(jac, state)
    bad = jac.clone()
    bad["b", "c"][0, 0] = float("nan")
    update, weights, kept = aggregator.update(bad, state)
    assert weights is not None
    assert weights.isnan().all()
    assert all(v.isnan().all() for v in dotted_leaves(update).values())
    assert torch.equal(kept.calls, state.calls)
    assert torch.equal(kept.total, state.total)


def test_jacobian_aggregating_holds_checks_and_restores_its_state() -> None:
    matrix = torch.randn(3, 4)
    aggregator = JacobianAggregating(counting())
    first = aggregator(matrix)
    assert_close(first, matrix.sum(0))
    assert_close(aggregator(matrix), matrix.sum(0) / 2)
    saved = aggregator.state
    resumed = JacobianAggregating(counting())
    resumed.state = saved
    assert_close(resumed(matrix), aggregator(matrix))
    resumed.load_state_dict(aggregator.state_dict())
    assert_close(resumed(matrix), aggregator(matrix))
    wrong = JacobianAggregating(counting())
    wrong.state = saved
    with pytest.raises(ValueError, match=r"`total` is \[3, 4\]"):
        wrong(torch.randn(3, 5))
    with pytest.raises(TypeError, match="JacobianAggregator"):
        JacobianAggregating(upgrad())  # type: ignore[arg-type]


# --- The steps and aggregate take JacobianAggregators, or refuse them clearly. ------------------


def test_jd_step_with_a_jacobian_aggregator_applies_its_update() -> None:
    params = params_of(MODEL)
    x, y = _batch()
    aggregator = trimmed_mean(1)
    step = jd_step(losses_fn, aggregator, sgd(0.1))
    out = step(params, sgd(0.1).init(params), aggregator.init(params, 5), (x, y))
    assert "weights" not in out.metrics
    losses, jac, _ = value_and_jacobian(losses_fn, params, x, y)
    update = trimmed_mean_update(jac, 1)
    for key, value in dotted_leaves(params).items():
        assert_close(dotted_leaves(out.params)[key], value - 0.1 * dotted_leaves(update)[key])
    flat_jac = torch.cat([v.reshape(5, -1) for v in dotted_leaves(jac).values()], dim=1)
    flat_update = torch.cat([v.reshape(-1) for v in dotted_leaves(update).values()])
    assert_close(out.metrics["decrease"], flat_jac @ flat_update)
    assert_close(out.metrics["losses"], losses)


def test_per_sample_step_flattens_the_losses_for_a_jacobian_aggregator() -> None:
    params = params_of(MODEL)
    x, y = _batch()
    aggregator = counting()
    step = per_sample_step(sample_loss, aggregator, sgd(0.1))
    out = step(params, sgd(0.1).init(params), aggregator.init(params, 8), (x, y))
    _, jac, _ = value_and_per_sample_jacobian(sample_loss, params, x, y)
    assert_close(out.metrics["weights"], torch.ones(8))
    grads = combine(jac, torch.ones(8, device=DEVICE))
    for key, value in dotted_leaves(params).items():
        assert_close(dotted_leaves(out.params)[key], value - 0.1 * dotted_leaves(grads)[key])
    assert out.agg_state.calls == 1


def test_mtl_step_with_a_jacobian_aggregator() -> None:
    trunk = nn.Linear(4, 3).to(DEVICE)
    heads = nn.Linear(3, 3).to(DEVICE)

    def trunk_fn(p: TensorDict, x: Tensor) -> Tensor:
        return call(trunk, p, x)

    def heads_fn(p: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return (call(heads, p, features) - y).pow(2).mean(0)

    params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)})
    x, y = torch.randn(8, 4, device=DEVICE), torch.randn(8, 3, device=DEVICE)
    aggregator = trimmed_mean(1)
    step = mtl_step(trunk_fn, heads_fn, aggregator, sgd(0.1))
    out = step(params, sgd(0.1).init(params), aggregator.init(params["shared"], 3), ((x,), (y,)))
    ref_step = mtl_step(trunk_fn, heads_fn, JacobianAggregator(*_median_of_three()), sgd(0.1))
    ref = ref_step(params, sgd(0.1).init(params), (), ((x,), (y,)))
    for key, value in dotted_leaves(ref.params).items():
        assert_close(dotted_leaves(out.params)[key], value)


class _MedianInit:
    def __call__(self, params: TensorDictBase, m: int, /) -> tuple[()]:
        return ()


class _MedianUpdate:
    def __call__(
        self, jacobian: TensorDictBase, state: tuple[()], /
    ) -> tuple[TensorDict, Tensor | None, tuple[()]]:
        update = jacobian.apply(lambda v: v.median(dim=0).values, batch_size=[])
        assert isinstance(update, TensorDict)
        return update, None, state


def _median_of_three() -> tuple[_MedianInit, _MedianUpdate]:
    """The median of three rows: the trimmed mean with trim_number 1, computed independently."""
    return _MedianInit(), _MedianUpdate()


def test_compiled_jd_step_with_a_jacobian_aggregator_equals_eager() -> None:
    torch._dynamo.reset()
    params = params_of(MODEL)
    x, y = _batch()
    aggregator = counting()
    step = jd_step(losses_fn, aggregator, sgd(0.1))
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    state = aggregator.init(params, 5)
    expected = step(params, sgd(0.1).init(params), state, (x, y))
    actual = compiled(params, sgd(0.1).init(params), state, (x, y))
    actual = compiled(actual.params, actual.opt_state, actual.agg_state, (x, y))
    expected = step(expected.params, expected.opt_state, expected.agg_state, (x, y))
    assert counter.frame_count == 1
    for key, value in dotted_leaves(expected.params).items():
        assert_close(dotted_leaves(actual.params)[key], value)
    assert_close(actual.metrics["weights"], expected.metrics["weights"])
    torch._dynamo.reset()


def test_a_nonfinite_step_with_a_jacobian_aggregator_is_skipped() -> None:
    params = params_of(MODEL)
    x, y = _batch()
    y[0, 0] = float("nan")
    aggregator = counting()
    state = aggregator.init(params, 5)
    out = jd_step(losses_fn, aggregator, sgd(0.1))(params, sgd(0.1).init(params), state, (x, y))
    assert out.metrics["skipped"]
    assert torch.equal(out.agg_state.calls, state.calls)
    for key, value in dotted_leaves(params).items():
        assert torch.equal(dotted_leaves(out.params)[key], value)


def test_gramian_steps_refuse_jacobian_aggregators_and_every_step_cross_weightings() -> None:
    with pytest.raises(TypeError, match="use `per_sample_step`"):
        gramian_step(MODEL, lambda out, y: (out - y) ** 2, trimmed_mean(1), sgd(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use `mtl_step`"):
        mtl_gramian_step(MODEL, lambda p, f, y: f.sum(0), trimmed_mean(1), sgd(0.1))  # type: ignore[arg-type]
    cross = CrossWeighting(*mean())
    builds: list[Callable[[], object]] = [
        lambda: jd_step(losses_fn, cross, sgd(0.1)),  # type: ignore[arg-type]
        lambda: per_sample_step(sample_loss, cross, sgd(0.1)),  # type: ignore[arg-type]
        lambda: gramian_step(MODEL, lambda o, y: o, cross, sgd(0.1)),  # type: ignore[arg-type]
    ]
    for build in builds:
        with pytest.raises(TypeError, match="cross_gramian"):
            build()
    with pytest.raises(TypeError, match="cross_gramian"):
        aggregate(_jac(), cross, ())  # type: ignore[call-overload]


def test_aggregate_and_aggregate_groups_with_a_jacobian_aggregator() -> None:
    jac = _jac(m=5).reshape(5)
    update, weights, _ = aggregate(jac, trimmed_mean(2), EmptyState())
    assert weights is None
    expected = trimmed_mean_update(jac, 2)
    for key, value in dotted_leaves(expected).items():
        assert_close(dotted_leaves(update)[key], value)
    # Losses of shape [5, 2] are flattened to 10 rows.
    big = _jac(m=10).reshape(5, 2)
    update, _, _ = aggregate(big, trimmed_mean(3), EmptyState())
    for key, value in dotted_leaves(trimmed_mean_update(big.reshape(-1), 3)).items():
        assert_close(dotted_leaves(update)[key], value)

    params = jac[0]
    groups = group_params(params, "per_tensor")
    weightings: dict[str, Any] = {"a": trimmed_mean(1), "b.c": upgrad()}
    with pytest.raises(ValueError, match="params="):
        init_group_states(groups, weightings, m=5, dtype=torch.float64)
    states = init_group_states(groups, weightings, m=5, dtype=torch.float64, params=params)
    result = aggregate_groups(jac, groups, weightings, states)
    assert set(result.weights.keys()) == {"b.c"}
    assert_close(result.update["a"], trimmed_mean_update(jac.select("a"), 1)["a"])
    alone = aggregate(jac.select(("b", "c")), upgrad(), EmptyState())
    assert_close(result.update["b", "c"], alone.update["b", "c"])


# --- cross_gramian. -----------------------------------------------------------------------------


def test_cross_gramian_equals_the_product_of_the_flattened_jacobians() -> None:
    jac_1, jac_2 = _jac(m=4), _jac(m=4)
    flat_1 = torch.cat([v.reshape(4, -1) for v in dotted_leaves(jac_1).values()], dim=1)
    flat_2 = torch.cat([v.reshape(4, -1) for v in dotted_leaves(jac_2).values()], dim=1)
    assert_close(cross_gramian(jac_1, jac_2), flat_1 @ flat_2.T)
    assert_close(cross_gramian(jac_1, jac_1), flat_1 @ flat_1.T)
    square = cross_gramian(jac_1.reshape(2, 2), jac_2.reshape(2, 2))
    assert_close(square, flat_1 @ flat_2.T)
    half = cross_gramian(_jac(m=3, dtype=torch.float16), _jac(m=3, dtype=torch.float16))
    assert half.dtype == torch.float32


def test_cross_gramian_bad_input() -> None:
    with pytest.raises(ValueError, match="same losses"):
        cross_gramian(_jac(m=3), _jac(m=4))
    with pytest.raises(ValueError, match="different parameters"):
        cross_gramian(_jac(m=3), _jac(m=3).exclude("a"))
    with pytest.raises(TypeError, match="TensorDict"):
        cross_gramian(torch.ones(2, 2), _jac(m=2))  # type: ignore[arg-type]


def test_jac_to_grad_with_a_jacobian_aggregator_class() -> None:
    from torchjd_func.autojac import backward, jac_to_grad

    first = nn.Parameter(torch.randn(4, dtype=torch.float64))
    second = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    losses = torch.stack([(first * i).sum() + (second**i).sum() for i in range(1, 4)])
    backward(losses)
    jacs: list[Tensor] = [getattr(first, "jac"), getattr(second, "jac")]  # noqa: B009
    matrix = torch.cat([jac.reshape(3, -1) for jac in jacs], dim=1)
    expected = matrix.median(dim=0).values  # the trimmed mean of three rows
    jac_to_grad([first, second], TrimmedMean(1))
    assert first.grad is not None
    assert second.grad is not None
    assert_close(torch.cat([first.grad.reshape(-1), second.grad.reshape(-1)]), expected)
