"""Every ``python`` code block of the README and of ``docs/`` runs."""

import re
import sys
import types
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
def test_code_block_runs(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module, since torch.compile looks the code's globals up in sys.modules.
    module = types.ModuleType("doc_block")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "<doc>", "exec"), module.__dict__)
