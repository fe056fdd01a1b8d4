"""Every script in ``examples/`` runs, and trains."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_mtl_functional_trains_both_tasks() -> None:
    module = runpy.run_path(str(EXAMPLES / "mtl_functional.py"), run_name="example")
    history = module["main"](steps=80)
    first, last = history[0], history[-8:]
    for task in range(2):
        assert sum(losses[task] for losses in last) / len(last) < first[task]


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs_as_a_script(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "step" in result.stdout
