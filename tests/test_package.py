"""The package as users meet it: ``help()``, the subpackages as attributes, the type aliases."""

import importlib
import os
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor

import torchjd_func
from torchjd_func import Gramian, Jacobian, Params, Weights, params_of

SUBPACKAGES = ["aggregation", "autogram", "autojac", "optim", "step"]
ROOT = Path(torchjd_func.__file__).parents[1]


def _help_text(name: str) -> str:
    return pydoc.plain(pydoc.render_doc(importlib.import_module(name)))


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` on this checkout of the package (not another installed copy)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )


@pytest.mark.parametrize("name", ["torchjd_func", *(f"torchjd_func.{s}" for s in SUBPACKAGES)])
def test_help_documents_no_torch_or_tensordict_class(name: str) -> None:
    text = _help_text(name)
    assert "class TensorDict" not in text
    assert "class Tensor(" not in text
    assert "class TensorDictBase" not in text


@pytest.mark.parametrize(
    "name", ["torchjd_func", *(f"torchjd_func.{s}" for s in SUBPACKAGES if s != "aggregation")]
)
def test_help_is_short(name: str) -> None:
    # The aggregators are `nn.Module`s: pydoc lists the methods each inherits, so
    # `help(torchjd_func.aggregation)` is long without documenting any torch class itself.
    assert len(_help_text(name).splitlines()) < 2000


def test_help_shows_the_library_api() -> None:
    text = _help_text("torchjd_func")
    for name in torchjd_func.__all__:
        assert name in text
    for subpackage in SUBPACKAGES:
        assert f"``torchjd_func.{subpackage}``:" in text  # the map in the package docstring


def test_type_aliases_are_importable_but_not_in_all() -> None:
    assert Params is TensorDict
    assert Jacobian is TensorDict
    assert Gramian is Tensor
    assert Weights is Tensor
    assert not {"Params", "Jacobian", "Gramian", "Weights"} & set(torchjd_func.__all__)
    for name in torchjd_func.__all__:
        value = getattr(torchjd_func, name)
        if isinstance(value, type):  # a class of the library, not one of torch or tensordict
            assert value.__module__.startswith("torchjd_func."), name


def test_type_aliases_annotate() -> None:
    # mypy (run on the tests) checks these annotations and `torchjd_func.aggregation.UPGrad`.
    def shifted(params: Params, by: float) -> Params:
        return params + by

    model = torch.nn.Linear(3, 2)
    params = shifted(params_of(model), 1.0)
    torch.testing.assert_close(params["weight"], model.weight.detach() + 1.0)
    weights: Weights = torch.full((2,), 0.5)  # orthogonal gradients: UPGrad is their mean
    direction = torchjd_func.aggregation.UPGrad()(torch.eye(2))
    torch.testing.assert_close(direction, weights)


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_subpackage_is_imported_on_first_access(subpackage: str) -> None:
    module = f"torchjd_func.{subpackage}"
    result = _run_python(
        "import sys, torchjd_func\n"
        f"assert {module!r} not in sys.modules, 'imported eagerly'\n"
        f"sub = torchjd_func.{subpackage}\n"
        f"assert sub is sys.modules[{module!r}]\n"
        f"assert sub.__name__ == {module!r}\n"
        "print(torchjd_func.__file__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == Path(torchjd_func.__file__)


def test_lazy_access_in_a_fresh_interpreter() -> None:
    result = _run_python("import torchjd_func; print(torchjd_func.aggregation.UPGrad.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UPGrad"


def test_dir_lists_the_subpackages() -> None:
    names = dir(torchjd_func)
    assert set(SUBPACKAGES) <= set(names)
    assert set(torchjd_func.__all__) <= set(names)
    assert names == sorted(names)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"^module 'torchjd_func' has no attribute 'nope'$"):
        torchjd_func.nope  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(torchjd_func, "_types_")
    assert getattr(torchjd_func, "nope", None) is None


def test_unknown_name_cannot_be_imported_from() -> None:
    with pytest.raises(ImportError, match="cannot import name 'nope' from 'torchjd_func'"):
        exec("from torchjd_func import nope")
