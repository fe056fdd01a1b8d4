"""GradDrop: gradient sign dropout, coordinate by coordinate.

Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
NeurIPS 2020, https://arxiv.org/abs/2010.06808 (Algorithm 1, lines 10 to 15).

For every coordinate ``k`` of the parameters (every entry of every leaf of the Jacobian), with
``U_k`` uniform in ``(0, 1)``:

.. math::

    P_k = \\tfrac12 \\Big(1 + \\frac{\\sum_i J_{ik}}{\\sum_i |J_{ik}|}\\Big), \\quad
    M_{ik} = [f(P)_k > U_k]\\,[J_{ik} > 0] + [f(P)_k < U_k]\\,[J_{ik} < 0], \\quad
    d_k = \\sum_i (\\ell_i + (1 - \\ell_i) M_{ik}) J_{ik},

``f`` a monotonically increasing function (the identity by default) and ``ℓ`` the leaks (zero by
default). A coordinate where every row is zero gives ``P = NaN`` and ``d = 0``, as in TorchJD.

The uniforms come from the key in the state (``torchjd_func._prng``), split at every call: a run
is reproducible and a resumed run continues identically (TorchJD draws them with
``torch.rand``, so the two agree only given the same ``U``). ``f`` is applied once, to ``P`` of
all the coordinates flattened and concatenated in sorted leaf-key order (for a matrix ``J``
``[m, n]``, that is TorchJD's ``P`` ``[n]``). Like TorchJD's, the update is not differentiable
(the Jacobian is detached).
"""

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchjd_func._prng import check_seed, key_from_seed, split, uniform
from torchjd_func._tree import from_leaves
from torchjd_func.aggregation._base import Hyperparameter
from torchjd_func.aggregation._constant import check_vector
from torchjd_func.aggregation._flat import ordered_leaves, params_layout, work_dtype
from torchjd_func.aggregation._kinds import (
    JacobianAggregating,
    JacobianAggregator,
    check_jacobian,
    guard_nonfinite_jacobian,
)
from torchjd_func.aggregation._random import RandomState, seed_or_draw
from torchjd_func.aggregation._upgrad import pref_suffix

__all__ = ["GradDrop", "graddrop", "graddrop_update"]


def _identity(p: Tensor) -> Tensor:
    """The default ``f`` of GradDrop (a module-level function, so that it pickles)."""
    return p


def graddrop_update(
    jacobian: TensorDictBase,
    key: Tensor,
    *,
    f: Callable[[Tensor], Tensor] = _identity,
    leak: Tensor | None = None,
) -> TensorDict:
    """GradDrop's update: the rows' entries kept by sign dropout, summed, coordinate by coordinate.

    Args:
        jacobian: A Jacobian TensorDict, ``batch_size [m]`` (leaves ``[m, *param.shape]``).
        key: ``[]`` int64 key of the uniforms ``U`` (see ``torchjd_func._prng``).
        f: Applied to ``P`` ``[n]`` (all coordinates, in sorted leaf-key order); it must return
            a tensor of the same shape. Monotonically increasing, per the paper.
        leak: Leaks ``ℓ`` ``[m]`` (how much of each row always passes); ``None`` means zero.

    Returns:
        The update, params-shaped (each leaf in its dtype; computed in at least float32).

    Raises:
        TypeError: ``jacobian`` is not a Jacobian TensorDict, or ``f`` does not return a Tensor.
        ValueError: ``leak`` does not have one entry per row, or ``f`` changes the shape of ``P``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import graddrop_update
        >>> J = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> graddrop_update(J, torch.tensor(0))["w"]  # the 1s always pass (P = 1)
        tensor([6., 2., 2.])
    """
    check_jacobian(jacobian)
    m = jacobian.batch_size[0]
    found = ordered_leaves(jacobian)
    dtype = work_dtype([value for _, value in found])
    rows = [value.detach().to(dtype).reshape(m, -1) for _, value in found]
    purity = torch.cat([0.5 * (1.0 + r.sum(0) / r.abs().sum(0)) for r in rows])
    f_purity = f(purity)
    if not isinstance(f_purity, Tensor):
        raise TypeError(f"`f` must return a Tensor, got {type(f_purity).__name__}.")
    if f_purity.shape != purity.shape:
        raise ValueError(
            f"`f` must keep the shape of P, {list(purity.shape)}, got {list(f_purity.shape)}: "
            "it is applied to P of all coordinates at once and should act entrywise."
        )
    # 24 random bits in float32 and float64 alike: the same key gives the same U in both.
    noise = uniform(key.to(purity.device), tuple(purity.shape), torch.float32).to(dtype)
    coefficients = None
    if leak is not None:
        if leak.shape != (m,):
            raise ValueError(
                f"`leak` has shape {list(leak.shape)} but the Jacobian has {m} rows: give one "
                "leak per row."
            )
        coefficients = leak.to(dtype=dtype, device=purity.device).unsqueeze(1)
    out: dict[tuple[str, ...], Tensor] = {}
    offset = 0
    for (name, value), r in zip(found, rows, strict=True):
        size = r.shape[1]
        fp, u = f_purity[offset : offset + size], noise[offset : offset + size]
        offset += size
        kept = ((fp > u) & (r > 0)) | ((fp < u) & (r < 0))
        mask = kept.to(dtype)
        if coefficients is not None:
            mask = coefficients + (1.0 - coefficients) * mask
        out[name] = (mask * r).sum(0).reshape(value.shape[1:]).to(value.dtype)
    return from_leaves(out, batch_size=[])


