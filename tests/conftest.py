import random
from collections.abc import Iterator

import pytest
import torch

from tests.settings import DEVICE


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    random.seed(0)
    torch.manual_seed(0)
    deterministic = DEVICE.type == "cpu"
    torch.use_deterministic_algorithms(deterministic)
    yield
    torch.use_deterministic_algorithms(False)
