"""The private torch APIs, all imported by ``torchjd_func._torch_compat``: they resolve, and a torch
that lacks one fails with an ImportError that names it."""

import ast
import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch._higher_order_ops
from torch import nn
from torch.func import vmap

import torchjd_func
import torchjd_func._probes
import torchjd_func._qp
from torchjd_func import _torch_compat
from torchjd_func._torch_compat import forward_hooks, set_forward_hooks


def _fresh_compat() -> ModuleType:
    """A new execution of the compat module, not registered in ``sys.modules`` (the package's own
    import is left as it is)."""
    spec = importlib.util.find_spec("torchjd_func._torch_compat")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_advice(message: str, api: str) -> None:
    assert f"`{api}`" in message
    assert f"The installed torch is {torch.__version__}" in message
    assert "torchjd_func supports torch >= 2.13 (tested on 2.13)" in message
    assert "Install a supported torch" in message


def test_real_imports_resolve() -> None:
    compat = _fresh_compat()
    assert compat.is_batchedtensor is torch._C._functorch.is_batchedtensor
    assert compat.scan is torch._higher_order_ops.scan
    assert compat.while_loop is torch._higher_order_ops.while_loop
    assert compat.tree_leaves is torch.utils._pytree.tree_leaves
    for name in compat.__all__:
        assert callable(getattr(compat, name)), name


def _private_torch_uses(path: Path) -> list[str]:
    """The private torch modules that ``path`` imports, and its ``_forward_hooks`` accesses."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "_forward_hooks":
            names = ["torch.nn.Module._forward_hooks"]
        elif isinstance(node, ast.Attribute) and node.attr == "_C":
            names = ["torch._C"]
        else:
            names = []
        found += [
            name
            for name in names
            if name.split(".")[0] == "torch" and any(p.startswith("_") for p in name.split("."))
        ]
    return found


# Left in place (listed in the compat module's docstring): step.py is another change's file.
_ALLOWED = {"step.py": ["torch.utils._pytree"]}


def test_private_torch_imports_live_in_the_compat_module() -> None:
    package = Path(torchjd_func.__file__).parent
    uses = {
        str(path.relative_to(package)): _private_torch_uses(path)
        for path in sorted(package.rglob("*.py"))
        if path.name != "_torch_compat.py"
    }
    assert {path: found for path, found in uses.items() if found} == _ALLOWED
    assert "torch._higher_order_ops" in _private_torch_uses(package / "_torch_compat.py")
    assert vars(torchjd_func._qp)["while_loop"] is _torch_compat.while_loop
    assert vars(torchjd_func._probes)["forward_hooks"] is _torch_compat.forward_hooks


def test_is_batchedtensor_sees_vmap() -> None:
    x = torch.zeros(3, 2)
    assert not _torch_compat.is_batchedtensor(x)
    seen = vmap(lambda row: torch.tensor(_torch_compat.is_batchedtensor(row)))(x)
    assert seen.all()


def test_dropped_reexport_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the re-export, `from torch._higher_order_ops import while_loop` finds the submodule
    # `torch._higher_order_ops.while_loop` (already imported by torch): a module, not the function.
    assert "torch._higher_order_ops.while_loop" in sys.modules
    monkeypatch.delattr(torch._higher_order_ops, "while_loop")
    with pytest.raises(ImportError) as info:
        _fresh_compat()
    _assert_advice(str(info.value), "torch._higher_order_ops.while_loop")
    assert "is a module, not a function" in str(info.value)


def test_missing_while_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = ModuleType("torch._higher_order_ops")
    stub.scan = torch._higher_order_ops.scan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch._higher_order_ops", stub)
    monkeypatch.delitem(sys.modules, "torch._higher_order_ops.while_loop")
    with pytest.raises(ImportError) as info:
        _fresh_compat()
    _assert_advice(str(info.value), "torch._higher_order_ops.while_loop")
    assert "cannot import name 'while_loop'" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_is_batchedtensor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch._C._functorch", ModuleType("torch._C._functorch"))
    with pytest.raises(ImportError) as info:
        _fresh_compat()
    _assert_advice(str(info.value), "torch._C._functorch.is_batchedtensor")


def test_forward_hooks_is_the_modules_dict() -> None:
    layer = nn.Linear(2, 2)
    hooks = forward_hooks(layer)
    assert hooks is layer._forward_hooks
    assert len(hooks) == 0
    handle = layer.register_forward_hook(lambda module, args, output: None)
    assert list(forward_hooks(layer)) == [handle.id]


def test_set_forward_hooks_replaces_and_restores() -> None:
    layer = nn.Linear(2, 2)
    x = torch.randn(2)
    expected = layer(x)
    original = forward_hooks(layer)
    set_forward_hooks(layer, OrderedDict([(0, lambda module, args, output: 2.0 * output)]))
    torch.testing.assert_close(layer(x), 2.0 * expected)
    set_forward_hooks(layer, original)
    assert forward_hooks(layer) is original
    torch.testing.assert_close(layer(x), expected)


def test_missing_forward_hooks_attribute_is_refused() -> None:
    layer = nn.Linear(2, 2)
    del layer._forward_hooks
    with pytest.raises(TypeError) as info:
        forward_hooks(layer)
    _assert_advice(str(info.value), "_forward_hooks")
    assert "it is NoneType, not a dict" in str(info.value)
    with pytest.raises(TypeError, match="`_forward_hooks` of Linear"):
        set_forward_hooks(layer, {})
    assert not hasattr(layer, "_forward_hooks")


def test_non_dict_forward_hooks_is_refused() -> None:
    layer = nn.Linear(2, 2)
    object.__setattr__(layer, "_forward_hooks", [])
    with pytest.raises(TypeError, match="it is list, not a dict"):
        forward_hooks(layer)


def test_set_forward_hooks_refuses_a_non_dict() -> None:
    layer = nn.Linear(2, 2)
    original = forward_hooks(layer)
    with pytest.raises(TypeError, match="`hooks` must be a dict, got list"):
        set_forward_hooks(layer, [])  # type: ignore[arg-type]
    assert forward_hooks(layer) is original
