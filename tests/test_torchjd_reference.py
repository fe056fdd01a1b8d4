"""Our weightings against TorchJD 0.18's own implementation (quadprog, Frank-Wolfe, CPU loops)."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from torchjd_func.aggregation import (
    DualProjWeighting,
    GradVacWeighting,
    MGDAWeighting,
    PCGradWeighting,
    UPGradWeighting,
    Weighting,
)

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


def _matrices() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for m, n, rank in [(2, 3, 2), (3, 5, 3), (5, 4, 4), (8, 20, 8), (8, 20, 3), (16, 10, 10)]:
        left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
        right = torch.randn(rank, n, generator=generator, dtype=torch.float64)
        scale = 10.0 ** torch.randint(-3, 4, (m, 1), generator=generator)
        out.append(scale * (left @ right))
    return out


PAIRS: list[tuple[Callable[[], Weighting], Callable[[], torch.nn.Module], float]] = [
    (UPGradWeighting, lambda: torchjd_aggregation.UPGradWeighting(), 1e-6),
    (DualProjWeighting, lambda: torchjd_aggregation.DualProjWeighting(), 1e-6),
]


@pytest.mark.parametrize("matrix", _matrices(), ids=lambda j: f"{j.shape[0]}x{j.shape[1]}")
@pytest.mark.parametrize(("ours", "theirs", "tol"), PAIRS, ids=["upgrad", "dualproj"])
def test_weights_match_torchjd(
    ours: Callable[[], Weighting],
    theirs: Callable[[], torch.nn.Module],
    tol: float,
    matrix: Tensor,
) -> None:
    gramian = matrix @ matrix.T
    expected = theirs()(gramian)
    actual = ours()(gramian)
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(tol * scale))


@pytest.mark.parametrize("matrix", _matrices(), ids=lambda j: f"{j.shape[0]}x{j.shape[1]}")
def test_mgda_reaches_at_least_torchjd_min_norm(matrix: Tensor) -> None:
    # MGDA's weights are not unique when the gradients are (nearly) dependent, so compare the
    # objective αᵀGα in trace-normalised units: ours is no worse than a long Frank-Wolfe run.
    gramian = matrix @ matrix.T
    theirs = torchjd_aggregation.MGDAWeighting(epsilon=1e-7, max_iters=20000)(gramian)
    ours = MGDAWeighting()(gramian)
    assert (ours >= 0).all()
    torch.testing.assert_close(ours.sum(), torch.tensor(1.0, dtype=torch.float64))
    trace = gramian.trace()
    assert (ours @ gramian @ ours) / trace <= (theirs @ gramian @ theirs) / trace + 1e-9


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: GradVacWeighting(beta=0.3),
            lambda: torchjd_aggregation.GradVacWeighting(beta=0.3),
        ),
        (PCGradWeighting, lambda: torchjd_aggregation.PCGradWeighting()),
    ],
    ids=["gradvac", "pcgrad"],
)
def test_two_task_surgery_matches_torchjd_over_several_steps(
    ours: Callable[[], Weighting], theirs: Callable[[], torch.nn.Module]
) -> None:
    # With two tasks the random order plays no role, so the runs must agree step by step.
    generator = torch.Generator().manual_seed(1)
    mine, reference = ours(), theirs()
    for _ in range(6):
        matrix = torch.randn(2, 7, generator=generator, dtype=torch.float64)
        gramian = matrix @ matrix.T
        torch.testing.assert_close(mine(gramian), reference(gramian), rtol=1e-10, atol=1e-10)
