"""Steps: many compiled steps in one process, skipping a non-finite step, build-time errors."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.utils._pytree as pytree
from tensordict import TensorDict
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from torchjd_func import call, params_of
from torchjd_func.aggregation import (
    PureWeighting,
    dualproj,
    gradvac,
    mean,
    pcgrad,
    random_,
    upgrad,
)
from torchjd_func.optim import Optimizer, adam, sgd
from torchjd_func.step import (
    StepFn,
    gramian_step,
    jd_step,
    mtl_gramian_step,
    mtl_step,
    per_sample_step,
)

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
TRUNK = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
HEADS = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
B = 4


def losses_fn(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2).mean(0)  # [2]


def sample_loss(params: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    return (call(MODEL, params, x) - y).pow(2).mean()  # [] per sample


def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
    return call(TRUNK, params, x)


def heads_fn(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
    return torch.stack(
        [
            (call(HEADS[k], params[k], features)[:, 0] - y[:, i]).pow(2).mean()
            for i, k in enumerate(HEADS)
        ]
    )


def outputs_loss(outputs: Tensor, y: Tensor) -> Tensor:
    return (outputs - y).pow(2).mean(1)  # [B]


def _mtl_params() -> TensorDict:
    return TensorDict({"shared": params_of(TRUNK), "heads": params_of(HEADS)}, batch_size=[])


# name -> (build(weighting, optimizer, **kw), params, batch(x, y), number of losses)
BUILDERS: dict[
    str, tuple[Callable[..., StepFn[Any, Any]], Callable[[], TensorDict], Callable[..., Any], int]
]
BUILDERS = {
    "jd_step": (
        lambda w, o, **kw: jd_step(losses_fn, w, o, **kw),
        lambda: params_of(MODEL),
        lambda x, y: (x, y),
        2,
    ),
    "per_sample_step": (
        lambda w, o, **kw: per_sample_step(sample_loss, w, o, **kw),
        lambda: params_of(MODEL),
        lambda x, y: (x, y),
        B,
    ),
    "mtl_step": (
        lambda w, o, **kw: mtl_step(trunk_fn, heads_fn, w, o, **kw),
        _mtl_params,
        lambda x, y: ((x,), (y,)),
        2,
    ),
    "gramian_step": (
        lambda w, o, **kw: gramian_step(MODEL, outputs_loss, w, o, **kw),
        lambda: params_of(MODEL),
        lambda x, y: ((x,), (y,)),
        B,
    ),
    "mtl_gramian_step": (
        lambda w, o, **kw: mtl_gramian_step(TRUNK, heads_fn, w, o, **kw),
        _mtl_params,
        lambda x, y: ((x,), (y,)),
        2,
    ),
}

X, Y = torch.randn(B, 3), torch.randn(B, 2)
X2, Y2 = torch.randn(B, 3), torch.randn(B, 2)


def _sweep_configs(n: int) -> list[tuple[PureWeighting[Any], Optimizer[Any]]]:
    weightings: list[Callable[[], PureWeighting[Any]]] = [upgrad, mean, dualproj, pcgrad, gradvac]
    return [
        (
            weightings[i % len(weightings)](),
            sgd(0.01 * (i + 1), momentum=0.1 * (i % 9)) if i % 2 == 0 else adam(1e-3 * (i + 1)),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("name", "n"), [(name, 20 if name == "jd_step" else 10) for name in BUILDERS]
)
def test_sweep_of_compiled_steps(name: str, n: int) -> None:
    """More compiled steps than dynamo's recompile limit (8) in one process: each step compiles
    once (its own graph) and runs; with a shared code object the 9th failed."""
    build, make_params, make_batch, n_losses = BUILDERS[name]
    torch._dynamo.reset()
    for weighting, optimizer in _sweep_configs(n):
        counter = CompileCounter()
        step = torch.compile(build(weighting, optimizer), backend=counter, fullgraph=True)
        params = make_params()
        opt_state, agg_state = optimizer.init(params), weighting.init(n_losses)
        for x, y in ((X, Y), (X2, Y2)):
            params, opt_state, agg_state, _ = step(params, opt_state, agg_state, make_batch(x, y))
        assert counter.frame_count == 1
        assert all(torch.isfinite(v).all() for v in _tensors(params))


def _tensors(td: TensorDict) -> list[Tensor]:
    return [v for v in td.values(True, True) if isinstance(v, Tensor)]


def _leaves(tree: Any) -> list[Tensor]:
    leaves = pytree.tree_leaves(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    for td in (leaf for leaf in leaves if isinstance(leaf, TensorDict)):
        tensors.extend(_tensors(td))
    return tensors


def _assert_identical(a: Any, b: Any) -> None:
    la, lb = _leaves(a), _leaves(b)
    for u, v in zip(la, lb, strict=True):
        assert u.dtype == v.dtype
        assert u.shape == v.shape
        assert torch.equal(u, v), (u, v)


WEIGHTINGS: dict[str, Callable[[], PureWeighting[Any]]] = {
    "upgrad": upgrad,
    "gradvac": gradvac,
    "pcgrad": pcgrad,
    "random": random_,
}
OPTIMIZERS: dict[str, Callable[[], Optimizer[Any]]] = {
    "sgd_momentum": lambda: sgd(0.05, momentum=0.9),
    "adam": lambda: adam(1e-2),
}


def _bad(x: Tensor, value: float) -> Tensor:
    x = x.clone()
    x[1, 1] = value
    return x


# Every combination eagerly; two of them compiled (compiling is what takes the time).
SKIP_CASES = [(o, w, False) for o in OPTIMIZERS for w in WEIGHTINGS] + [
    ("sgd_momentum", "upgrad", True),
    ("adam", "gradvac", True),
]


@pytest.mark.parametrize(("oname", "wname", "compiled"), SKIP_CASES)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_nonfinite_batch_is_skipped(name: str, oname: str, wname: str, compiled: bool) -> None:
    """A NaN or Inf in the batch leaves params, optimizer state (step counters included) and
    weighting state bit-identical, says ``skipped``; good, bad, good equals good, good."""
    build, make_params, make_batch, n_losses = BUILDERS[name]
    weighting, optimizer = WEIGHTINGS[wname](), OPTIMIZERS[oname]()
    step = build(weighting, optimizer)
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend="eager")
    params0 = make_params()
    state0 = (optimizer.init(params0), weighting.init(n_losses))

    def run(batches: list[tuple[Tensor, Tensor]]) -> tuple[Any, list[bool]]:
        params, (opt_state, agg_state), skipped = params0, state0, []
        for x, y in batches:
            out = step(params, opt_state, agg_state, make_batch(x, y))
            assert out.metrics["skipped"].shape == ()
            assert out.metrics["skipped"].dtype == torch.bool
            if bool(out.metrics["skipped"]):
                _assert_identical(
                    (out.params, out.opt_state, out.agg_state), (params, opt_state, agg_state)
                )
            params, opt_state, agg_state = out.params, out.opt_state, out.agg_state
            skipped.append(bool(out.metrics["skipped"]))
        return (params, opt_state, agg_state), skipped

    reference, skipped = run([(X, Y), (X2, Y2)])
    assert skipped == [False, False]
    for bad in (_bad(X2, float("nan")), _bad(X2, float("inf"))):
        result, skipped = run([(X, Y), (bad, Y2), (X2, Y2)])
        assert skipped == [False, True, False]
        _assert_identical(result, reference)
    result, skipped = run([(X, Y), (X2, _bad(Y2, float("nan"))), (X2, Y2)])
    assert skipped == [False, True, False]
    _assert_identical(result, reference)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_skip_nonfinite_off_propagates_nan(name: str) -> None:
    build, make_params, make_batch, n_losses = BUILDERS[name]
    weighting, optimizer = upgrad(), sgd(0.1)
    step = build(weighting, optimizer, skip_nonfinite=False)
    params = make_params()
    out = step(
        params,
        optimizer.init(params),
        weighting.init(n_losses),
        make_batch(_bad(X, float("nan")), Y),
    )
    assert not bool(out.metrics["skipped"])
    assert any(not torch.isfinite(v).all() for v in _tensors(out.params))


BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"weighting": "upgrad"}, TypeError, "`weighting` must be a PureWeighting"),
    ({"weighting": upgrad}, TypeError, "`weighting` must be a PureWeighting"),
    ({"optimizer": torch.optim.SGD}, TypeError, "`optimizer` must be a functional Optimizer"),
    ({"skip_nonfinite": 1}, TypeError, "`skip_nonfinite` must be a bool"),
    ({"skip_nonfinite": None}, TypeError, "`skip_nonfinite` must be a bool"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_OPTIONS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_bad_options_fail_at_build(
    name: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    build = BUILDERS[name][0]
    options: dict[str, Any] = {"weighting": upgrad(), "optimizer": sgd(0.1)}
    options |= kwargs
    w, o = options.pop("weighting"), options.pop("optimizer")
    with pytest.raises(error, match=message):
        build(w, o, **options)


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
@pytest.mark.parametrize("name", ["jd_step", "per_sample_step", "mtl_step"])
def test_bad_chunk_size_fails_at_build(name: str, chunk_size: object) -> None:
    with pytest.raises(ValueError, match="`chunk_size` must be None"):
        BUILDERS[name][0](upgrad(), sgd(0.1), chunk_size=chunk_size)


@pytest.mark.parametrize("in_dims", [True, "0", 0.0, (0, "x"), (0, True)])
def test_bad_in_dims_fails_at_build(in_dims: object) -> None:
    with pytest.raises(TypeError, match="`in_dims` must be an int"):
        per_sample_step(sample_loss, upgrad(), sgd(0.1), in_dims=in_dims)  # type: ignore[arg-type]


def test_bad_functions_and_modules_fail_at_build() -> None:
    with pytest.raises(TypeError, match="`losses_fn` must be a function"):
        jd_step("f", upgrad(), sgd(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`sample_losses_fn` must be a function"):
        per_sample_step(None, upgrad(), sgd(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`heads_fn` must be a function"):
        mtl_step(trunk_fn, [], upgrad(), sgd(0.1))
    with pytest.raises(TypeError, match=r"`trunk` must be a torch\.nn\.Module"):
        mtl_gramian_step(trunk_fn, heads_fn, upgrad(), sgd(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module"):
        gramian_step(losses_fn, outputs_loss, upgrad(), sgd(0.1))  # type: ignore[arg-type]


MTL_KEYS_MESSAGE = 'An MTL step takes `params = TensorDict({"shared": ..., "heads": ...})`'


def _chain(error: BaseException) -> str:
    texts = []
    current: BaseException | None = error
    while current is not None:
        texts.append(str(current))
        current = current.__cause__
    return "\n".join(texts)


def test_bad_mtl_params_under_compile() -> None:
    """Bad ``params`` keys depend on the step's input, so they are checked while tracing: the
    compiled step raises dynamo's ``Unsupported`` carrying our message; eagerly (or with the
    ``force_eager`` stance) the plain ValueError."""
    weighting, optimizer = upgrad(), sgd(0.1)
    step = mtl_step(trunk_fn, heads_fn, weighting, optimizer)
    bad = TensorDict({"trunk": params_of(TRUNK), "heads": params_of(HEADS)}, batch_size=[])
    args = (bad, optimizer.init(bad), weighting.init(2), ((X,), (Y,)))
    with pytest.raises(ValueError, match="An MTL step takes"):
        step(*args)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported) as info:
        compiled(*args)
    assert MTL_KEYS_MESSAGE in _chain(info.value)
    with torch.compiler.set_stance("force_eager"), pytest.raises(ValueError, match="An MTL step"):
        compiled(*args)
