"""Random (RLW): random positive weights ``w = softmax(ε)``, ``ε ~ N(0, I)``, at every step.

Random Loss Weighting, Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603.

The randomness is explicit: the state holds a key of the counter-based generator in
``torchjd_func._prng``, split at every call, so runs are reproducible and resumable.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torchjd_func._prng import check_seed, key_from_seed, normal, split
from torchjd_func.aggregation._base import (
    Delegated,
    GramianWeightedAggregator,
    GramianWeighting,
    Hyperparameter,
    PureWeighting,
    check_gramian,
    guard_nonfinite,
    nan_if_nonfinite,
)

__all__ = [
    "Random",
    "RandomState",
    "RandomWeighting",
    "keyed",
    "random_",
    "random_weights",
    "seed_or_draw",
]


class RandomState(NamedTuple):
    """State of randomised weightings."""

    key: Tensor
    """``[]`` int64: the key of the pseudo-random generator."""


def random_weights(gramian: Tensor, key: Tensor) -> Tensor:
    """``softmax(ε)`` with ``ε ~ N(0, I)`` drawn from ``key``, one draw per leading index.

    Args:
        gramian: Gramians ``[..., m, m]`` (only their shape and finiteness are used).
        key: ``[]`` int64 key (see :class:`RandomState`).

    Returns:
        Positive weights ``[..., m]`` summing to 1 (NaN for a non-finite Gramian).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import random_weights
        >>> w = random_weights(torch.eye(3), torch.tensor(7))
        >>> bool((w > 0).all()), round(float(w.sum()), 6)
        (True, 1.0)
    """
    check_gramian(gramian)
    work = torch.float64 if gramian.dtype == torch.float64 else torch.float32
    noise = normal(key.to(gramian.device), tuple(gramian.shape[:-1]), work)
    return nan_if_nonfinite(gramian, torch.softmax(noise, dim=-1).to(gramian.dtype))


def random_(*, seed: int = 0) -> PureWeighting[RandomState]:
    """The random weighting as a :class:`PureWeighting` whose state is a :class:`RandomState`.

    Args:
        seed: Seed of the key created by ``init``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import random_
        >>> weighting = random_(seed=0)
        >>> state = weighting.init(2)
        >>> w1, state = weighting.update(torch.eye(2), state)
        >>> w2, state = weighting.update(torch.eye(2), state)
        >>> bool((w1 != w2).any())
        True
    """

    return keyed(random_weights, seed)


def keyed(kernel: Callable[[Tensor, Tensor], Tensor], seed: int) -> PureWeighting[RandomState]:
    """A :class:`PureWeighting` of a randomised ``kernel(gramian, key)``: its state is a
    :class:`RandomState` whose key is split at every call (kept for a non-finite Gramian, see
    :func:`guard_nonfinite`)."""
    check_seed(seed)
    return PureWeighting(_KeyedInit(seed), guard_nonfinite(_KeyedUpdate(kernel)))


class _KeyedInit:
    """The ``init`` of :func:`keyed` (an object, not a closure, so that it pickles)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> RandomState:
        del m, dtype
        return RandomState(key_from_seed(self.seed, device))


class _KeyedUpdate:
    """The (unguarded) ``update`` of :func:`keyed`."""

    def __init__(self, kernel: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.kernel = kernel

    def __call__(self, gramian: Tensor, state: RandomState, /) -> tuple[Tensor, RandomState]:
        if not isinstance(state, RandomState):
            raise TypeError(
                f"Expected a RandomState (from this weighting's `init`), got {state!r}."
            )
        kept, used = split(state.key)
        return self.kernel(gramian, used), RandomState(kept)


def seed_or_draw(seed: int | None) -> int:
    """``seed``, or one drawn from torch's global generator (so ``torch.manual_seed`` applies)."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return check_seed(seed)


class RandomWeighting(GramianWeighting):
    """Weighting of :func:`random_weights`.

    Args:
        seed: Seed of the key; ``None`` draws it from torch's global generator at construction.
            Read-only afterwards (create a new object for another seed).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import RandomWeighting
        >>> RandomWeighting(seed=0)(torch.eye(3)).shape
        torch.Size([3])
    """

    seed = Hyperparameter[int](settable=False)

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed=seed_or_draw(seed))

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return random_(**hyperparameters)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return gramian.new_zeros(0)  # as TorchJD (the key is not split: nothing is drawn)


class Random(GramianWeightedAggregator):
    """Aggregator with random positive weights summing to 1 (RLW); differentiable.

    Args:
        seed: Seed of the key; ``None`` draws it from torch's global generator at construction.
            Read-only afterwards (create a new object for another seed).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Random
        >>> Random(seed=0)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))[1:]
        tensor([1.0000, 1.0000])
    """

    gramian_weighting: RandomWeighting
    seed = Delegated[int]()

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(RandomWeighting(seed))
