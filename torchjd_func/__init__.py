"""torchjd_func: functional Jacobian descent for PyTorch.

Jacobian descent trains a model on a vector of losses: compute the Jacobian of the losses (or only
its Gramian) with ``torch.func``, turn it into one update direction with an aggregator, and step.
Parameters, Jacobians and updates are TensorDicts keyed like the model's parameters.

This module holds the functional core (Jacobians, Gramians, combining, parameter groups). The
subpackages, each reachable as an attribute once ``torchjd_func`` is imported (loaded on first
use):

* ``torchjd_func.aggregation``: weightings of Gramians (pure kernels, ``(init, update)`` pairs)
  and the class-style aggregators with TorchJD's names (``UPGrad``, ``MGDA``, ...);
* ``torchjd_func.autojac``: TorchJD's autograd front door (``backward``, ``jac``,
  ``mtl_backward``, ``jac_to_grad``) on ordinary autograd graphs;
* ``torchjd_func.autogram``: ``Engine``, the Gramian of the losses w.r.t. hooked modules'
  parameters without materialising the Jacobian;
* ``torchjd_func.optim``: functional optimizers (SGD with momentum, Adam) over TensorDicts;
* ``torchjd_func.step``: whole Jacobian-descent training steps as pure functions, ready for
  ``torch.compile``.

The type aliases ``Params``, ``Jacobian`` (both ``TensorDict``), ``Gramian`` and ``Weights``
(both ``Tensor``) are importable from here for annotations (``from torchjd_func import Params``);
they are left out of ``__all__`` so that ``help(torchjd_func)`` does not document the whole of
``TensorDict`` and ``Tensor``.

Example:
    >>> import torch
    >>> from torchjd_func import call, combine, gramian, params_of, value_and_jacobian
    >>> model = torch.nn.Linear(4, 2)
    >>> params = params_of(model)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
    >>> def losses_fn(params, x, y):  # one loss per output: shape [2]
    ...     return (call(model, params, x) - y).pow(2).mean(dim=0)
    >>> losses, jac, _ = value_and_jacobian(losses_fn, params, x, y)
    >>> gramian(jac).shape
    torch.Size([2, 2])
    >>> update = combine(jac, torch.full((2,), 0.5))  # the mean of the two gradients
    >>> params = params - 0.1 * update

The subpackages after a plain ``import torchjd_func``:

    >>> import torchjd_func
    >>> torchjd_func.aggregation.UPGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
"""

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from torchjd_func._gramian import (
    accumulate_grads,
    combine,
    flatten_gramian,
    gramian,
    inner_products,
    reshape_weights,
)
from torchjd_func._grouping import (
    GroupingStrategy,
    Groups,
    group_gramians,
    group_params,
    split_by_group,
)
from torchjd_func._jacobian import (
    JacobianOutput,
    MTLJacobian,
    jacobian,
    mtl_jacobian,
    per_sample_jacobian,
    value_and_jacobian,
    value_and_per_sample_jacobian,
)
from torchjd_func._tree import call, params_of
from torchjd_func._types import Gramian as Gramian
from torchjd_func._types import Jacobian as Jacobian
from torchjd_func._types import Params as Params
from torchjd_func._types import Weights as Weights

if TYPE_CHECKING:
    from torchjd_func import aggregation as aggregation
    from torchjd_func import autogram as autogram
    from torchjd_func import autojac as autojac
    from torchjd_func import optim as optim
    from torchjd_func import step as step

__all__ = [
    "GroupingStrategy",
    "Groups",
    "JacobianOutput",
    "MTLJacobian",
    "accumulate_grads",
    "call",
    "combine",
    "flatten_gramian",
    "gramian",
    "group_gramians",
    "group_params",
    "inner_products",
    "jacobian",
    "mtl_jacobian",
    "params_of",
    "per_sample_jacobian",
    "reshape_weights",
    "split_by_group",
    "value_and_jacobian",
    "value_and_per_sample_jacobian",
]

__version__ = "0.1.0.dev0"

_SUBPACKAGES = ("aggregation", "autogram", "autojac", "optim", "step")


def _import_subpackage(name: str) -> ModuleType:
    # PEP 562: called for names missing from the module, so a subpackage not imported yet.
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not TYPE_CHECKING:
    # Hidden from type checkers, which would otherwise accept any attribute of the package (the
    # subpackages are imported for them above).
    __getattr__ = _import_subpackage


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})
