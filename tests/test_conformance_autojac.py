"""Drop-in conformance of ``torchjd_func.autojac`` with TorchJD 0.18, run side by side.

Each case builds the same small multi-task graph twice (same values), runs the call with
``torchjd.autojac`` and with ours, and compares what comes back and every ``.grad``/``.jac``; the
values are also checked against plain autograd where a call has an autograd meaning. The cases
where TorchJD's behaviour would be silently wrong or is an accident of its implementation, and
where we refuse with a clear error instead, are tested as such at the end (and listed in README's
"Coming from TorchJD").
"""

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from tests.settings import DEVICE, DTYPE
from tests.utils import assert_close
from torchjd_func import aggregation as ours_aggregation
from torchjd_func import autojac as ours_autojac
from torchjd_func.aggregation import Aggregator, Mean, UPGrad
from torchjd_func.autojac import backward, jac, jac_to_grad, mtl_backward

tj_autojac = pytest.importorskip("torchjd.autojac")
tj_aggregation = pytest.importorskip("torchjd.aggregation")

LIBRARIES = {
    "torchjd": (tj_autojac, tj_aggregation),
    "ours": (ours_autojac, ours_aggregation),
}
NAMES = ("p0", "p1", "p2")


def _problem(dtype: torch.dtype = DTYPE) -> dict[str, Tensor]:
    """A trunk ``p0`` giving features, two heads ``p1``, ``p2`` and their two losses."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    p0, p1, p2 = draw(3, 2).requires_grad_(), draw(2).requires_grad_(), draw(2).requires_grad_()
    features = (draw(5, 3) @ p0).tanh()
    l1 = (features @ p1).pow(2).mean()
    l2 = (features @ p2).sin().mean()
    return {
        "p0": p0,
        "p1": p1,
        "p2": p2,
        "features": features,
        "l1": l1,
        "l2": l2,
        "losses": torch.stack([l1, l2]),
    }


Case = Callable[[ModuleType, ModuleType, dict[str, Tensor]], object]


def _run(case: Case, library: str) -> tuple[object, dict[str, Tensor | None]]:
    autojac, aggregation = LIBRARIES[library]
    problem = _problem()
    result = case(autojac, aggregation, problem)
    state: dict[str, Tensor | None] = {}
    for name in NAMES:
        param = problem[name]
        state[f"{name}.grad"] = param.grad
        state[f"{name}.jac"] = getattr(param, "jac", None)
    return result, state


def _assert_same(actual: object, expected: object) -> None:
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor)
        assert actual.shape == expected.shape
        assert_close(actual, expected)
    elif isinstance(expected, tuple | list):
        assert isinstance(actual, tuple | list)
        assert type(actual) is type(expected)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert list(actual) == list(expected)
        for key, value in expected.items():
            assert (actual[key] is None) == (value is None), key
            _assert_same(actual[key], value)
    else:
        assert actual == expected


def _mtl(autojac: ModuleType, problem: dict[str, Tensor], **kwargs: Any) -> object:
    return autojac.mtl_backward(
        [problem["l1"], problem["l2"]], features=problem["features"], **kwargs
    )


def _all(problem: dict[str, Tensor]) -> list[Tensor]:
    return [problem[name] for name in NAMES]


def _set(tensor: Tensor, **fields: Tensor) -> Tensor:
    """Sets ``.grad``/``.jac`` by hand (and returns the tensor, to chain in a case)."""
    for name, value in fields.items():
        setattr(tensor, name, value)
    return tensor


def _retain(tensor: Tensor) -> Tensor:
    tensor.retain_grad()
    return tensor


# Calls that TorchJD accepts: ours must return the same and leave the same `.grad`/`.jac`.
SAME: dict[str, Case] = {
    "backward inputs=[]": lambda j, a, p: j.backward(p["losses"], inputs=[]),
    "backward inputs=[] on tensors without grad": lambda j, a, p: j.backward(
        torch.ones(2, device=DEVICE), inputs=[]
    ),
    "backward inputs=[] then inputs=[p0]": lambda j, a, p: (
        j.backward(p["losses"], inputs=[], jac_tensors=torch.eye(2, device=DEVICE, dtype=DTYPE)),
        j.backward(p["losses"], inputs=[p["p0"]]),
    ),
    "backward inputs repeated": lambda j, a, p: j.backward(
        p["losses"], inputs=[p["p1"], p["p1"], p["p2"], p["p1"]]
    ),
    "backward inputs from a generator": lambda j, a, p: j.backward(
        p["losses"], inputs=(t for t in [p["p0"], p["p2"]])
    ),
    "backward list of scalars": lambda j, a, p: j.backward([p["l1"], p["l2"]]),
    "backward 2-d tensor": lambda j, a, p: j.backward(torch.stack([p["losses"], 3 * p["losses"]])),
    "backward unused input": lambda j, a, p: j.backward(
        p["losses"], inputs=[p["p0"], torch.ones(4, device=DEVICE, requires_grad=True)]
    ),
    "backward retains_grad input": lambda j, a, p: (
        _retain(p["features"]),
        j.backward(p["losses"], inputs=[p["features"]]),
        getattr(p["features"], "jac", None),
    ),
    "backward accumulates": lambda j, a, p: (
        j.backward(p["losses"], retain_graph=True),
        j.backward(p["losses"], parallel_chunk_size=1),
    ),
    "backward chunk larger than m": lambda j, a, p: j.backward(p["losses"], parallel_chunk_size=9),
    "backward chunk numpy int": lambda j, a, p: j.backward(
        p["losses"], parallel_chunk_size=np.int64(1)
    ),
    "backward chunk 0-d integer tensor": lambda j, a, p: j.backward(
        torch.cat([p["losses"], p["losses"] ** 2]), parallel_chunk_size=torch.tensor(3)
    ),
    "backward jac_tensors": lambda j, a, p: j.backward(
        [p["l1"], p["l2"]],
        jac_tensors=[
            torch.tensor([1.0, 0.0, 2.0], device=DEVICE, dtype=DTYPE),
            torch.tensor([0.0, 1.0, -1.0], device=DEVICE, dtype=DTYPE),
        ],
    ),
    "jac inputs=[]": lambda j, a, p: j.jac(p["losses"], []),
    "jac inputs repeated": lambda j, a, p: j.jac(p["losses"], [p["p1"], p["p0"], p["p1"]]),
    "jac non-leaf input": lambda j, a, p: j.jac(p["losses"], p["features"]),
    "jac chunk numpy int": lambda j, a, p: j.jac(
        p["losses"], [p["p0"]], parallel_chunk_size=np.int64(1)
    ),
    "mtl default": lambda j, a, p: _mtl(j, p),
    "mtl task param repeated within a task": lambda j, a, p: _mtl(
        j, p, tasks_params=[[p["p1"], p["p1"]], [p["p2"]]]
    ),
    "mtl task param given to two tasks": lambda j, a, p: _mtl(
        j, p, tasks_params=[[p["p1"]], [p["p1"]]]
    ),
    "mtl both heads given to both tasks": lambda j, a, p: _mtl(
        j, p, tasks_params=[[p["p1"], p["p2"]], [p["p2"], p["p1"], p["p2"]]]
    ),
    "mtl shared_params=[]": lambda j, a, p: _mtl(j, p, shared_params=[]),
    "mtl shared_params repeated": lambda j, a, p: _mtl(j, p, shared_params=[p["p0"], p["p0"]]),
    "mtl shared_params from a generator": lambda j, a, p: _mtl(
        j, p, shared_params=(t for t in [p["p0"]])
    ),
    "mtl empty task params": lambda j, a, p: _mtl(j, p, tasks_params=[[], []]),
    "mtl single task": lambda j, a, p: j.mtl_backward([p["l1"]], features=p["features"]),
    "mtl retain_graph": lambda j, a, p: (_mtl(j, p, retain_graph=True), _mtl(j, p)),
    "mtl chunk numpy int": lambda j, a, p: _mtl(j, p, parallel_chunk_size=np.int64(1)),
    "mtl grad_tensors": lambda j, a, p: _mtl(
        j,
        p,
        grad_tensors=[
            torch.tensor(2.0, device=DEVICE, dtype=DTYPE),
            torch.tensor(-1.0, device=DEVICE, dtype=DTYPE),
        ],
    ),
    "mtl grad_tensors of non-scalar losses": lambda j, a, p: j.mtl_backward(
        [p["features"] @ p["p1"], (p["features"] @ p["p2"]).sin().sum()],
        features=p["features"],
        grad_tensors=[
            torch.arange(5, device=DEVICE, dtype=DTYPE),
            torch.tensor(3.0, device=DEVICE, dtype=DTYPE),
        ],
    ),
    "mtl existing grad": lambda j, a, p: (
        _set(p["p1"], grad=torch.ones_like(p["p1"])),
        _mtl(j, p),
    ),
    "jac_to_grad UPGrad": lambda j, a, p: (
        j.backward(p["losses"], inputs=_all(p)),
        j.jac_to_grad(_all(p), a.UPGrad()),
    ),
    "jac_to_grad optimize_gramian_computation=True": lambda j, a, p: (
        j.backward(p["losses"], inputs=_all(p)),
        j.jac_to_grad(_all(p), a.UPGrad(), optimize_gramian_computation=True),
    ),
    "jac_to_grad optimize_gramian_computation=False": lambda j, a, p: (
        j.backward(p["losses"], inputs=_all(p)),
        j.jac_to_grad(_all(p)[:2], a.UPGrad(), optimize_gramian_computation=False),
    ),
    "jac_to_grad Mean, retain_jac, existing grad": lambda j, a, p: (
        j.backward(p["losses"], inputs=_all(p)),
        _set(p["p0"], grad=torch.ones_like(p["p0"])),
        j.jac_to_grad(_all(p), a.Mean(), retain_jac=True),
    ),
    "jac_to_grad a generator": lambda j, a, p: (
        j.backward(p["losses"], inputs=_all(p)),
        j.jac_to_grad((t for t in _all(p)), a.UPGrad()),
    ),
    "jac_to_grad retains_grad tensor": lambda j, a, p: (
        _retain(p["features"]),
        _set(p["features"], jac=torch.stack([p["features"], 1 - p["features"]]).detach()),
        j.jac_to_grad([p["features"]], a.Mean()),
        p["features"].grad,
    ),
}


@pytest.mark.parametrize("case", SAME.values(), ids=SAME.keys())
def test_same_as_torchjd(case: Case) -> None:
    expected_result, expected_state = _run(case, "torchjd")
    result, state = _run(case, "ours")
    _assert_same(result, expected_result)
    _assert_same(state, expected_state)


# Calls that TorchJD refuses: ours must refuse them too, with a ValueError or a TypeError (TorchJD
# sometimes raises a RuntimeError or an AttributeError from deeper down).
REFUSED: dict[str, Case] = {
    "backward no tensor": lambda j, a, p: j.backward([]),
    "backward repeated tensors": lambda j, a, p: j.backward([p["l1"], p["l1"]]),
    "backward tensors without grad": lambda j, a, p: j.backward(torch.ones(2, device=DEVICE)),
    "backward chunk 0": lambda j, a, p: j.backward(p["losses"], parallel_chunk_size=0),
    "backward chunk -1": lambda j, a, p: j.backward(p["losses"], parallel_chunk_size=-1),
    "backward chunk False": lambda j, a, p: j.backward(p["losses"], parallel_chunk_size=False),
    "backward chunk 2.0": lambda j, a, p: j.backward(p["losses"], parallel_chunk_size=2.0),
    "backward jac_tensors shape": lambda j, a, p: j.backward(
        p["losses"], jac_tensors=torch.ones(3)
    ),
    "backward jac_tensors rows": lambda j, a, p: j.backward(
        [p["l1"], p["l2"]], jac_tensors=[torch.ones(1), torch.ones(2)]
    ),
    "backward jac_tensors 0 rows": lambda j, a, p: j.backward(
        p["losses"], jac_tensors=torch.ones(0, 2)
    ),
    "backward tensor with no element": lambda j, a, p: j.backward(p["p1"][:0] * 2),
    "backward input without grad": lambda j, a, p: j.backward(
        p["losses"], inputs=[torch.ones(2, device=DEVICE)]
    ),
    "backward non-leaf input": lambda j, a, p: j.backward(p["losses"], inputs=[p["features"]]),
    "jac no output": lambda j, a, p: j.jac([], [p["p0"]]),
    "jac repeated outputs": lambda j, a, p: j.jac([p["l1"], p["l1"]], [p["p0"]]),
    "jac outputs without grad": lambda j, a, p: j.jac(torch.ones(2, device=DEVICE), [p["p0"]]),
    "jac input without grad": lambda j, a, p: j.jac(p["losses"], [torch.ones(2, device=DEVICE)]),
    "mtl no loss": lambda j, a, p: j.mtl_backward([], features=p["features"]),
    "mtl repeated losses": lambda j, a, p: j.mtl_backward(
        [p["l1"], p["l1"]], features=p["features"]
    ),
    "mtl non-scalar loss": lambda j, a, p: j.mtl_backward([p["losses"]], features=p["features"]),
    "mtl no feature": lambda j, a, p: j.mtl_backward([p["l1"], p["l2"]], features=[]),
    "mtl repeated features": lambda j, a, p: j.mtl_backward(
        [p["l1"], p["l2"]], features=[p["features"], p["features"]]
    ),
    "mtl features without grad": lambda j, a, p: j.mtl_backward(
        [p["l1"], p["l2"]], features=torch.ones(2, device=DEVICE)
    ),
    "mtl shared and task param": lambda j, a, p: _mtl(
        j, p, tasks_params=[[p["p1"], p["p0"]], [p["p2"]]]
    ),
    "mtl shared and task param, shared given": lambda j, a, p: _mtl(
        j, p, tasks_params=[[p["p1"]], [p["p2"]]], shared_params=[p["p0"], p["p2"]]
    ),
    "mtl tasks_params length": lambda j, a, p: _mtl(j, p, tasks_params=[[p["p1"]]]),
    "mtl non-leaf task param": lambda j, a, p: _mtl(j, p, tasks_params=[[p["p1"] * 1], [p["p2"]]]),
    "mtl task param without grad": lambda j, a, p: _mtl(
        j, p, tasks_params=[[torch.ones(2, device=DEVICE)], [p["p2"]]]
    ),
    "mtl chunk 0": lambda j, a, p: _mtl(j, p, parallel_chunk_size=0),
    "mtl grad_tensors length": lambda j, a, p: _mtl(j, p, grad_tensors=[torch.tensor(2.0)]),
    "mtl grad_tensors shape": lambda j, a, p: _mtl(
        j, p, grad_tensors=[torch.ones(2), torch.tensor(1.0)]
    ),
    "jac_to_grad no tensor": lambda j, a, p: j.jac_to_grad([], a.Mean()),
    "jac_to_grad missing jac": lambda j, a, p: j.jac_to_grad([p["p0"]], a.Mean()),
    "jac_to_grad different rows": lambda j, a, p: (
        _set(p["p1"], jac=torch.ones(2, 2, device=DEVICE)),
        _set(p["p2"], jac=torch.ones(3, 2, device=DEVICE)),
        j.jac_to_grad([p["p1"], p["p2"]], a.Mean()),
    ),
    "jac_to_grad tensor without grad": lambda j, a, p: (
        j.backward(p["losses"], inputs=[p["p1"]]),
        p["p1"].requires_grad_(False),
        j.jac_to_grad([p["p1"]], a.UPGrad()),
    ),
    "jac_to_grad non-leaf tensor": lambda j, a, p: (
        _set(p["features"], jac=torch.ones(2, *p["features"].shape, device=DEVICE)),
        j.jac_to_grad([p["features"]], a.UPGrad()),
    ),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_refused_as_by_torchjd(case: Case) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 (TorchJD's error types vary)
        _run(case, "torchjd")
    with pytest.raises((ValueError, TypeError)):
        _run(case, "ours")


# Values against plain autograd (float64), for the fixed behaviours.


def test_mtl_repeated_task_param_counts_once_like_autograd() -> None:
    problem = _problem(torch.float64)
    p1, p2 = problem["p1"], problem["p2"]
    expected = [
        torch.autograd.grad(problem[n], p, retain_graph=True)[0]
        for n, p in [("l1", p1), ("l2", p2)]
    ]
    mtl_backward([problem["l1"], problem["l2"]], problem["features"], tasks_params=[[p1, p1], [p2]])
    assert_close(p1.grad, expected[0])
    assert_close(p2.grad, expected[1])


def test_mtl_param_of_two_tasks_gets_the_sum_like_autograd() -> None:
    problem = _problem(torch.float64)
    p1 = problem["p1"]
    (expected,) = torch.autograd.grad(problem["l1"] + problem["l2"], p1, retain_graph=True)
    mtl_backward([problem["l1"], problem["l2"]], problem["features"], tasks_params=[[p1], [p1]])
    assert_close(p1.grad, expected)


def test_mtl_grad_tensors_weight_the_rows_like_autograd() -> None:
    problem = _problem(torch.float64)
    p0, p1, features = problem["p0"], problem["p1"], problem["features"]
    per_sample = (features @ p1).pow(2)  # [5], a vector loss for task 0
    weights = torch.linspace(0.5, 1.5, 5, dtype=torch.float64, device=DEVICE)
    scale = torch.tensor(-2.0, dtype=torch.float64, device=DEVICE)
    expected_rows = [
        torch.autograd.grad(per_sample @ weights, p0, retain_graph=True)[0],
        torch.autograd.grad(scale * problem["l2"], p0, retain_graph=True)[0],
    ]
    (expected_head,) = torch.autograd.grad(per_sample @ weights, p1, retain_graph=True)

    mtl_backward([per_sample, problem["l2"]], features, grad_tensors=[weights, scale])

    assert_close(p0.jac, torch.stack(expected_rows))  # type: ignore[attr-defined]
    assert_close(p1.grad, expected_head)


def test_backward_and_jac_with_no_input_keep_the_graph() -> None:
    problem = _problem(torch.float64)
    losses, p0 = problem["losses"], problem["p0"]
    backward(losses, inputs=[])
    assert jac(losses, []) == ()
    assert not hasattr(p0, "jac")
    assert p0.grad is None
    # Nothing was differentiated, so the graph is intact (not freed) for the real pass.
    (expected,) = torch.autograd.grad(losses[0], p0, retain_graph=True)
    backward(losses, inputs=[p0, p0])
    assert_close(p0.jac[0], expected)  # type: ignore[attr-defined]


# Refused here on purpose, where TorchJD's behaviour is an accident or silently wrong.


def test_repeated_tensors_in_jac_to_grad_are_refused() -> None:
    # TorchJD counts the repeated tensor twice with retain_jac=True (twice its gradient in
    # `.grad`) and raises AttributeError after freeing the first `.jac` without it.
    problem = _problem()
    p0 = problem["p0"]
    backward(problem["losses"], inputs=[p0])
    with pytest.raises(ValueError, match="same tensor twice"):
        jac_to_grad([p0, p0], Mean(), retain_jac=True)
    assert hasattr(p0, "jac")
    assert p0.grad is None


def test_bool_chunk_size_is_refused() -> None:
    # TorchJD reads `True` as 1 (one row at a time, no vmap): the opposite of what it reads like.
    problem = _problem()
    for call in (
        lambda: backward(problem["losses"], parallel_chunk_size=True),
        lambda: jac(problem["losses"], [problem["p0"]], parallel_chunk_size=True),
        lambda: mtl_backward(
            [problem["l1"], problem["l2"]], problem["features"], parallel_chunk_size=True
        ),
    ):
        with pytest.raises(ValueError, match="positive int, got True"):
            call()


def test_jac_to_grad_refusals_leave_every_jac_and_grad_untouched() -> None:
    # TorchJD frees the `.jac`s and writes the `.grad` of the tensors before the bad one.
    problem = _problem()
    p0, p1 = problem["p0"], problem["p1"]
    backward(problem["losses"], inputs=[p0, p1])
    p1.requires_grad_(False)
    with pytest.raises(ValueError, match=r"`tensors\[1\]` does not require grad"):
        jac_to_grad([p0, p1], UPGrad())
    assert hasattr(p0, "jac")
    assert hasattr(p1, "jac")
    assert p0.grad is None
    assert p1.grad is None


def test_mtl_refusals_leave_every_grad_untouched() -> None:
    # TorchJD accumulates the first task's gradient before refusing the second task's non-leaf.
    problem = _problem()
    p1, p2 = problem["p1"], problem["p2"]
    with pytest.raises(ValueError, match=r"`tasks_params\[1\]\[0\]` is not a leaf"):
        mtl_backward(
            [problem["l1"], problem["l2"]], problem["features"], tasks_params=[[p1], [p2 * 1]]
        )
    assert p1.grad is None
    assert not hasattr(problem["p0"], "jac")


class _RowSum(Aggregator):
    """An aggregator that is not Gramian-weighted."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.sum(dim=0)


