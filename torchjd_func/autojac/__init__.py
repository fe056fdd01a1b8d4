"""The familiar autograd front door: ``backward``, ``jac``, ``mtl_backward``, ``jac_to_grad``.

Drop-in for ``torchjd.autojac``: these work on the autograd graph of tensors computed the usual
way, store Jacobians in the ``.jac`` fields of parameters and aggregate them into ``.grad``. They
share the chunked vector-Jacobian helper of the functional core and the aggregation kernels of
:mod:`torchjd_func.aggregation`.

Example:
    >>> import torch
    >>> from torchjd_func.aggregation import UPGrad
    >>> from torchjd_func.autojac import backward, jac_to_grad
    >>> model = torch.nn.Linear(3, 2)
    >>> losses = model(torch.randn(8, 3)).pow(2).mean(dim=0)  # two losses
    >>> backward(losses)
    >>> weights = jac_to_grad(model.parameters(), UPGrad())
    >>> model.weight.grad.shape
    torch.Size([2, 3])
"""

from torchjd_func.autojac._backward import backward, jac
from torchjd_func.autojac._jac_to_grad import jac_to_grad
from torchjd_func.autojac._mtl_backward import mtl_backward

__all__ = ["backward", "jac", "jac_to_grad", "mtl_backward"]
