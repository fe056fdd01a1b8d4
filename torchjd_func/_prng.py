"""A counter-based pseudo-random generator made of tensor ops: explicit keys, no global state.

Randomised weightings (Random, PCGrad, GradVac) keep a key in their state and split it at every
call, so a run is reproducible, a resumed run continues identically, and everything compiles with
``fullgraph=True`` and runs on any device (no ``torch.Generator``, no host synchronisation).

A key is a 0-d ``int64`` tensor holding a 32-bit value. Random bits come from hashing
``(key, counter)`` with the "lowbias32" integer hash (Chris Wellons' hash-prospector), computed
with 64-bit integer ops that never overflow: every product is split into 16-bit halves.
"""

import math

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


def check_seed(seed: object) -> int:
    """Checks that ``seed`` is an int in ``[0, 2**32)``, the range of distinct keys."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if not 0 <= seed <= _MASK32:
        raise ValueError(
            f"`seed` must be in [0, 2**32) (keys have 32 bits: others would collide), got {seed}."
        )
    return seed


def key_from_seed(seed: int, device: torch.device | str | None = None) -> Tensor:
    """A key ``[]`` (int64) from an integer seed in ``[0, 2**32)``."""
    check_seed(seed)
    # The offset keeps seed 0 away from 0, a fixed point of the hash.
    return _hash32(torch.tensor((seed ^ 0x9E3779B9) & _MASK32, dtype=torch.int64, device=device))


def split(key: Tensor) -> tuple[Tensor, Tensor]:
    """Two new independent keys from ``key``: one to keep in the state, one to use now."""
    return _hash32(key ^ 0x5BD1E995), _hash32(key + 0x68E31DA4)


def _bits(key: Tensor, shape: tuple[int, ...]) -> Tensor:
    counter = torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=key.device)
    return _hash32(_hash32(counter * 0x9E3779B1 + 1) ^ key).reshape(shape)


def uniform(key: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Uniform samples in ``(0, 1)`` of the given floating-point shape and dtype.

    Each is ``(2k + 1) / 2**(b + 1)`` for ``b = min(24, mantissa bits of dtype)`` random bits
    ``k``: exact in ``dtype``, so even float16 and bfloat16 never round to 0 or 1.
    """
    bits = min(24, round(-math.log2(torch.finfo(dtype).eps)))  # mantissa bits
    odd = 2 * (_bits(key, shape) >> (32 - bits)) + 1
    return odd.to(dtype) / float(1 << (bits + 1))


def normal(key: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Standard normal samples (Box-Muller on two uniform streams), rounded to ``dtype``.

    They are computed in float32 (float64 for float64): in float16 or bfloat16 the coarse
    uniforms would give a coarse, truncated distribution.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    key_radius, key_angle = split(key)
    radius = torch.sqrt(-2.0 * torch.log(uniform(key_radius, shape, work)))
    return (radius * torch.cos(2.0 * torch.pi * uniform(key_angle, shape, work))).to(dtype)


def permutations(key: Tensor, m: int, device: torch.device) -> Tensor:
    """``[m, m - 1]``: row ``i`` is a uniformly random order of ``{0, ..., m-1} \\ {i}``."""
    scores = uniform(key, (m, m), torch.float64).to(device)
    eye = torch.eye(m, dtype=torch.bool, device=device)
    # Self gets the largest score, so it sorts last and is dropped.
    scores = torch.where(eye, torch.full_like(scores, 2.0), scores)
    return torch.argsort(scores, dim=1, stable=True)[:, : m - 1]
