"""A counter-based pseudo-random generator made of tensor ops: explicit keys, no global state.

Randomised weightings (Random, PCGrad, GradVac) keep a key in their state and split it at every
call, so a run is reproducible, a resumed run continues identically, and everything compiles with
``fullgraph=True`` and runs on any device (no ``torch.Generator``, no host synchronisation).

A key is a 0-d ``int64`` tensor holding a 32-bit value. Random bits come from hashing
``(key, counter)`` with the "lowbias32" integer hash (Chris Wellons' hash-prospector), computed
with 64-bit integer ops that never overflow: every product is split into 16-bit halves.
"""

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, constant: int) -> Tensor:
    """``a * constant mod 2**32`` for ``0 <= a < 2**32``, without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (a * low + (((a * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key_from_seed(seed: int, device: torch.device | str | None = None) -> Tensor:
    """A key ``[]`` (int64) from a Python integer seed."""
    # The offset keeps seed 0 away from 0, a fixed point of the hash.
    return _hash32(torch.tensor((seed ^ 0x9E3779B9) & _MASK32, dtype=torch.int64, device=device))


def split(key: Tensor) -> tuple[Tensor, Tensor]:
    """Two new independent keys from ``key``: one to keep in the state, one to use now."""
    return _hash32(key ^ 0x5BD1E995), _hash32(key + 0x68E31DA4)


def _bits(key: Tensor, shape: tuple[int, ...]) -> Tensor:
    counter = torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=key.device)
    return _hash32(_hash32(counter * 0x9E3779B1 + 1) ^ key).reshape(shape)


def uniform(key: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Uniform samples in ``(0, 1)`` of the given shape (24 random bits each)."""
    return ((_bits(key, shape) >> 8).to(dtype) + 0.5) / float(1 << 24)


def normal(key: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Standard normal samples (Box-Muller on two uniform streams)."""
    key_radius, key_angle = split(key)
    radius = torch.sqrt(-2.0 * torch.log(uniform(key_radius, shape, dtype)))
    return radius * torch.cos(2.0 * torch.pi * uniform(key_angle, shape, dtype))


def permutations(key: Tensor, m: int, device: torch.device) -> Tensor:
    """``[m, m - 1]``: row ``i`` is a uniformly random order of ``{0, ..., m-1} \\ {i}``."""
    scores = uniform(key, (m, m), torch.float64).to(device)
    eye = torch.eye(m, dtype=torch.bool, device=device)
    # Self gets the largest score, so it sorts last and is dropped.
    scores = torch.where(eye, torch.full_like(scores, 2.0), scores)
    return torch.argsort(scores, dim=1, stable=True)[:, : m - 1]
