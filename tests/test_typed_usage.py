"""User code type-checks against the installed package, with precise types (``mypy --strict``).

``tests/typed_usage/`` holds a user's script (``user_ok.py``: must pass, ``assert_type`` pins
the types) and a file of deliberate mistakes (``user_mistakes.py``: each one marked with the
``# type: ignore[code]`` mypy must report; under ``warn_unused_ignores`` a mistake that stops
being caught fails). Both are copied out of the repository and checked from there, so that mypy
finds ``torchjd_func`` where the README's install puts it, as a user's project would.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

HERE = Path(__file__).parent / "typed_usage"

# What a user's mypy configuration needs: tensordict ships without a `py.typed` marker.
USER_CONFIG = """\
[mypy]
strict = True

[mypy-tensordict.*]
follow_untyped_imports = True
"""


def _mypy(directory: Path, *files: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *files],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def user_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("user_project")
    for source in HERE.glob("*.py"):
        shutil.copy(source, directory / source.name)
    (directory / "mypy.ini").write_text(USER_CONFIG)
    return directory


def test_user_code_type_checks_with_precise_types(user_project: Path) -> None:
    result = _mypy(user_project, "user_ok.py", "user_mistakes.py")
    assert "import-not-found" not in result.stdout, (
        "mypy does not see the installed torchjd_func; install it as the README says "
        '(`pip install -e ".[dev]" --config-settings editable_mode=compat`).\n' + result.stdout
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_mistake_is_reported(user_project: Path) -> None:
    # Without its `# type: ignore`, each marked line is an error of the marked code.
    lines = (user_project / "user_mistakes.py").read_text().splitlines()
    expected = {}
    stripped = []
    for number, line in enumerate(lines, start=1):
        code, marker, ignored = line.partition("  # type: ignore[")
        if marker:
            expected[number] = ignored.rstrip("]")
        stripped.append(code)
    assert len(expected) >= 8
    (user_project / "mistakes_unmarked.py").write_text("\n".join(stripped) + "\n")
    result = _mypy(user_project, "mistakes_unmarked.py")
    reported = {
        (int(line.split(":")[1]), line.rsplit("[", 1)[1].rstrip("]"))
        for line in result.stdout.splitlines()
        if line.startswith("mistakes_unmarked.py:") and ": error: " in line
    }
    assert reported == set(expected.items()), result.stdout


def test_user_script_runs(user_project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "user_ok.py"],
        cwd=user_project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
