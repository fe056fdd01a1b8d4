"""Every script in ``examples/`` runs; the seeds and their functional twins train alike."""

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tests.utils import dotted_leaves

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT_ARGUMENTS = {"mtl_functional.py": ["--steps", "4", "--plot", "none"]}


def _run(script: str, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    return runpy.run_path(str(EXAMPLES / script), run_name="example")


def test_main_example_trains_both_tasks_and_upgrad_never_conflicts() -> None:
    histories = _run("mtl_functional.py")["main"](steps=120, compile_step=False)
    for history in histories.values():
        losses = history["losses"]
        assert (losses[-8:].mean(dim=0) < losses[0]).all()
    # What the example claims: UPGrad's update never increases a task's loss to first order,
    # the mean's sometimes does.
    upgrad, mean = histories["upgrad"]["decrease"], histories["mean"]["decrease"]
    assert (upgrad >= -1e-5 * upgrad.abs().max()).all()
    assert (mean < 0).any()


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs_as_a_script(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *SCRIPT_ARGUMENTS.get(script, [])],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _assert_same_params(module: nn.Module, params: TensorDict, prefix: str = "") -> None:
    found = dotted_leaves(params)
    for name, param in module.named_parameters():
        torch.testing.assert_close(found[prefix + name], param.detach())


def test_seed_000_and_its_functional_twin_train_to_the_same_weights() -> None:
    seed = _run("seed_000_iwmtl.py")
    functional = _run("functional_000_iwmtl.py")["params"]
    _assert_same_params(seed["shared_module"], functional["shared"])
    _assert_same_params(seed["task1_module"], functional["task1"])
    _assert_same_params(seed["task2_module"], functional["task2"])


def test_seed_002_and_its_functional_twin_train_to_the_same_weights() -> None:
    seed = _run("seed_002_mtl.py")
    functional = _run("functional_002_mtl.py")
    _assert_same_params(seed["shared_module"], functional["shared"])
    _assert_same_params(seed["task1_module"], functional["heads"], "task1.")
    _assert_same_params(seed["task2_module"], functional["heads"], "task2.")
    # And training moved the weights: the comparison is not between two initialisations.
    torch.manual_seed(0)
    initial = nn.Linear(10, 5)  # the first layer, initialised as in the seed
    assert not torch.allclose(initial.weight, seed["shared_module"][0].weight)


@pytest.mark.parametrize("strategy", ["together", "per_network", "per_layer", "per_tensor"])
def test_seed_003_and_its_functional_twin_train_to_the_same_weights(strategy: str) -> None:
    seed = _run(f"seed_003_{strategy}.py")
    main = _run("functional_003_grouping.py")["main"]
    torch.manual_seed(0)
    shared, heads = main(strategy)
    if strategy == "per_network":
        _assert_same_params(seed["encoder"], shared, "encoder.")
        _assert_same_params(seed["decoder"], shared, "decoder.")
    else:
        _assert_same_params(seed["encoder"], shared)
    _assert_same_params(seed["task1_head"], heads, "task1.")
    _assert_same_params(seed["task2_head"], heads, "task2.")
