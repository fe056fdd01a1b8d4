"""Every ``python`` code block of the README and of ``docs/`` runs."""

import itertools
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_NAMES = itertools.count()
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)

BLOCKS = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}-{i}")
    for path in DOCUMENTS
    for i, code in enumerate(BLOCK.findall(path.read_text()))
]


def test_documents_have_code() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module, since torch.compile looks the code's globals up in sys.modules. Its name is
    # unique: dynamo caches modules by name (`functools.cache` on its `_import_module`), so a later
    # block under a reused name would be traced with an earlier block's globals (its `model`).
    module = types.ModuleType(f"doc_block_{next(_NAMES)}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "<doc>", "exec"), module.__dict__)