def test_optimize_gramian_computation_is_checked() -> None:
    problem = _problem()
    p0 = problem["p0"]
    (expected,) = torch.autograd.grad(problem["losses"].sum(), p0, retain_graph=True)
    backward(problem["losses"], inputs=[p0])
    with pytest.raises(TypeError, match="must be a bool, got int"):
        jac_to_grad([p0], UPGrad(), optimize_gramian_computation=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GramianWeightedAggregator"):
        jac_to_grad([p0], _RowSum(), optimize_gramian_computation=True)
    assert hasattr(p0, "jac")
    assert p0.grad is None
    jac_to_grad([p0], _RowSum(), optimize_gramian_computation=False)
    assert_close(p0.grad, expected)


def test_grad_is_accumulated_in_place_like_autograd() -> None:
    # Autograd (and TorchJD) add into an existing `.grad` in place: references to it stay valid.
    problem = _problem(torch.float64)
    p0, p1, p2 = problem["p0"], problem["p1"], problem["p2"]
    existing = {name: torch.ones_like(problem[name]) for name in NAMES}
    for name in NAMES:
        problem[name].grad = existing[name]
    expected = torch.autograd.grad(problem["losses"].sum(), [p0, p1, p2], retain_graph=True)

    mtl_backward([problem["l1"], problem["l2"]], problem["features"], Mean())

    for name, grad in zip(NAMES, expected, strict=True):
        assert problem[name].grad is existing[name]
        assert_close(existing[name], 1 + (grad / 2 if name == "p0" else grad))
