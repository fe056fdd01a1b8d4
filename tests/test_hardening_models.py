"""Models that used to give silent wrong results or obscure errors: modules registered under two
names, parameters read by a parent module, recurrent layers under vmap, float16 closed-form
Gramians, and the Gramian steps' build-time checks. References: float64 autograd on the same
model (``torch.autograd.grad`` on an ``nn.Module`` handles aliasing), never the library itself."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from tests.utils import assert_close, dotted_leaves
from torchjd_func import (
    accumulate_grads,
    call,
    jacobian,
    mtl_jacobian,
    params_of,
    per_sample_jacobian,
)
from torchjd_func._probes import value_and_mtl_gramian, value_and_per_sample_gramian
from torchjd_func.aggregation import mean, upgrad
from torchjd_func.autogram import Engine
from torchjd_func.optim import sgd
from torchjd_func.step import gramian_step, jd_step, mtl_gramian_step, per_sample_step

F64 = torch.float64
BATCH = 5


class SelfAlias(nn.Module):
    """``self.b = self.a``: one Linear under two names, called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _sequential_alias() -> nn.Module:
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin)


def _module_list_alias() -> nn.Module:
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    return nn.Sequential(*nn.ModuleList([block] * 3))


ALIASED: dict[str, Callable[[], nn.Module]] = {
    "self_alias": SelfAlias,
    "sequential": _sequential_alias,
    "module_list": _module_list_alias,
}


def _snapshot(model: nn.Module) -> list[tuple[str, nn.Parameter, Tensor]]:
    return [
        (name, param, param.detach().clone())
        for name, param in model.named_parameters(remove_duplicate=False)
    ]


def _assert_intact(model: nn.Module, snapshot: list[tuple[str, nn.Parameter, Tensor]]) -> None:
    now = dict(model.named_parameters(remove_duplicate=False))
    for name, param, value in snapshot:
        assert now[name] is param, f"{name} was replaced by a {type(now[name]).__name__}"
        assert isinstance(now[name], nn.Parameter)
        assert torch.equal(param.detach(), value)


