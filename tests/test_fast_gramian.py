"""The closed-form per-layer Gramians of the autogram Engine (``batch_dim`` set) against a Gramian
built from a loop of ``torch.autograd.grad`` and against the Engine's generic per-sample path."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from tests.settings import DEVICE
from tests.utils import reference_gramian
from tests.utils import token_ids as shared_token_ids
from torchjd_func import flatten_gramian
from torchjd_func.autogram import Engine, _fast

BATCH = 4
M = 3
DTYPES = [torch.float32, torch.float64]
TOLERANCES = {torch.float32: (1e-4, 3e-5), torch.float64: (1e-9, 1e-11)}


def assert_close(actual: Tensor, expected: Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture
def dispatch() -> Iterator[dict[str, int]]:
    """The counts of the ways taken during the test."""
    _fast.DISPATCH.clear()
    yield _fast.DISPATCH
    _fast.DISPATCH.clear()


class CNN(nn.Module):
    """Conv2d (many positions: materialised) -> Conv2d -> Conv1d (few positions: ghost) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, kernel_size=3, stride=2)
        self.conv3 = nn.Conv1d(8, 16, kernel_size=3, padding=1)
        self.head = nn.Linear(16, M)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))  # [B, 8, 2, 2]
        h = torch.tanh(self.conv3(h.flatten(2)))  # [B, 16, 4]
        return self.head(h.mean(dim=2))


class Sequence(nn.Module):
    """Embedding (with padding_idx) -> Linear on ``[B, T, d]`` -> mean over ``T`` -> Linear."""

    def __init__(self, vocabulary: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dim, padding_idx=0)
        self.linear = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, M)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.linear(self.embedding(ids))).mean(dim=1))


def token_ids(vocabulary: int, length: int) -> Tensor:
    return shared_token_ids(vocabulary, BATCH, length, DEVICE)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], Tensor]
    ways: tuple[str, ...]
    """The ways that must be taken (whatever the number of rows)."""

    def __str__(self) -> str:
        return self.name


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, M))


CASES = [
    Case("mlp", mlp, lambda dt: torch.randn(BATCH, 6, dtype=dt, device=DEVICE), ("linear.ghost",)),
    Case(
        "cnn",
        CNN,
        lambda dt: torch.randn(BATCH, 2, 5, 5, dtype=dt, device=DEVICE),
        ("conv.materialise", "conv.ghost", "linear.ghost"),
    ),
    # Long sequences of narrow tokens: materialising is cheaper.
    Case(
        "sequence_materialise",
        lambda: Sequence(10, 4, 3),
        lambda dt: token_ids(10, 6),
        ("embedding.materialise", "linear.materialise", "linear.ghost"),
    ),
    # Short sequences of wide tokens: the ghost way is cheaper.
    Case(
        "sequence_ghost",
        lambda: Sequence(50, 32, 32),
        lambda dt: token_ids(50, 2),
        ("embedding.ghost", "linear.ghost"),
    ),
]

OUTPUTS: dict[str, Callable[[Tensor], Tensor]] = {
    "[B]": lambda out: (out**2).sum(dim=1),
    "[B, m]": lambda out: out**2,
}


def engine_gramian(model: nn.Module, x: Tensor, shape: str, fast: bool) -> tuple[Tensor, Tensor]:
    engine = Engine(model, batch_dim=0)
    engine._fast_gramians = fast
    output = OUTPUTS[shape](model(x))
    return flatten_gramian(engine.compute_gramian(output)), output


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(OUTPUTS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_equals_reference_and_generic(
    case: Case, shape: str, dtype: torch.dtype, dispatch: dict[str, int]
) -> None:
    model = case.build().to(dtype=dtype, device=DEVICE)
    x = case.inputs(dtype)
    fast, output = engine_gramian(model, x, shape, fast=True)
    # Every layer took a closed form: the generic re-run never ran.
    assert dispatch.get("generic", 0) == 0
    for way in case.ways:
        assert dispatch.get(way, 0) > 0, (way, dict(dispatch))
    assert_close(fast, reference_gramian((model,), output))
    generic, _ = engine_gramian(model, x, shape, fast=False)
    assert dispatch["generic"] > 0
    assert_close(fast, generic)


def check(model: nn.Module, output_of: Callable[[], Tensor], batch_dim: int = 0) -> None:
    engine = Engine(model, batch_dim=batch_dim)
    output = output_of()
    gramian = engine.compute_gramian(output)
    assert gramian.shape == (*output.shape, *reversed(output.shape))
    assert_close(flatten_gramian(gramian), reference_gramian((model,), output))


def test_other_output_shapes(dispatch: dict[str, int]) -> None:
    dtype = torch.float64
    model = CNN().to(dtype=dtype, device=DEVICE)
    x = torch.randn(BATCH, 2, 5, 5, dtype=dtype, device=DEVICE)
    check(model, lambda: model(x).T ** 2, batch_dim=1)  # [m, B]
    check(model, lambda: (model(x) ** 2).mean(dim=0), batch_dim=1)  # [m]: reduced over the batch
    check(model, lambda: (model(x) ** 2).sum())  # scalar
    check(model, lambda: model(x).unsqueeze(2).expand(BATCH, M, 2) ** 2)  # [B, m, 2]
    seq = Sequence(10, 4, 3).to(dtype=dtype, device=DEVICE)
    ids = token_ids(10, 6)
    check(seq, lambda: (seq(ids) ** 2).sum())
    assert dispatch.get("generic", 0) == 0


def test_frozen_absent_and_shared_parameters(dispatch: dict[str, int]) -> None:
    dtype = torch.float64
    model = nn.Sequential(
        nn.Linear(5, 6, bias=False),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
        nn.Tanh(),
        nn.Linear(4, M),
    ).to(dtype=dtype, device=DEVICE)
    model[2].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    x = torch.randn(BATCH, 5, dtype=dtype, device=DEVICE)
    check(model, lambda: model(x) ** 2)
    assert dispatch["linear.bias_only"] > 0
    assert dispatch.get("generic", 0) == 0

    # A layer called twice (its calls are summed as more positions), and input given by keyword.
    layer, head = nn.Linear(5, 5).to(dtype), nn.Linear(5, M).to(dtype)
    pair = nn.ModuleList([layer, head]).to(device=DEVICE)
    check(pair, lambda: head(torch.tanh(layer(input=torch.tanh(layer(x))))) ** 2)
    assert dispatch.get("generic", 0) == 0

    # Tied weights: the generic path for the tied pair, the closed form for the rest.
    first, second = nn.Linear(5, 5).to(dtype), nn.Linear(5, 5).to(dtype)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(5, M).to(dtype))
    model = model.to(device=DEVICE)
    check(model, lambda: model(x) ** 2)
    assert dispatch["generic"] == 2


