"""TrimmedMean (Yin et al., 2018): the coordinate-wise mean of the rows of the Jacobian, without
the ``trim_number`` largest and smallest values of each coordinate."""

from typing import Any

from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchjd_func._tree import from_leaves, leaves
from torchjd_func.aggregation._base import EmptyState, Hyperparameter
from torchjd_func.aggregation._kinds import (
    JacobianAggregating,
    JacobianAggregator,
    check_jacobian,
    guard_nonfinite_jacobian,
)

__all__ = ["TrimmedMean", "trimmed_mean", "trimmed_mean_update"]


def _check_trim_number(trim_number: object) -> int:
    if not isinstance(trim_number, int) or isinstance(trim_number, bool):
        raise TypeError(f"`trim_number` must be an int, got {type(trim_number).__name__}.")
    if trim_number < 0:
        raise ValueError(f"`trim_number` must be non-negative, got {trim_number}.")
    return trim_number


def trimmed_mean_update(jacobian: TensorDictBase, trim_number: int) -> TensorDict:
    """The coordinate-wise trimmed mean of the rows of ``jacobian`` ``[m, ...]``, params-shaped.

    Each coordinate's ``m`` values are sorted, the ``trim_number`` smallest and largest dropped
    and the ``m - 2·trim_number`` others averaged (Yin et al., `Byzantine-Robust Distributed
    Learning <https://proceedings.mlr.press/v80/yin18a/yin18a.pdf>`_). A NaN sorts last, as in
    TorchJD; any non-finite Jacobian gives a NaN update through :func:`trimmed_mean`.

    Raises:
        ValueError: fewer than ``2·trim_number + 1`` rows, or a negative ``trim_number``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import trimmed_mean_update
        >>> J = TensorDict({"w": torch.tensor([[1.0, 5.0], [2.0, -9.0], [30.0, 0.0]])}, [3])
        >>> trimmed_mean_update(J, trim_number=1)["w"]
        tensor([2., 0.])
    """
    _check_trim_number(trim_number)
    check_jacobian(jacobian)
    m = jacobian.batch_size[0]
    if m < 2 * trim_number + 1:
        raise ValueError(
            f"TrimmedMean with trim_number={trim_number} needs at least {2 * trim_number + 1} "
            f"rows (2·trim_number + 1), got a Jacobian with {m}. Lower `trim_number` or "
            "aggregate more losses."
        )
    kept = m - 2 * trim_number
    return from_leaves(
        {
            key: value.sort(dim=0).values.narrow(0, trim_number, kept).mean(dim=0)
            for key, value in leaves(jacobian).items()
        },
        batch_size=[],
    )


class _Init:
    def __call__(self, params: TensorDictBase, m: int, /) -> EmptyState:
        del params, m
        return EmptyState()


class _Update:
    def __init__(self, trim_number: int) -> None:
        self.trim_number = trim_number

    def __call__(
        self, jacobian: TensorDictBase, state: EmptyState, /
    ) -> tuple[TensorDict, Tensor | None, EmptyState]:
        if not isinstance(state, EmptyState):
            raise TypeError(f"Expected the EmptyState of TrimmedMean, got {state!r}.")
        return trimmed_mean_update(jacobian, self.trim_number), None, state


def trimmed_mean(trim_number: int) -> JacobianAggregator[EmptyState]:
    """TrimmedMean as a stateless :class:`JacobianAggregator` (it gives no weights).

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import trimmed_mean
        >>> aggregator = trimmed_mean(trim_number=1)
        >>> J = TensorDict({"w": torch.tensor([[1.0, 5.0], [2.0, -9.0], [30.0, 0.0]])}, [3])
        >>> update, weights, state = aggregator.update(J, aggregator.init(J[0], 3))
        >>> update["w"], weights
        (tensor([2., 0.]), None)
    """
    trim_number = _check_trim_number(trim_number)
    return JacobianAggregator(_Init(), guard_nonfinite_jacobian(_Update(trim_number)))


class TrimmedMean(JacobianAggregating):
    """TorchJD's ``TrimmedMean(trim_number)``: ``[m, n] -> [n]``, the column-wise mean without
    the ``trim_number`` largest and smallest values of each column (needs ``m ≥ 2·trim_number +
    1``). ``trim_number`` is a validated, settable property.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import TrimmedMean
        >>> TrimmedMean(trim_number=1)(torch.tensor([[1.0, 5.0], [2.0, -9.0], [30.0, 0.0]]))
        tensor([2., 0.])
    """

    trim_number: Hyperparameter[int] = Hyperparameter()

    def __init__(self, trim_number: int) -> None:
        super().__init__(trim_number=trim_number)

    def _build(self, **hyperparameters: Any) -> JacobianAggregator[EmptyState]:
        return trimmed_mean(**hyperparameters)

    def __str__(self) -> str:
        return f"TM{self.trim_number}"