def _per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Float64 autograd reference: one ``torch.autograd.grad`` per sample, first names."""
    named = dict(model.named_parameters())
    rows = [
        torch.autograd.grad(
            (model(x[b : b + 1]).squeeze(0) - y[b]).pow(2).sum(), list(named.values())
        )
        for b in range(x.shape[0])
    ]
    return {name: torch.stack([row[i] for row in rows]) for i, name in enumerate(named)}


@pytest.mark.parametrize("name", list(ALIASED))
def test_aliased_module_is_intact_after_every_functional_call(name: str) -> None:
    model = ALIASED[name]().to(F64)
    snapshot = _snapshot(model)
    params = params_of(model)
    x, y = torch.randn(BATCH, 4, dtype=F64), torch.randn(BATCH, 4, dtype=F64)

    def sample_loss(p: TensorDict, xb: Tensor, yb: Tensor) -> Tensor:
        return (call(model, p, xb) - yb).pow(2).sum()

    def losses(p: TensorDict) -> Tensor:
        return (call(model, p, x) - y).pow(2).sum(dim=1)

    zeros = params.apply(torch.zeros_like)
    assert zeros is not None
    call(model, zeros, x)
    _assert_intact(model, snapshot)
    jac = jacobian(losses, params)
    _assert_intact(model, snapshot)
    per_sample = per_sample_jacobian(sample_loss, params, x, y)
    _assert_intact(model, snapshot)
    mtl_jacobian(
        lambda p, inputs: call(model, p, inputs),
        lambda _, f: f.pow(2).mean(dim=0),
        params,
        TensorDict(),
        (x,),
    )
    _assert_intact(model, snapshot)
    value_and_per_sample_gramian(model, params, (x,), lambda o, t: (o - t).pow(2).sum(1), (y,))
    _assert_intact(model, snapshot)

    expected = _per_sample_grads(model, x, y)
    for key, grad in expected.items():
        assert_close(dotted_leaves(jac)[key], grad)
        assert_close(dotted_leaves(per_sample)[key], grad)

    engine = Engine(model, batch_dim=0)
    output = (model(x) - y).pow(2).sum(dim=1)
    gramian = engine.compute_gramian(output)
    _assert_intact(model, snapshot)
    flat = torch.cat([g.reshape(BATCH, -1) for g in expected.values()], dim=1)
    assert_close(gramian, flat @ flat.T)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(ALIASED))
def test_aliased_module_trains_as_autograd(name: str, compiled: bool) -> None:
    """per_sample_step and jd_step with the mean weighting and SGD take the step of autograd on
    the mean loss; compiled with fullgraph=True too; and the model stays intact."""
    model = ALIASED[name]().to(F64)
    snapshot = _snapshot(model)
    x, y = torch.randn(BATCH, 4, dtype=F64), torch.randn(BATCH, 4, dtype=F64)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad((model(x) - y).pow(2).sum(dim=1).mean(), list(named.values()))
    expected = {n: p.detach() - 0.1 * g for (n, p), g in zip(named.items(), grads, strict=True)}

    def sample_loss(p: TensorDict, xb: Tensor, yb: Tensor) -> Tensor:
        return (call(model, p, xb) - yb).pow(2).sum()

    def losses_fn(p: TensorDict, xb: Tensor, yb: Tensor) -> Tensor:
        return (call(model, p, xb) - yb).pow(2).sum(dim=1)

    weighting, optimizer = mean(), sgd(0.1)
    for step in (
        per_sample_step(sample_loss, weighting, optimizer),
        jd_step(losses_fn, weighting, optimizer),
    ):
        run = torch.compile(step, fullgraph=True) if compiled else step
        params = params_of(model)
        out = run(params, optimizer.init(params), weighting.init(BATCH), (x, y))
        for key, value in expected.items():
            assert_close(dotted_leaves(out.params)[key], value)
        _assert_intact(model, snapshot)


def test_aliased_module_trains_with_torch_optim() -> None:
    """The README's route: a functional update, `accumulate_grads`, then `torch.optim`."""
    model = _sequential_alias().to(F64)
    reference = _sequential_alias().to(F64)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(BATCH, 4, dtype=F64), torch.randn(BATCH, 4, dtype=F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        jac = jacobian(lambda p: (call(model, p, x) - y).pow(2).sum(dim=1), params_of(model))
        update = jac.apply(lambda leaf: leaf.mean(0), batch_size=[])
        assert update is not None
        optimizer.zero_grad()
        accumulate_grads(model, update)
        optimizer.step()
        reference_optimizer.zero_grad()
        (reference(x) - y).pow(2).sum(dim=1).mean().backward()
        reference_optimizer.step()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert isinstance(param, nn.Parameter), name
        assert_close(param.detach(), ref.detach())


class ReadsChildWeight(nn.Module):
    """A parent module applying its child's parameters itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.a(x)), self.fc.weight, self.fc.bias)


class TiedByHand(nn.Module):
    """GPT-2-style weight tying: the output projection is the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.proj(self.emb(ids))), self.emb.weight).mean(dim=1)


OUTSIDE = r"\['fc\.weight', 'fc\.bias'\] are used outside the forward of the layer"


@pytest.mark.parametrize(
    ("build", "inputs", "match"),
    [
        (ReadsChildWeight, lambda: torch.randn(BATCH, 4, dtype=F64), OUTSIDE),
        (
            TiedByHand,
            lambda: torch.randint(0, 7, (BATCH, 3)),
            r"\['emb\.weight'\] are used outside",
        ),
    ],
    ids=["parent_reads_child", "tied_by_hand"],
)
def test_parameter_used_outside_its_layer_is_a_value_error(
    build: Callable[[], nn.Module], inputs: Callable[[], Tensor], match: str
) -> None:
    model = build().to(F64)
    x = inputs()

    def iwrm(outputs: Tensor) -> Tensor:
        return outputs.pow(2).sum(dim=1)

    with pytest.raises(ValueError, match=match):
        value_and_per_sample_gramian(model, params_of(model), (x,), iwrm)
    with pytest.raises(ValueError, match=match):
        value_and_mtl_gramian(
            model, params_of(model), (x,), lambda _, f: f.pow(2).mean(dim=0), TensorDict()
        )
    weighting, optimizer = upgrad(), sgd(0.1)
    step = gramian_step(model, lambda outputs: iwrm(outputs), weighting, optimizer)
    params = params_of(model)
    with pytest.raises(ValueError, match=match):
        step(params, optimizer.init(params), weighting.init(BATCH), ((x,), ()))
    assert all(not m._forward_hooks for m in model.modules())
    compiled = torch.compile(step, fullgraph=True)
    with pytest.raises(Exception, match="used outside the forward of the layer"):
        compiled(params, optimizer.init(params), weighting.init(BATCH), ((x,), ()))


