"""Functional optimizers against ``torch.optim``."""

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from tensordict import TensorDict

from tests.settings import DEVICE
from tests.utils import dotted_leaves
from torchjd_func.optim import Optimizer, adam, sgd

CASES: list[tuple[Callable[[], Optimizer[Any]], Callable[[Any], torch.optim.Optimizer]]] = [
    (lambda: sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda: sgd(0.1, 0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (
        lambda: sgd(0.05, 0.8, dampening=0.3, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    ),
    (
        lambda: sgd(0.1, 0.9, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ),
    (lambda: adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    (
        lambda: adam(0.02, (0.8, 0.99), 1e-6, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    ),
]


@pytest.mark.parametrize(("ours", "theirs"), CASES)
def test_matches_torch_optim_over_several_steps(
    ours: Callable[[], Optimizer[Any]], theirs: Callable[[Any], torch.optim.Optimizer]
) -> None:
    generator = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(3, 2, generator=generator), "b": torch.randn(4, generator=generator)}
    reference = {k: v.clone().to(DEVICE).requires_grad_() for k, v in start.items()}
    torch_optimizer = theirs(list(reference.values()))
    params = TensorDict({"a": start["a"].to(DEVICE), "nested": {"b": start["b"].to(DEVICE)}})
    optimizer = ours()
    state = optimizer.init(params)
    for _ in range(6):
        grads_a = torch.randn(3, 2, generator=generator).to(DEVICE)
        grads_b = torch.randn(4, generator=generator).to(DEVICE)
        reference["a"].grad, reference["b"].grad = grads_a.clone(), grads_b.clone()
        torch_optimizer.step()
        grads = TensorDict({"a": grads_a, "nested": {"b": grads_b}})
        params, state = optimizer.update(grads, state, params)
        found = dotted_leaves(params)
        torch.testing.assert_close(found["a"], reference["a"].detach())
        torch.testing.assert_close(found["nested.b"], reference["b"].detach())
    assert int(state.steps) == 6


def test_errors() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        sgd(-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        adam(betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="float"):
        adam(lr="fast")  # type: ignore[arg-type]
    optimizer = sgd(0.1)
    params = TensorDict({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="same keys"):
        optimizer.update(TensorDict({"b": torch.ones(2)}), optimizer.init(params), params)
    for bad in (torch.ones(3), torch.ones(2, device="meta")):
        for opt in (sgd(0.1, momentum=0.9), adam()):
            with pytest.raises(ValueError, match=r"gradient of 'a' has shape \[\d\] on"):
                opt.update(TensorDict({"a": bad}), opt.init(params), params)  # type: ignore[arg-type, arg-type]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_update_is_a_few_foreach_operations_in_any_key_order(nesterov: bool) -> None:
    """One ``torch._foreach_*`` operation per step of the rule, whatever the number of leaves (one
    kernel launch each on CUDA), and grads are matched to params by key, not by position."""
    from benchmarks.count_ops import count

    def params_and_grads(n: int) -> tuple[TensorDict, TensorDict]:
        params = TensorDict({f"p{i}": torch.full((3,), float(i), device=DEVICE) for i in range(n)})
        grads = TensorDict(
            {f"p{i}": torch.full((3,), 1.0 + i, device=DEVICE) for i in reversed(range(n))}
        )
        return params, grads

    optimizer = sgd(0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    counts = []
    for n in (2, 20):
        params, grads = params_and_grads(n)
        state = optimizer.init(params)
        counts.append(count(partial(optimizer.update, grads, state, params)))
        new_params, _ = optimizer.update(grads, state, params)
        for i in range(n):  # first step: b = g + λp, p ← p − η(g + λp)(1 + μ if nesterov)
            g = (1.0 + i) + 0.01 * i
            expected = i - 0.1 * g * (1 + 0.9 * nesterov)
            torch.testing.assert_close(
                new_params[f"p{i}"], torch.full((3,), expected, device=DEVICE)
            )
    assert counts[0] == counts[1]