def graddrop(
    f: Callable[[Tensor], Tensor] = _identity, leak: Tensor | None = None, *, seed: int = 0
) -> JacobianAggregator[RandomState]:
    """GradDrop as a :class:`~torchjd_func.aggregation.JacobianAggregator` whose state is a
    :class:`~torchjd_func.aggregation.RandomState`; its weights are ``None`` (the update is not
    a weighting of the rows). See :func:`graddrop_update`.

    Args:
        f: Applied to the purities ``P``; monotonically increasing, entrywise.
        leak: Leaks ``[m]``, or ``None`` for no leak.
        seed: Seed of the key created by ``init``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import graddrop
        >>> J = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> aggregator = graddrop(seed=0)
        >>> update, weights, state = aggregator.update(J, aggregator.init(J, 2))
        >>> update["w"], weights
        (tensor([6., 2., 2.]), None)
    """
    if not callable(f):
        raise TypeError(f"`f` must be a callable Tensor -> Tensor, got {type(f).__name__}.")
    if leak is not None:
        check_vector(leak, "leak")
    check_seed(seed)
    return JacobianAggregator(
        _GradDropInit(seed), guard_nonfinite_jacobian(_GradDropUpdate(f, leak))
    )


class _GradDropInit:
    """The ``init`` of :func:`graddrop` (an object, not a closure, so that it pickles)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, params: TensorDictBase, m: int, /) -> RandomState:
        del m
        _, _, device = params_layout(params)
        return RandomState(key_from_seed(self.seed, device))


class _GradDropUpdate:
    """The (unguarded) ``update`` of :func:`graddrop`."""

    def __init__(self, f: Callable[[Tensor], Tensor], leak: Tensor | None) -> None:
        self.f = f
        self.leak = leak

    def __call__(
        self, jacobian: TensorDictBase, state: RandomState, /
    ) -> tuple[TensorDict, Tensor | None, RandomState]:
        if not isinstance(state, RandomState):
            raise TypeError(f"Expected a RandomState (from `graddrop(...).init`), got {state!r}.")
        kept, used = split(state.key)
        update = graddrop_update(jacobian, used, f=self.f, leak=self.leak)
        return update, None, RandomState(kept)


class GradDrop(JacobianAggregating):
    """Aggregator of GradDrop's sign dropout, ``[m, n] -> [n]`` (:func:`graddrop_update`); not
    differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        f: Applied to the purities ``P`` ``[n]``; monotonically increasing, entrywise. Defaults
            to the identity.
        leak: Leaks ``[m]`` (how much of each row always passes), or ``None`` for no leak.
        seed: Seed of the key of the uniforms; ``None`` draws it from torch's global generator
            at construction. Read-only afterwards (create a new object for another seed).

    ``f`` and ``leak`` are properties that can be set later (checked as here; the key is kept).
    A matrix with no row or no column gives zeros ``[n]``, as in TorchJD.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import GradDrop
        >>> aggregator = GradDrop(seed=0)
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([6., 2., 2.])
        >>> aggregator.leak = torch.tensor([1.0, 0.0])
        >>> str(aggregator)
        'GradDrop([1., 0.])'
    """

    _differentiable = False
    f = Hyperparameter[Callable[[Tensor], Tensor]]()
    leak = Hyperparameter[Tensor | None]()
    seed = Hyperparameter[int](settable=False)

    def __init__(
        self,
        f: Callable[[Tensor], Tensor] = _identity,
        leak: Tensor | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(f=f, leak=leak, seed=seed_or_draw(seed))

    def _build(self, **hyperparameters: Any) -> JacobianAggregator[Any]:
        return graddrop(**hyperparameters)

    def forward(self, matrix: Tensor, /) -> Tensor:
        if matrix.shape[0] == 0:
            leak = self.leak
            if leak is not None and leak.shape[0] != 0:
                raise ValueError(
                    f"`leak` has {leak.shape[0]} entries but the matrix has no row: give one "
                    "leak per row."
                )
            return matrix.new_zeros(matrix.shape[1])
        return super().forward(matrix)

    def __str__(self) -> str:
        return f"GradDrop{pref_suffix(self.leak)}"
