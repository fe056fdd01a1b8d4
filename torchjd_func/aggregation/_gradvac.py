"""PCGrad and GradVac: gradient surgery, pair by pair, in a random order per task.

* PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
  https://arxiv.org/abs/2001.06782 (Alg. 1). Each task's gradient is projected onto the normal
  plane of every other task's gradient it conflicts with.
* GradVac: Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
  Massively Multilingual Models", ICLR 2021, https://arxiv.org/abs/2010.05874 (Alg. 1). Each
  gradient is moved so that its cosine similarity with every other gradient reaches at least an
  exponential moving average ``φ̂`` of past similarities. With ``φ̂ = 0`` it is PCGrad.

Both return the **sum** of the corrected gradients ``Σ_i g_i^PC``, as TorchJD does. Working on the
Gramian, the corrected gradient of task ``i`` is ``Σ_k C[i, k] g_k``; the weights are ``C.sum(0)``.
For task ``i`` and each other task ``j`` in a random order, with ``c = C[i]``:

.. math::

    \\phi = \\frac{(cG)_j}{\\|c^\\top J\\| \\|g_j\\| + \\epsilon}, \\qquad
    \\text{if } \\phi < \\hat\\phi_{ij}:\\ C_{ij} \\mathrel{+}= \\frac{\\|c^\\top J\\|
    (\\hat\\phi_{ij}\\sqrt{1-\\phi^2} - \\phi\\sqrt{1-\\hat\\phi_{ij}^2})}
    {\\|g_j\\|\\sqrt{1-\\hat\\phi_{ij}^2} + \\epsilon}, \\qquad
    \\hat\\phi_{ij} \\leftarrow (1-\\beta)\\hat\\phi_{ij} + \\beta\\phi.

All tasks are processed at once (one static loop over the ``m − 1`` partners, vectorised over the
tasks): each task only reads and writes its own row of ``C`` and of ``φ̂``, so this is exactly the
sequential algorithm. The task orders come from the key in the state. Like TorchJD's, these
weightings are not differentiable (the Gramian is detached). A non-finite Gramian gives NaN
weights, and the factories' ``update`` then returns the state unchanged (``guard_nonfinite``).
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor

from torchjd_func._prng import check_seed, key_from_seed, permutations, split
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
from torchjd_func.aggregation._random import RandomState, keyed, seed_or_draw
from torchjd_func.aggregation._upgrad import check_eps

__all__ = [
    "GradVac",
    "GradVacState",
    "GradVacWeighting",
    "PCGrad",
    "PCGradWeighting",
    "gradvac",
    "gradvac_weights",
    "pcgrad",
    "pcgrad_weights",
]


class GradVacState(NamedTuple):
    """State of GradVac."""

    targets: Tensor
    """``[m, m]``: the EMA ``φ̂`` of the cosine similarities, row = task corrected."""
    key: Tensor
    """``[]`` int64: key of the pseudo-random generator for the task orders."""


def _surgery(
    gramian: Tensor, orders: Tensor, targets: Tensor | None, beta: float, eps: float
) -> tuple[Tensor, Tensor | None]:
    """The weights ``C.sum(0)`` and the new targets (``None``: PCGrad's rule)."""
    g = gramian.detach()
    m = g.shape[-1]
    coefficients = torch.eye(m, dtype=g.dtype, device=g.device).expand_as(g)
    projected = g  # row i: C[i] @ G
    squared_norms = g.diagonal(dim1=-2, dim2=-1)
    for t in range(m - 1):
        partner = orders[:, t]  # [m]: the partner of each task at this step
        one_hot = torch.nn.functional.one_hot(partner, m).to(g.dtype)
        inner = (projected * one_hot).sum(-1)  # (C[i] G)[j_i]
        partner_norm2 = squared_norms[..., partner]
        if targets is None:
            safe = torch.where(partner_norm2 > 0, partner_norm2, torch.ones_like(partner_norm2))
            step = torch.where(inner < 0, -inner / safe, torch.zeros_like(inner))
        else:
            norm_i = (projected * coefficients).sum(-1).clamp(min=0).sqrt()
            norm_j = partner_norm2.clamp(min=0).sqrt()
            cosine = inner / (norm_i * norm_j + eps)
            target = (targets * one_hot).sum(-1)
            sine = (1 - cosine**2).clamp(min=0).sqrt()
            target_sine = (1 - target**2).clamp(min=0).sqrt()
            raised = norm_i * (target * sine - cosine * target_sine) / (norm_j * target_sine + eps)
            step = torch.where(cosine < target, raised, torch.zeros_like(raised))
            new_target = (1 - beta) * target + beta * cosine
            targets = targets + one_hot * (new_target - target).unsqueeze(-1)
        coefficients = coefficients + step.unsqueeze(-1) * one_hot
        projected = projected + step.unsqueeze(-1) * g.index_select(-2, partner)
    return coefficients.sum(-2), targets


def pcgrad_weights(gramian: Tensor, key: Tensor) -> Tensor:
    """PCGrad's weights (the sum of the projected gradients), task orders drawn from ``key``.

    Args:
        gramian: PSD Gramians ``[..., m, m]``.
        key: ``[]`` int64 key for the random task orders.

    Returns:
        Weights ``[..., m]``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import pcgrad_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> pcgrad_weights(J @ J.T, torch.tensor(0))
        tensor([2.2222, 1.5789])
    """
    check_gramian(gramian)
    orders = permutations(key, gramian.shape[-1], gramian.device)
    weights, _ = _surgery(gramian, orders, None, 0.0, 0.0)
    return nan_if_nonfinite(gramian, weights)


def gradvac_weights(
    gramian: Tensor, targets: Tensor, key: Tensor, *, beta: float = 0.5, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """GradVac's weights and updated targets ``φ̂``.

    Args:
        gramian: PSD Gramians ``[..., m, m]``.
        targets: The EMA targets ``φ̂`` ``[m, m]`` (zeros at the start).
        key: ``[]`` int64 key for the random task orders.
        beta: EMA rate of the targets.
        eps: Added to denominators.

    Returns:
        ``(weights [..., m], new targets)``: NaN weights (and targets) for a non-finite Gramian.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import gradvac_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weights, targets = gradvac_weights(J @ J.T, torch.zeros(2, 2), torch.tensor(0))
        >>> weights
        tensor([2.2222, 1.5789])
    """
    check_gramian(gramian)
    m = gramian.shape[-1]
    if targets.shape[-2:] != (m, m):
        raise ValueError(
            f"GradVac's targets have shape {list(targets.shape)} but the Gramian is for {m} "
            "losses: re-initialise the state."
        )
    if targets.device != gramian.device:
        raise ValueError(
            f"GradVac's targets are on {targets.device} but the Gramian is on {gramian.device}: "
            f"create the state on the Gramian's device, `init(m, device={str(gramian.device)!r})`."
        )
    orders = permutations(key, m, gramian.device)
    weights, new_targets = _surgery(gramian, orders, targets.to(gramian.dtype), beta, eps)
    assert new_targets is not None
    return nan_if_nonfinite(gramian, weights), new_targets


def pcgrad(*, seed: int = 0) -> PureWeighting[RandomState]:
    """PCGrad as a :class:`PureWeighting` whose state is a :class:`RandomState`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import pcgrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> pcgrad().update(J @ J.T, pcgrad().init(2))[0]
        tensor([2.2222, 1.5789])
    """

    return keyed(pcgrad_weights, seed)


def gradvac(beta: float = 0.5, eps: float = 1e-8, *, seed: int = 0) -> PureWeighting[GradVacState]:
    """GradVac as a :class:`PureWeighting` whose state is a :class:`GradVacState`.

    Args:
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: Added to denominators, non-negative.
        seed: Seed of the key created by ``init``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import gradvac
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = gradvac()
        >>> state = weighting.init(2)
        >>> first, state = weighting.update(J @ J.T, state)
        >>> second, state = weighting.update(J @ J.T, state)
        >>> first, second
        (tensor([2.2222, 1.5789]), tensor([1.8580, 1.4064]))
    """
    if check_eps(beta, "beta") > 1:
        raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
    check_eps(eps, "eps")
    check_seed(seed)
    return PureWeighting(_GradVacInit(seed), guard_nonfinite(_GradVacUpdate(beta, eps)))


class _GradVacInit:
    """The ``init`` of :func:`gradvac` (an object, not a closure, so that it pickles)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> GradVacState:
        targets = torch.zeros(m, m, dtype=dtype, device=device)
        return GradVacState(targets, key_from_seed(self.seed, device))


class _GradVacUpdate:
    """The (unguarded) ``update`` of :func:`gradvac`."""

    def __init__(self, beta: float, eps: float) -> None:
        self.beta = beta
        self.eps = eps

    def __call__(self, gramian: Tensor, state: GradVacState, /) -> tuple[Tensor, GradVacState]:
        if not isinstance(state, GradVacState):
            raise TypeError(
                f"Expected a GradVacState (from `gradvac(...).init(m)`), got {state!r}."
            )
        kept, used = split(state.key)
        weights, targets = gradvac_weights(
            gramian, state.targets, used, beta=self.beta, eps=self.eps
        )
        return weights, GradVacState(targets, kept)


class PCGradWeighting(GramianWeighting):
    """Weighting of :func:`pcgrad_weights`; not differentiable (runs under ``torch.no_grad()``), as
    in TorchJD.

    Args:
        seed: Seed of the key; ``None`` draws it from torch's global generator at construction.
            Read-only afterwards (create a new object for another seed).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import PCGradWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> PCGradWeighting()(J @ J.T)
        tensor([2.2222, 1.5789])
    """

    _differentiable = False
    seed = Hyperparameter[int](settable=False)

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed=seed_or_draw(seed))

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return pcgrad(**hyperparameters)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return gramian.new_zeros(0)  # as TorchJD: no gradient, no surgery


class PCGrad(GramianWeightedAggregator):
    """Aggregator summing the gradients after PCGrad's surgery; not differentiable (runs under
    ``torch.no_grad()``), as in TorchJD.

    Args:
        seed: Seed of the key; ``None`` draws it from torch's global generator at construction.
            Read-only afterwards (create a new object for another seed).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import PCGrad
        >>> PCGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.5848, 3.8012, 3.8012])
    """

    _differentiable = False
    gramian_weighting: PCGradWeighting
    seed = Delegated[int]()

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(PCGradWeighting(seed))


class GradVacWeighting(GramianWeighting):
    """Weighting of :func:`gradvac_weights`, holding the targets ``φ̂`` in ``state``; not
    differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: Added to denominators.
        seed: Seed of the key; ``None`` draws it from torch's global generator at construction.
            Read-only afterwards (create a new object for another seed).

    ``beta`` and ``eps`` are properties that can be set later (checked as here; the targets are
    kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import GradVacWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = GradVacWeighting()
        >>> weighting(J @ J.T), weighting(J @ J.T)
        (tensor([2.2222, 1.5789]), tensor([1.8580, 1.4064]))
        >>> weighting.reset()
        >>> weighting(J @ J.T)
        tensor([2.2222, 1.5789])
    """

    _differentiable = False
    beta = Hyperparameter[float]()
    eps = Hyperparameter[float]()
    seed = Hyperparameter[int](settable=False)

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None) -> None:
        super().__init__(beta=beta, eps=eps, seed=seed_or_draw(seed))

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return gradvac(**hyperparameters)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return gramian.new_zeros(0)  # as TorchJD: no gradient, no surgery


class GradVac(GramianWeightedAggregator):
    """Aggregator summing the gradients after GradVac's surgery; stateful (``reset()``); not
    differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: Added to denominators.
        seed: Seed of the key; ``None`` draws it from torch's global generator at construction.
            Read-only afterwards (create a new object for another seed).

    ``beta`` and ``eps`` are properties that can be set later (checked as here; the targets are
    kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import GradVac
        >>> aggregator = GradVac()
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> aggregator(J), aggregator(J)
        (tensor([0.5848, 3.8012, 3.8012]), tensor([1.0065, 3.2644, 3.2644]))
    """

    _differentiable = False
    gramian_weighting: GradVacWeighting
    beta = Delegated[float]()
    eps = Delegated[float]()
    seed = Delegated[int]()

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None) -> None:
        super().__init__(GradVacWeighting(beta, eps, seed))
