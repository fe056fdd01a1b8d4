import random
from collections.abc import Iterator

import pytest
import torch

from tests.settings import DEVICE

# Scripts that tests/test_typed_usage.py type-checks and runs in a subprocess; some lines are
# deliberate mistakes that raise, so pytest must not import them (as --doctest-modules would).
collect_ignore = ["typed_usage"]


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    random.seed(0)
    torch.manual_seed(0)
    deterministic = DEVICE.type == "cpu"
    torch.use_deterministic_algorithms(deterministic)
    yield
    torch.use_deterministic_algorithms(False)
