"""Small models used across the tests, each mapping inputs ``[B, ...]`` to outputs ``[B, M_OUT]``."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

M_OUT = 3
"""Number of outputs (tasks) of every model."""


class ReusedLayer(nn.Module):
    """Applies the same Linear layer twice: one parameter used twice in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.out = nn.Linear(5, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class TiedWeights(nn.Module):
    """Two layers sharing one weight tensor (registered under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.second = nn.Linear(5, 5)
        self.second.weight = self.first.weight
        self.out = nn.Linear(5, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


class MultiHead(nn.Module):
    """A shared trunk and one head per output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(M_OUT)])

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


class WithDirectParam(nn.Module):
    """A module with a parameter of its own beside its children (for per-layer grouping)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, M_OUT))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.scale


class SmallTransformer(nn.Module):
    """A Transformer encoder layer (dropout 0) on sequences ``[B, 4, 8]``, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.out = nn.Linear(8, M_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.encoder(x).mean(dim=1))


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, M_OUT)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3),
        nn.Tanh(),
        nn.Conv2d(3, 2, kernel_size=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, M_OUT),
    )


def _frozen() -> nn.Module:
    model = _mlp()
    for param in model[0].parameters():
        param.requires_grad_(False)
    return model


def _batchnorm_eval() -> nn.Module:
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        # Non-trivial running statistics, so that using the buffers matters.
        bn.running_mean = torch.randn(6)
        bn.running_var = torch.rand(6) + 0.5
        bn.weight.normal_()
        bn.bias.normal_()
    return nn.Sequential(nn.Linear(5, 6), bn, nn.Tanh(), nn.Linear(6, M_OUT)).eval()


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def __str__(self) -> str:
        return self.name


ARCHITECTURES = [
    Architecture("mlp", _mlp, (5,)),
    Architecture("cnn", _cnn, (2, 6, 6)),
    Architecture("multi_head", MultiHead, (5,)),
    Architecture("reused_layer", ReusedLayer, (5,)),
    Architecture("tied_weights", TiedWeights, (5,)),
    Architecture("frozen", _frozen, (5,)),
    Architecture("batchnorm_eval", _batchnorm_eval, (5,)),
    Architecture("direct_param", WithDirectParam, (5,)),
]


TRANSFORMER = Architecture("transformer", SmallTransformer, (4, 8))
"""Used by the front-door tests (with the functional-core architectures above)."""


def build(arch: Architecture, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return arch.build().to(dtype=dtype, device=device)


LossReduction = Callable[[Tensor], Tensor]

REDUCTIONS: dict[str, LossReduction] = {
    "[]": lambda squared: squared.mean(),
    "[m]": lambda squared: squared.mean(dim=0),
    "[B]": lambda squared: squared.mean(dim=1),
    "[B, m]": lambda squared: squared,
}
"""Ways to reduce the squared errors ``[B, m]`` to losses of each shape under test."""


def reference_jacobian(module: nn.Module, losses: Tensor) -> dict[str, Tensor]:
    """The Jacobian of ``losses`` w.r.t. the module's trainable parameters, by a loop of
    ``torch.autograd.grad`` (one backward pass per loss), leaves ``[*losses.shape, *p.shape]``."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    flat = losses.reshape(-1)
    rows: list[tuple[Tensor | None, ...]] = [
        torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        for loss in flat
    ]
    out: dict[str, Tensor] = {}
    for i, (name, param) in enumerate(named):
        column: list[Tensor] = []
        for row in rows:
            grad = row[i]
            column.append(torch.zeros_like(param) if grad is None else grad)
        out[name] = torch.stack(column).reshape(*losses.shape, *param.shape)
    return out