def test_supported_model_still_matches_autograd() -> None:
    """The outside-use check leaves the closed forms of a supported model exact."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x = torch.randn(BATCH, 4, dtype=F64)
    out = value_and_per_sample_gramian(model, params_of(model), (x,), lambda o: o.pow(2).sum(1))
    named = dict(model.named_parameters())
    rows = [
        torch.cat(
            [
                g.flatten()
                for g in torch.autograd.grad(model(x[b : b + 1]).pow(2).sum(), list(named.values()))
            ]
        )
        for b in range(BATCH)
    ]
    flat = torch.stack(rows)
    assert_close(out.gramian, flat @ flat.T)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recurrent_layers_per_sample(kind: Callable[..., nn.Module], dtype: torch.dtype) -> None:
    """Per-sample Jacobians of RNNs: exact where vmap has a rule (LSTM in float32 on the CPU);
    elsewhere a clear error naming the whole-batch route, never a raw broadcast error."""
    rnn = kind(3, 5, batch_first=True).to(dtype)
    x = torch.randn(4, 6, 3, dtype=dtype)

    def sample_loss(p: TensorDict, xb: Tensor) -> Tensor:
        return call(rnn, p, xb.unsqueeze(0))[0].pow(2).sum()

    if kind is not nn.LSTM or dtype == F64:
        with pytest.raises(RuntimeError, match=r"torch\.vmap failed.*`jacobian` or `jd_step`"):
            per_sample_jacobian(sample_loss, params_of(rnn), x)
        return
    jac = per_sample_jacobian(sample_loss, params_of(rnn), x)
    named = dict(rnn.named_parameters())
    for b in range(x.shape[0]):
        grads = torch.autograd.grad(rnn(x[b : b + 1])[0].pow(2).sum(), list(named.values()))
        for name, grad in zip(named, grads, strict=True):
            torch.testing.assert_close(dotted_leaves(jac)[name][b], grad)


def test_recurrent_layer_in_gramian_step_gets_recurrent_advice() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4, batch_first=True))
    model[1].requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=r"is a recurrent layer.*`jd_step`.*per_sample_step.*nn\.GRU",
    ) as info:
        gramian_step(model, lambda outputs: outputs[0].sum(dim=(1, 2)), upgrad(), sgd(0.1))
    assert "eval mode" not in str(info.value)


def test_gramian_steps_check_the_model_when_built() -> None:
    """Item 14: what depends on the model alone is checked by the builders, so that compiling
    the step does not turn the errors into dynamo's."""
    coupled = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"BatchNorm1d\) mixes the samples.*eval mode"):
        gramian_step(coupled, lambda outputs: outputs.sum(1), upgrad(), sgd(0.1))
    mtl_gramian_step(coupled, lambda p, f: f.mean(0), upgrad(), sgd(0.1))  # coupling is fine
    normalised = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"LayerNorm\).*per_sample_step"):
        gramian_step(normalised, lambda outputs: outputs.sum(1), upgrad(), sgd(0.1))
    with pytest.raises(TypeError, match=r"LayerNorm\).*mtl_step"):
        mtl_gramian_step(normalised, lambda p, f: f.mean(0), upgrad(), sgd(0.1))
    normalised[1].requires_grad_(False)
    gramian_step(normalised, lambda outputs: outputs.sum(1), upgrad(), sgd(0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_closed_form_gramians_do_not_overflow(dtype: torch.dtype) -> None:
    """Per-sample gradient norms² above float16's 65504: the closed forms (probes and the
    engine's fast path) accumulate in float32 and match the float64 Gramian of the same
    (low-precision) model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    x = (10 * torch.randn(BATCH, 16)).to(dtype)

    def iwrm(outputs: Tensor) -> Tensor:
        return 100 * outputs.squeeze(1)

    reference_model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)
    reference_model.load_state_dict({k: v.to(F64) for k, v in model.state_dict().items()})
    named = dict(reference_model.named_parameters())
    rows = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        iwrm(reference_model(x[b : b + 1].to(F64))).sum(), list(named.values())
                    )
                ]
            )
            for b in range(BATCH)
        ]
    )
    expected = rows @ rows.T
    assert expected.diagonal().min() > 65504  # would overflow in float16

    probed = value_and_per_sample_gramian(model, params_of(model), (x,), iwrm).gramian
    engine_gramian = Engine(model, batch_dim=0).compute_gramian(iwrm(model(x)))
    for gramian in (probed, engine_gramian):
        assert gramian.dtype == torch.float32
        assert gramian.isfinite().all()
        torch.testing.assert_close(gramian.double(), expected, rtol=5e-2, atol=0.0)
