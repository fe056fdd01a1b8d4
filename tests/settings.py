"""Device and dtype under test, read from the environment.

``PYTEST_TORCH_DEVICE`` (default ``cpu``) and ``PYTEST_TORCH_DTYPE`` (``float32`` or ``float64``,
default ``float32``) let the same suite run in float64 or on CUDA, e.g.
``PYTEST_TORCH_DEVICE=cuda:0 PYTEST_TORCH_DTYPE=float64 python -m pytest``.
"""

import os

import torch

DEVICE = torch.device(os.environ.get("PYTEST_TORCH_DEVICE", "cpu"))

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_dtype_name = os.environ.get("PYTEST_TORCH_DTYPE", "float32")
if _dtype_name not in _DTYPES:
    raise ValueError(f"PYTEST_TORCH_DTYPE must be one of {sorted(_DTYPES)}, got {_dtype_name!r}.")
DTYPE = _DTYPES[_dtype_name]