def test_convolution_variants(dispatch: dict[str, int]) -> None:
    dtype = torch.float64
    model = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=(2, 3), padding="same", dilation=(2, 1)),
        nn.Tanh(),
        nn.Conv2d(4, 4, kernel_size=2, padding=1, padding_mode="circular", bias=False),
        nn.Tanh(),
        nn.Flatten(2),
        nn.Conv1d(4, 3, kernel_size=4, stride=2, padding="valid"),
        nn.Tanh(),
        nn.Conv1d(3, 2, kernel_size=2, padding=1, padding_mode="reflect"),
        nn.Flatten(),
    ).to(dtype=dtype, device=DEVICE)
    x = torch.randn(BATCH, 2, 4, 5, dtype=dtype, device=DEVICE)
    check(model, lambda: model(x) ** 2)
    assert dispatch.get("generic", 0) == 0
    # groups != 1: the generic path, with the same result.
    grouped = nn.Sequential(nn.Conv1d(4, 4, kernel_size=2, groups=2), nn.Flatten())
    grouped = grouped.to(dtype=dtype, device=DEVICE)
    z = torch.randn(BATCH, 4, 3, dtype=dtype, device=DEVICE)
    check(grouped, lambda: grouped(z) ** 2)
    assert dispatch["generic"] == 1


def test_embedding_variants(dispatch: dict[str, int]) -> None:
    dtype = torch.float64
    # Ids [B] (one token per sample), a negative padding_idx.
    embedding = nn.Embedding(7, 3, padding_idx=-1).to(dtype=dtype, device=DEVICE)
    ids = torch.tensor([1, 6, 1, 2], device=DEVICE)
    check(embedding, lambda: embedding(ids) ** 2)
    # Ids [B, 2, 3] (more leading dims), int32, no padding_idx.
    embedding = nn.Embedding(5, 3).to(dtype=dtype, device=DEVICE)
    ids = torch.randint(0, 5, (BATCH, 2, 3), device=DEVICE, dtype=torch.int32)
    check(embedding, lambda: embedding(ids).sum(dim=(1, 2)) ** 2)
    assert dispatch.get("generic", 0) == 0
    # max_norm renormalises the weight in place: left to the generic path, which keeps its error.
    embedding = nn.Embedding(5, 3, max_norm=1.0).to(dtype=dtype, device=DEVICE)
    ids = torch.randint(0, 5, (BATCH, 2), device=DEVICE)
    engine = Engine(embedding, batch_dim=0)
    with pytest.raises(RuntimeError, match="Re-running Embedding"):
        engine.compute_gramian(embedding(ids).sum(dim=(1, 2)))
    assert dispatch["generic"] == 1


def test_ghost_in_blocks(monkeypatch: pytest.MonkeyPatch, dispatch: dict[str, int]) -> None:
    monkeypatch.setattr(_fast, "_BLOCK_ELEMENTS", 50)
    dtype = torch.float64
    for case in CASES:
        model = case.build().to(dtype=dtype, device=DEVICE)
        x = case.inputs(dtype)
        check(model, lambda: model(x) ** 2)  # noqa: B023
    assert dispatch.get("generic", 0) == 0


def test_choice_of_the_way() -> None:
    def operands(kind: str, rows: int, batch: int, positions: int, n_in: int, n_out: int) -> bool:
        inputs = torch.zeros(batch, positions, n_in)
        cotangents = torch.zeros(rows, batch, positions, n_out)
        return _fast.use_ghost(_fast._Operands(kind, inputs, cotangents, n_in))

    # One position: the ghost way always costs less.
    assert operands("linear", 1, 1024, 1, 256, 256)
    assert operands("linear", 4, 8, 1, 2, 2)
    # Many positions and narrow layers: materialising costs less; short and wide: ghost.
    assert not operands("linear", 1, 32, 100, 64, 64)
    assert operands("linear", 1, 32, 2, 256, 256)
    assert not operands("conv", 1, 4, 36, 18, 3)


@pytest.mark.parametrize("ghost", [True, False])
def test_each_way_alone_is_exact(
    ghost: bool, monkeypatch: pytest.MonkeyPatch, dispatch: dict[str, int]
) -> None:
    monkeypatch.setattr(_fast, "use_ghost", lambda operands: ghost)
    dtype = torch.float64
    for case in CASES:
        model = case.build().to(dtype=dtype, device=DEVICE)
        x = case.inputs(dtype)
        check(model, lambda: model(x) ** 2)  # noqa: B023
        check(model, lambda: (model(x) ** 2).sum())  # noqa: B023
    way = "ghost" if ghost else "materialise"
    assert {key.split(".")[1] for key in dispatch} == {way}
