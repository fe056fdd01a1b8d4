"""Reduced precision, non-finite and bad input in the core: Gramians, combine, optimizers, autojac."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchjd.aggregation as tj_aggregation
from tensordict import TensorDict

from tests.test_optim import CASES
from torchjd_func import combine, gramian, group_gramians, group_params, inner_products
from torchjd_func.aggregation import Mean, PCGrad, UPGrad
from torchjd_func.autojac import backward, jac, jac_to_grad, mtl_backward
from torchjd_func.optim import Optimizer, adam, sgd

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _large_jacobian(dtype: torch.dtype) -> TensorDict:
    """Finite in ``dtype`` (entries ≤ 300), but ``‖∇L_i‖² ≈ 9e6`` overflows float16."""
    generator = torch.Generator().manual_seed(0)
    values = {
        "a": 300 * torch.rand(3, 10, 5, generator=generator),
        "b": 300 * torch.rand(3, 40, generator=generator),
    }
    return TensorDict({k: v.to(dtype) for k, v in values.items()}, batch_size=[3])


def _as_float64(jac_td: TensorDict) -> torch.Tensor:
    return torch.cat([leaf.double().reshape(3, -1) for leaf in (jac_td["a"], jac_td["b"])], dim=1)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gramian_of_low_precision_jacobian_is_float32_and_finite(dtype: torch.dtype) -> None:
    jac_td = _large_jacobian(dtype)
    matrix = _as_float64(jac_td)
    result = gramian(jac_td)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), matrix @ matrix.T, rtol=1e-6, atol=0.0)
    per_group = group_gramians(jac_td, "per_tensor")
    for name in ("a", "b"):
        assert per_group[name].dtype == torch.float32
        rows = jac_td[name].double().reshape(3, -1)
        torch.testing.assert_close(per_group[name].double(), rows @ rows.T, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_inner_products_of_low_precision_jacobian_do_not_overflow(dtype: torch.dtype) -> None:
    jac_td = _large_jacobian(dtype)
    direction = TensorDict({"a": jac_td["a"][0], "b": jac_td["b"][0]})
    matrix = _as_float64(jac_td)
    result = inner_products(jac_td, direction)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), matrix @ matrix[0], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_combine_float32_weights_of_low_precision_jacobian(dtype: torch.dtype) -> None:
    # float32 weights are not exact in float16/bfloat16: the update must be the exact weighted
    # sum rounded once to the leaf's dtype, not a sum of rounded weights.
    generator = torch.Generator().manual_seed(0)
    leaf = (20000 * torch.rand(3, 50, generator=generator)).to(dtype)
    weights = torch.softmax(torch.randn(3, generator=generator), dim=0)
    result = combine(TensorDict({"p": leaf}, batch_size=[3]), weights)["p"]
    assert result.dtype == dtype
    expected = (weights.double() @ leaf.double()).to(dtype)
    torch.testing.assert_close(result, expected, rtol=0.0, atol=0.0)


def test_jac_to_grad_on_float16_params_matches_float64_torchjd() -> None:
    generator = torch.Generator().manual_seed(1)
    start = 20 * torch.randn(200, generator=generator)
    directions = 30 * torch.randn(3, 200, generator=generator)  # ‖g‖² ≈ 2e5 > 65504
    param = start.half().requires_grad_()
    backward(directions.half() @ param, inputs=[param])
    weights = jac_to_grad([param], UPGrad())
    assert weights is not None
    assert weights.isfinite().all()
    assert param.grad is not None
    assert param.grad.dtype == torch.float16
    # The Jacobian is `directions` rounded to float16; TorchJD aggregates it in float64.
    expected = tj_aggregation.UPGrad()(directions.half().double())
    torch.testing.assert_close(param.grad.double(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("ours", "theirs"), CASES)
def test_optimizers_keep_the_params_dtype(
    ours: Callable[[], Optimizer[Any]], theirs: Callable[[Any], torch.optim.Optimizer]
) -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, generator=generator)
    reference = start.clone().requires_grad_()
    torch_optimizer = theirs([reference])
    optimizer = ours()
    params = TensorDict({"w": start.clone()})
    state = optimizer.init(params)
    for _ in range(3):
        grad = torch.randn(5, generator=generator, dtype=torch.float64)
        params, state = optimizer.update(TensorDict({"w": grad}), state, params)
        # Autograd stores `.grad` in the parameter's dtype: torch.optim sees float32 gradients.
        reference.grad = grad.float()
        torch_optimizer.step()
    assert params["w"].dtype == torch.float32
    for buffer in state[1:]:
        assert buffer["w"].dtype == torch.float32
    torch.testing.assert_close(params["w"], reference.detach())


_PARAMS = TensorDict({"w": torch.ones(2)})
_SGD = sgd(0.1, momentum=0.9)
_ADAM = adam()
_W = torch.ones(3, requires_grad=True)

BAD_CALLS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("lr nan", lambda: sgd(lr=float("nan")), ValueError, "must be finite and non-negative"),
    ("lr inf", lambda: sgd(lr=float("inf")), ValueError, "must be finite and non-negative"),
    ("lr negative", lambda: adam(lr=-1.0), ValueError, "must be finite and non-negative"),
    ("lr string", lambda: sgd(lr="0.1"), TypeError, "must be a real number"),  # type: ignore[arg-type]
    ("eps nan", lambda: adam(eps=float("nan")), ValueError, "`eps` must be finite"),
    ("one beta", lambda: adam(betas=(0.9,)), ValueError, r"must be a pair"),  # type: ignore[arg-type]
    ("beta float", lambda: adam(betas=0.9), TypeError, r"must be a pair"),  # type: ignore[arg-type]
    ("beta 1", lambda: adam(betas=(0.9, 1.0)), ValueError, r"in \[0, 1\)"),
    (
        "adam state to sgd",
        lambda: _SGD.update(_PARAMS, _ADAM.init(_PARAMS), _PARAMS),  # type: ignore[arg-type]
        TypeError,
        "must be a SGDState, got AdamState",
    ),
    (
        "sgd state to adam",
        lambda: _ADAM.update(_PARAMS, _SGD.init(_PARAMS), _PARAMS),  # type: ignore[arg-type]
        TypeError,
        "must be a AdamState, got SGDState",
    ),
    (
        "state of other params",
        lambda: _SGD.update(_PARAMS, _SGD.init(TensorDict({"v": torch.ones(2)})), _PARAMS),
        ValueError,
        r"`state.momentum` does not have the keys of the params",
    ),
    (
        "state of other shapes",
        lambda: _ADAM.update(_PARAMS, _ADAM.init(TensorDict({"w": torch.ones(3)})), _PARAMS),
        ValueError,
        r"`state.mu\['w'\]` is \[3\]",
    ),
    (
        "state of other dtype",
        lambda: _SGD.update(_PARAMS, _SGD.init(_PARAMS.double()), _PARAMS),
        ValueError,
        "float64 on cpu, but the parameter is",
    ),
    (
        "grads as dict",
        lambda: _SGD.update({"w": torch.ones(2)}, _SGD.init(_PARAMS), _PARAMS),  # type: ignore[arg-type]
        TypeError,
        r"wrap a dict of tensors as `TensorDict\(grads\)`",
    ),
    ("empty params", lambda: _SGD.init(TensorDict({})), ValueError, "`params` is empty"),
    (
        "empty losses",
        lambda: backward((_W * 2)[:0]),
        ValueError,
        "have no element",
    ),
    ("empty outputs", lambda: jac((_W * 2)[:0], [_W]), ValueError, "have no element"),
    (
        "jac_tensors without rows",
        lambda: backward(_W * 2, jac_tensors=torch.zeros(0, 3)),
        ValueError,
        "`jac_tensors` has no row",
    ),
    (
        "batch-0 gramian",
        lambda: gramian(TensorDict({"p": torch.zeros(0, 3)}, batch_size=[0])),
        ValueError,
        "has no row",
    ),
    (
        "empty group",
        lambda: group_params(_PARAMS, {"a": ["w"], "b": []}),
        ValueError,
        "Group 'b' is empty",
    ),
    (
        "group given a string",
        lambda: group_params(_PARAMS, {"a": "w"}),
        TypeError,
        r"write \['w'\]",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_bad_input_is_named(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def test_mtl_backward_with_unconnected_features_blames_the_features() -> None:
    trunk, head = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    features = trunk(torch.randn(4, 3))
    other_features = trunk(torch.randn(4, 3))
    losses = [head(features).sum(), head(features).pow(2).mean()]
    with pytest.raises(ValueError, match=r"`losses\[0\]` is not computed from the `features`"):
        mtl_backward(losses, other_features)


@pytest.mark.parametrize("aggregator", [Mean(), PCGrad(), UPGrad()])
def test_overflowing_gramian_gives_non_finite_grad(aggregator: Any) -> None:
    # A finite float32 Jacobian whose Gramian (‖g‖² ≈ 1e42) overflows.
    param = torch.ones(4, requires_grad=True)
    backward(torch.stack([1e21 * param.sum(), -1e21 * param[0]]))
    weights = jac_to_grad([param], aggregator)
    assert param.grad is not None
    assert not param.grad.isfinite().all()
    assert weights is not None
    assert weights.isnan().all()


def _train(
    batches: list[torch.Tensor], aggregator_factory: Callable[[], Any], mtl: bool
) -> tuple[list[torch.Tensor], list[float]]:
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1), torch.nn.Linear(6, 1)])
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales = []
    for x in batches:
        optimizer.zero_grad()
        features = trunk(x)
        losses = torch.stack([heads[0](features).pow(2).mean(), heads[1](features).abs().mean()])
        scaled = scaler.scale(losses)
        if mtl:
            mtl_backward(list(scaled), features, aggregator_factory())
        else:
            backward(scaled)
            jac_to_grad(params, aggregator_factory())
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in params], scales


@pytest.mark.parametrize("aggregator_factory", [UPGrad, Mean])
@pytest.mark.parametrize("mtl", [False, True])
def test_grad_scaler_skips_a_non_finite_batch(aggregator_factory: Any, mtl: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 4, generator=generator) for _ in range(4)]
    poisoned = batches[2].clone()
    poisoned[3, 1] = float("inf")
    with_inf, scales = _train([*batches[:2], poisoned, *batches[2:]], aggregator_factory, mtl)
    without, _ = _train(batches, aggregator_factory, mtl)
    assert scales[2] == scales[1] / 2  # GradScaler saw the non-finite gradient: it skipped
    for got, expected in zip(with_inf, without, strict=True):
        torch.testing.assert_close(got, expected)
