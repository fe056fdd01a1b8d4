"""Every private torch API that torchjd_func imports, in one place.

torch does not promise to keep its underscore-prefixed modules stable. Importing them here, and
only here, means that a torch release which moves one fails at ``import torchjd_func`` with an
:class:`ImportError` naming the API, the installed torch version and the supported range, instead
of an obscure error deep inside a training step. torchjd_func supports torch >= 2.13 (tested on
2.13).

Imported here:

* ``torch._C._functorch.is_batchedtensor``: whether a tensor is a ``vmap`` batched tensor (the QP
  solver picks its loop form with it);
* ``torch._higher_order_ops.scan`` and ``torch._higher_order_ops.while_loop``: the loops of the QP
  solver that ``torch.compile`` traces into one graph;
* ``torch.utils._pytree``'s ``tree_flatten``, ``tree_leaves``, ``tree_map``, ``tree_map_only`` and
  ``tree_unflatten`` (the pytrees that ``torch.compile`` understands).

Wrapped here, as they are attributes rather than imports:

* ``nn.Module._forward_hooks``: :func:`forward_hooks` and :func:`set_forward_hooks` read and
  replace a module's dict of forward hooks (the per-sample Gramian probes swap the whole dict,
  which dynamo traces, rather than calling ``register_forward_hook``, which breaks the graph).

Private torch APIs used elsewhere, left in place:

* ``torch._foreach_*`` (:mod:`torchjd_func.optim`): public by convention (``torch.optim`` is built
  on them) and looked up at call time;
* ``import torch.utils._pytree as pytree`` in :mod:`torchjd_func.step`;
* the tensor attributes ``Tensor._version`` (in-place modification checks in
  :mod:`torchjd_func._probes` and :mod:`torchjd_func.autogram`) and ``Tensor._is_view()``
  (:mod:`torchjd_func.autogram`);
* ``nn.Module._apply``, overridden by the aggregators (:mod:`torchjd_func.aggregation`);
* ``torch._dynamo`` is only named in comments and docstrings (:mod:`torchjd_func.step`); the
  package asks ``torch.compiler.is_compiling()``, which is public.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "forward_hooks",
    "is_batchedtensor",
    "scan",
    "set_forward_hooks",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_map_only",
    "tree_unflatten",
    "while_loop",
]

SUPPORTED = "torchjd_func supports torch >= 2.13 (tested on 2.13)"


def _advice() -> str:
    return (
        f"The installed torch is {torch.__version__}; {SUPPORTED}. Install a supported torch "
        "(e.g. `pip install 'torch==2.13.*'`)."
    )


def _moved(api: str, cause: object) -> ImportError:
    return ImportError(
        f"torchjd_func needs the private torch API `{api}`, which the installed torch does not "
        f"provide (it moved or was removed: {cause}). {_advice()}"
    )


def _check_callable(api: str, value: object) -> None:
    # `from package import name` falls back to the submodule `package.name`: a torch that dropped a
    # re-export but kept the file would hand over a module.
    if not callable(value):
        raise _moved(api, f"`{api}` is a {type(value).__name__}, not a function")


try:
    from torch._C._functorch import is_batchedtensor
except ImportError as error:
    raise _moved("torch._C._functorch.is_batchedtensor", error) from error

try:
    from torch._higher_order_ops import scan
except ImportError as error:
    raise _moved("torch._higher_order_ops.scan", error) from error

try:
    from torch._higher_order_ops import while_loop
except ImportError as error:
    raise _moved("torch._higher_order_ops.while_loop", error) from error

try:
    from torch.utils._pytree import (
        tree_flatten,
        tree_leaves,
        tree_map,
        tree_map_only,
        tree_unflatten,
    )
except ImportError as error:
    raise _moved("torch.utils._pytree", error) from error

_check_callable("torch._C._functorch.is_batchedtensor", is_batchedtensor)
_check_callable("torch._higher_order_ops.scan", scan)
_check_callable("torch._higher_order_ops.while_loop", while_loop)


Hooks = dict[Any, Callable[..., Any]]
"""A module's forward hooks, keyed by their handle's id (an ``OrderedDict`` in torch 2.13)."""


def _hooks_error(module: nn.Module, problem: str) -> TypeError:
    return TypeError(
        f"torchjd_func swaps the private attribute `_forward_hooks` of {type(module).__name__}, "
        f"but {problem}: torch's `nn.Module` internals changed. {_advice()}"
    )


def forward_hooks(module: nn.Module) -> Hooks:
    """The dict of forward hooks of ``module`` (its private ``_forward_hooks``), checked.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> handle = layer.register_forward_hook(lambda module, args, output: None)
        >>> len(forward_hooks(layer))
        1
    """
    hooks = getattr(module, "_forward_hooks", None)
    if not isinstance(hooks, dict):
        raise _hooks_error(module, f"it is {type(hooks).__name__}, not a dict")
    return hooks


def set_forward_hooks(module: nn.Module, hooks: Hooks) -> None:
    """Replace the dict of forward hooks of ``module`` by ``hooks`` (put back the original after).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> original = forward_hooks(layer)
        >>> set_forward_hooks(layer, {0: lambda module, args, output: output + 1.0})
        >>> bool((layer(torch.zeros(2)) == layer.bias + 1.0).all())
        True
        >>> set_forward_hooks(layer, original)
        >>> bool((layer(torch.zeros(2)) == layer.bias).all())
        True
    """
    forward_hooks(module)  # the attribute must exist and be a dict before it is replaced
    if not isinstance(hooks, dict):
        raise TypeError(f"`hooks` must be a dict, got {type(hooks).__name__}.")
    module._forward_hooks = hooks
