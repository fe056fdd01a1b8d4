"""``mtl_jacobian`` against the full Jacobian and autograd's head gradients."""

from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tests.architectures import reference_jacobian
from tests.settings import DEVICE
from tests.utils import assert_close, assert_leaves_close, dotted_leaves
from torchjd_func import call, mtl_jacobian, params_of

N_TASKS = 3


class MTLModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(N_TASKS)])

    def losses(self, x: Tensor, y: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.stack(
            [
                (head(features).squeeze(1) - y[:, i]).pow(2).mean()
                for i, head in enumerate(self.heads)
            ]
        )


def _functional(model: MTLModel) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
        return call(model.trunk, params, x)

    def heads_fn(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return torch.stack(
            [
                (call(head, params[str(i)], features).squeeze(1) - y[:, i]).pow(2).mean()
                for i, head in enumerate(model.heads)
            ]
        )

    return trunk_fn, heads_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 8])
def test_mtl_jacobian_matches_full_jacobian_and_head_grads(
    chunk_size: int | None, dtype: torch.dtype
) -> None:
    model = MTLModel().to(device=DEVICE, dtype=dtype)
    x = torch.randn(10, 6, device=DEVICE, dtype=dtype)
    y = torch.randn(10, N_TASKS, device=DEVICE, dtype=dtype)
    losses = model.losses(x, y)
    full = reference_jacobian(model, losses)
    trunk_fn, heads_fn = _functional(model)

    out = mtl_jacobian(
        trunk_fn,
        heads_fn,
        params_of(model.trunk),
        params_of(model.heads),
        (x,),
        (y,),
        chunk_size=chunk_size,
    )

    assert_close(out.losses, losses.detach())
    shared = {k.removeprefix("trunk."): v for k, v in full.items() if k.startswith("trunk.")}
    assert_leaves_close(out.jacobian, shared)
    # Each head's gradient is its own task's gradient: row i of the full Jacobian.
    head_grads = {
        k.removeprefix("heads."): v[int(k.split(".")[1])]
        for k, v in full.items()
        if k.startswith("heads.")
    }
    assert_leaves_close(out.head_grads, head_grads)
    assert isinstance(out.features, Tensor)
    assert_close(out.features, model.trunk(x).detach())


