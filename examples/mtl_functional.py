"""Functional multi-task training with torchjd_func.

A shared trunk and two regression heads are trained on two tasks. Each step computes, in one
forward pass, the Jacobian of the two task losses with respect to the trunk (through the features)
and each head's own gradient (`mtl_jacobian`), turns the Jacobian into one update direction with a
weighting of its Gramian, and applies plain SGD to the parameter TensorDicts. Nothing is mutated:
parameters are values passed in and returned.

The weighting here is the mean of the task gradients; the aggregation module replaces it with
conflict-aware weightings such as UPGrad.

Run: ``python examples/mtl_functional.py [--steps N]``
"""

import argparse

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import call, combine, gramian, mtl_jacobian, params_of

trunk = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
heads = nn.ModuleDict({"task1": nn.Linear(8, 1), "task2": nn.Linear(8, 1)})


def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
    features: Tensor = call(trunk, params, x)
    return features


def heads_fn(params: TensorDict, features: Tensor, y1: Tensor, y2: Tensor) -> Tensor:
    out1 = call(heads["task1"], params["task1"], features).squeeze(1)
    out2 = call(heads["task2"], params["task2"], features).squeeze(1)
    return torch.stack([(out1 - y1).pow(2).mean(), (out2 - y2).pow(2).mean()])


def mean_weights(gramian_: Tensor) -> Tensor:
    """The mean weighting: ``1/m`` for each of the ``m`` losses (uses only the Gramian's size)."""
    m = gramian_.shape[0]
    return torch.full((m,), 1.0 / m, dtype=gramian_.dtype, device=gramian_.device)


def step(
    shared: TensorDict, head: TensorDict, x: Tensor, y1: Tensor, y2: Tensor, lr: float
) -> tuple[TensorDict, TensorDict, Tensor, Tensor]:
    """One Jacobian-descent step; returns new params, the losses and the Gramian."""
    out = mtl_jacobian(trunk_fn, heads_fn, shared, head, (x,), (y1, y2))
    gram = gramian(out.jacobian)  # [2, 2]: inner products of the task gradients
    update = combine(out.jacobian, mean_weights(gram))
    return shared - lr * update, head - lr * out.head_grads, out.losses, gram


def make_data(n_batches: int, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Two tasks that share inputs but pull the features in partly opposite directions."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches, batch_size, 10, generator=generator)
    direction = torch.randn(10, generator=generator)
    y1 = x @ direction + 0.1 * torch.randn(n_batches, batch_size, generator=generator)
    y2 = -0.5 * (x @ direction) + x[..., 0] ** 2
    return x, y1, y2


def main(steps: int = 200, lr: float = 0.05) -> list[list[float]]:
    """Trains for ``steps`` steps and returns the per-task losses of every step."""
    torch.manual_seed(0)
    shared, head = params_of(trunk), params_of(heads)
    x, y1, y2 = make_data(n_batches=8, batch_size=32)
    history: list[list[float]] = []
    for i in range(steps):
        b = i % x.shape[0]
        shared, head, losses, gram = step(shared, head, x[b], y1[b], y2[b], lr)
        history.append(losses.tolist())
        if i % 50 == 0 or i == steps - 1:
            cosine = gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt()
            print(
                f"step {i:4d}  task losses {losses[0].item():7.4f} {losses[1].item():7.4f}"
                f"  cos(g1, g2) {cosine.item():+.3f}"
            )
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    arguments = parser.parse_args()
    main(arguments.steps, arguments.lr)
