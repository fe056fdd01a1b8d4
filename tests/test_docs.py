"""Every ``python`` code block of the README and of ``docs/`` runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)

BLOCKS = [
    pytest.param(code, id=f"{path.name}-{i}")
    for path in DOCUMENTS
    for i, code in enumerate(BLOCK.findall(path.read_text()))
]


def test_documents_have_code() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code: str) -> None:
    exec(compile(code, "<doc>", "exec"), {"__name__": "doc"})
