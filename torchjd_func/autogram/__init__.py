"""autogram: the Gramian of a Jacobian w.r.t. module parameters, without the Jacobian.

:class:`Engine` is the seed-compatible front door of TorchJD's ``torchjd.autogram``: hook the
modules once, then, after each forward pass, ``engine.compute_gramian(losses)`` gives the
generalized Gramian ``[*s, *reversed(s)]`` of the losses (shape ``s``), from which a weighting
extracts weights for ``losses.backward(weights)``. It reduces Jacobians to Gramians with
:func:`torchjd_func.gramian`, module by module.
"""

from torchjd_func.autogram._engine import Engine

__all__ = ["Engine"]
