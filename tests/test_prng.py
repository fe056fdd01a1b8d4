"""The counter-based generator behind the randomised weightings."""

import torch

from torchjd_func._prng import key_from_seed, normal, permutations, split, uniform


def test_keys_are_deterministic_and_splits_differ() -> None:
    assert torch.equal(key_from_seed(3), key_from_seed(3))
    assert not torch.equal(key_from_seed(3), key_from_seed(4))
    kept, used = split(key_from_seed(0))
    assert len({int(key_from_seed(0)), int(kept), int(used)}) == 3
    assert 0 <= int(kept) < 2**32
    assert 0 <= int(used) < 2**32


def test_uniform_and_normal_moments() -> None:
    samples = uniform(key_from_seed(0), (200_000,), torch.float64)
    assert samples.min() > 0
    assert samples.max() < 1
    # Mean 1/2 and variance 1/12, within a few standard errors.
    assert abs(samples.mean().item() - 0.5) < 5e-3
    assert abs(samples.var().item() - 1 / 12) < 5e-3
    gaussian = normal(key_from_seed(1), (200_000,), torch.float64)
    assert abs(gaussian.mean().item()) < 1e-2
    assert abs(gaussian.std().item() - 1) < 1e-2
    # Successive keys give uncorrelated streams.
    first = uniform(split(key_from_seed(2))[0], (50_000,), torch.float64)
    second = uniform(split(key_from_seed(2))[1], (50_000,), torch.float64)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 2e-2


def test_permutations_are_orders_of_the_other_tasks() -> None:
    orders = permutations(key_from_seed(5), 6, torch.device("cpu"))
    assert orders.shape == (6, 5)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]
    # Every order of the two others appears for m = 3 over a few keys.
    key, seen = key_from_seed(0), set()
    for _ in range(40):
        key, used = split(key)
        seen.add(tuple(permutations(used, 3, torch.device("cpu"))[0].tolist()))
    assert seen == {(1, 2), (2, 1)}