def test_several_features_and_per_task_functions() -> None:
    torch.manual_seed(0)
    trunk = nn.Linear(5, 6).to(DEVICE, torch.float64)
    head_a, head_b = nn.Linear(3, 1), nn.Linear(6, 1)
    head_a, head_b = head_a.to(DEVICE, torch.float64), head_b.to(DEVICE, torch.float64)
    x = torch.randn(7, 5, device=DEVICE, dtype=torch.float64)

    def split_features(out: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(out[:, :3]), torch.sin(out)

    features = split_features(trunk(x))
    losses = torch.stack([head_a(features[0]).pow(2).mean(), head_b(features[1]).abs().mean()])
    expected = reference_jacobian(trunk, losses)

    def task_a(params: TensorDict, feats: tuple[Tensor, Tensor]) -> Tensor:
        return call(head_a, params["a"], feats[0]).pow(2).mean()

    def task_b(params: TensorDict, feats: tuple[Tensor, Tensor]) -> Tensor:
        return call(head_b, params["b"], feats[1]).abs().mean()

    out = mtl_jacobian(
        lambda p, x: split_features(call(trunk, p, x)),
        [task_a, task_b],
        params_of(trunk),
        TensorDict({"a": params_of(head_a), "b": params_of(head_b)}),
        (x,),
    )

    assert_leaves_close(out.jacobian, expected)
    assert isinstance(out.features, tuple)
    assert len(out.features) == 2
    grad_a = torch.autograd.grad(losses[0], head_a.weight, retain_graph=True)[0]
    torch.testing.assert_close(out.head_grads["a", "weight"], grad_a)


def test_head_param_shared_by_two_tasks_gets_the_sum() -> None:
    trunk = nn.Linear(4, 3).to(DEVICE)
    shared_head = nn.Linear(3, 1).to(DEVICE)
    x = torch.randn(6, 4, device=DEVICE)
    features = trunk(x)
    losses = torch.stack([shared_head(features).mean(), shared_head(features).pow(2).mean()])
    expected = torch.autograd.grad(losses.sum(), shared_head.weight)[0]

    def heads_fn(params: TensorDict, feats: Tensor) -> Tensor:
        out = call(shared_head, params, feats)
        return torch.stack([out.mean(), out.pow(2).mean()])

    result = mtl_jacobian(
        lambda p, x: call(trunk, p, x), heads_fn, params_of(trunk), params_of(shared_head), (x,)
    )

    torch.testing.assert_close(result.head_grads["weight"], expected)


def test_heads_without_params() -> None:
    trunk = nn.Linear(4, 2).to(DEVICE)
    x = torch.randn(5, 4, device=DEVICE)
    expected = reference_jacobian(trunk, trunk(x).pow(2).mean(0))

    out = mtl_jacobian(
        lambda p, x: call(trunk, p, x),
        lambda p, f: f.pow(2).mean(0),
        params_of(trunk),
        TensorDict(),
        (x,),
    )

    assert_leaves_close(out.jacobian, expected)
    assert len(list(out.head_grads.keys())) == 0


def test_per_task_functions_equal_one_function_and_autograd() -> None:
    """A sequence of per-task functions gives the same losses, Jacobian and head gradients as one
    function returning all the losses, and as autograd. Task 1 shares task 0's head and adds its
    own; task 2 ignores the features."""
    torch.manual_seed(0)
    dtype = torch.float64
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).to(DEVICE, dtype)
    shared_head, head_1 = nn.Linear(6, 1).to(DEVICE, dtype), nn.Linear(6, 1).to(DEVICE, dtype)
    scale = nn.Linear(1, 1).to(DEVICE, dtype)
    x = torch.randn(7, 5, device=DEVICE, dtype=dtype)
    y = torch.randn(7, device=DEVICE, dtype=dtype)

    def task_0(params: TensorDict, f: Tensor, y: Tensor) -> Tensor:
        return (call(shared_head, params["shared"], f).squeeze(1) - y).pow(2).mean()

    def task_1(params: TensorDict, f: Tensor, y: Tensor) -> Tensor:
        both = call(shared_head, params["shared"], f) + call(head_1, params["one"], f)
        return both.abs().mean()

    def task_2(params: TensorDict, f: Tensor, y: Tensor) -> Tensor:
        return call(scale, params["scale"], y[:1, None]).pow(2).sum()

    def all_tasks(params: TensorDict, f: Tensor, y: Tensor) -> Tensor:
        return torch.stack([task(params, f, y) for task in (task_0, task_1, task_2)])

    heads = TensorDict(
        {"shared": params_of(shared_head), "one": params_of(head_1), "scale": params_of(scale)}
    )
    args = (lambda p, x: call(trunk, p, x), params_of(trunk), heads, (x,), (y,))
    per_task = mtl_jacobian(args[0], [task_0, task_1, task_2], *args[1:])
    together = mtl_jacobian(args[0], all_tasks, *args[1:])

    features = trunk(x)
    losses = torch.stack(
        [
            (shared_head(features).squeeze(1) - y).pow(2).mean(),
            (shared_head(features) + head_1(features)).abs().mean(),
            scale(y[:1, None]).pow(2).sum(),
        ]
    )
    assert_close(per_task.losses, losses)
    assert_leaves_close(per_task.jacobian[:2], reference_jacobian(trunk, losses[:2]))
    assert_leaves_close(per_task.jacobian, dotted_leaves(together.jacobian))
    expected_heads = torch.autograd.grad(
        losses.sum(), [*shared_head.parameters(), *head_1.parameters(), *scale.parameters()]
    )
    got = [
        per_task.head_grads[k, n] for k in ("shared", "one", "scale") for n in ("weight", "bias")
    ]
    for actual, expected in zip(got, expected_heads, strict=True):
        assert_close(actual, expected)
    assert_leaves_close(per_task.head_grads, dotted_leaves(together.head_grads))
    assert (per_task.jacobian[2] == 0).all()  # task 2 does not go through the trunk


