"""The Euclidean projection onto the probability simplex, sort-based, batched, torch-native.

For ``y`` ``[..., m]`` sorted in decreasing order ``s``, with ``t_k = (s_1 + ... + s_k − 1) / k``,
the projection is ``max(y − θ, 0)`` where ``θ = t_k`` for the first ``k < m`` with
``t_k > s_{k+1}``, and ``θ = t_m`` if there is none (Held, Wolfe & Crowder 1974; the rule of
TorchJD's and of the official MoDo/SDMGrad implementations, here without a Python loop on the
values: the first such ``k`` is an ``argmax`` over a boolean mask).
"""

import torch
from torch import Tensor

__all__ = ["project_onto_simplex"]


def project_onto_simplex(y: Tensor) -> Tensor:
    """``argmin_{x ≥ 0, Σx = 1} ‖x − y‖`` for each vector of ``y`` ``[..., m]``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation._simplex import project_onto_simplex
        >>> project_onto_simplex(torch.tensor([0.695, -0.305]))
        tensor([1., 0.])
        >>> project_onto_simplex(torch.tensor([0.5, 0.3, 0.4]))
        tensor([0.4333, 0.2333, 0.3333])
    """
    m = y.shape[-1]
    ordered = torch.sort(y, dim=-1, descending=True).values
    counts = torch.arange(1, m + 1, dtype=y.dtype, device=y.device)
    thresholds = (torch.cumsum(ordered, dim=-1) - 1.0) / counts
    # ``stop[k]``: t_k > s_{k+1}; the last entry is always a stop (θ = t_m).
    stop = torch.cat(
        [
            thresholds[..., :-1] > ordered[..., 1:],
            torch.ones_like(thresholds[..., :1], dtype=torch.bool),
        ],
        dim=-1,
    )
    first = torch.argmax(stop.to(torch.uint8), dim=-1, keepdim=True)
    theta = torch.gather(thresholds, -1, first)
    return (y - theta).clamp(min=0.0)