def test_mapping_of_task_functions_equals_one_function() -> None:
    """``heads_fn`` as ``{task: loss}``, each loss with its own head's parameters (one backward
    pass per task through its own head): the same as one function for all the tasks, also with
    a trunk returning two features."""
    torch.manual_seed(1)
    dtype = torch.float64
    trunk = nn.Linear(5, 6).to(DEVICE, dtype)
    head_a, head_b = nn.Linear(3, 1).to(DEVICE, dtype), nn.Linear(6, 1).to(DEVICE, dtype)
    x = torch.randn(7, 5, device=DEVICE, dtype=dtype)

    def trunk_fn(p: TensorDict, x: Tensor) -> tuple[Tensor, Tensor]:
        out = call(trunk, p, x)
        return torch.tanh(out[:, :3]), torch.sin(out)

    def loss_a(params: TensorDict, feats: tuple[Tensor, Tensor]) -> Tensor:
        return call(head_a, params, feats[0]).pow(2).mean()

    def loss_b(params: TensorDict, feats: tuple[Tensor, Tensor]) -> Tensor:
        return call(head_b, params, feats[1]).abs().mean() + feats[0].mean()

    def both(params: TensorDict, feats: tuple[Tensor, Tensor]) -> Tensor:
        return torch.stack([loss_a(params["a"], feats), loss_b(params["b"], feats)])

    heads = TensorDict({"a": params_of(head_a), "b": params_of(head_b)})
    mapped = mtl_jacobian(trunk_fn, {"a": loss_a, "b": loss_b}, params_of(trunk), heads, (x,))
    together = mtl_jacobian(trunk_fn, both, params_of(trunk), heads, (x,))
    assert_close(mapped.losses, together.losses)
    assert_leaves_close(mapped.jacobian, dotted_leaves(together.jacobian))
    assert_leaves_close(mapped.head_grads, dotted_leaves(together.head_grads))
    with pytest.raises(ValueError, match="exactly its keys"):
        mtl_jacobian(trunk_fn, {"a": loss_a}, params_of(trunk), heads, (x,))


@pytest.mark.parametrize("form", ["function", "mapping"])
def test_mtl_step_with_heads_in_a_closure_compiles_once(form: str) -> None:
    """Heads captured by closure (as in benchmarks/bench_steps.py), one function or a mapping."""
    from torch._dynamo.testing import CompileCounter

    from torchjd_func.aggregation import upgrad
    from torchjd_func.optim import sgd
    from torchjd_func.step import mtl_step

    torch.manual_seed(2)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.ReLU()).to(DEVICE)
    heads = nn.ModuleDict({"a": nn.Linear(6, 1), "b": nn.Linear(6, 1)}).to(DEVICE)

    def task(name: str) -> Callable[..., Tensor]:
        def loss(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
            return (call(heads[name], params, features)[:, 0] - y).pow(2).mean()

        return loss

    def both(params: TensorDict, features: Tensor, y: Tensor) -> Tensor:
        return torch.stack([task(name)(params[name], features, y) for name in heads])

    heads_fn = both if form == "function" else {"a": task("a"), "b": task("b")}
    step = mtl_step(lambda p, x: call(trunk, p, x), heads_fn, upgrad(), sgd(0.1))
    params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)})
    state = (params, sgd(0.1).init(params), upgrad().init(2, device=DEVICE))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(3):
        batch = ((torch.randn(8, 5, device=DEVICE),), (torch.randn(8, device=DEVICE),))
        expected, actual = step(*state, batch), compiled(*state, batch)
        assert_close(actual.metrics["weights"], expected.metrics["weights"])
        state = (expected.params, expected.opt_state, expected.agg_state)
    assert counter.frame_count == 1
    torch._dynamo.reset()
