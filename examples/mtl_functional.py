"""Functional multi-task training with torchjd_func.

A shared trunk and two regression heads are trained on two conflicting tasks. Each step computes,
in one forward pass, the Jacobian of the two task losses with respect to the trunk (through the
features) and each head's own gradient (`mtl_jacobian`), turns the Jacobian into one update
direction with UPGrad (a pure weighting of its Gramian), and applies plain SGD to the parameter
TensorDicts. Nothing is mutated: parameters are values passed in and returned.

At every step the example also computes what the mean of the task gradients would have done and
prints, for both, ``J @ update``: the first-order decrease of each task's loss along the update.
The mean's can be negative (the step increases a task's loss); UPGrad's never is.

Run: ``python examples/mtl_functional.py [--steps N] [--weighting upgrad|mean]``
"""

import argparse

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import call, combine, gramian, mtl_jacobian, params_of
from torchjd_func.aggregation import PureWeighting, mean, upgrad

WEIGHTINGS: dict[str, PureWeighting] = {"upgrad": upgrad(), "mean": mean()}

trunk = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
heads = nn.ModuleDict({"task1": nn.Linear(8, 1), "task2": nn.Linear(8, 1)})


def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
    features: Tensor = call(trunk, params, x)
    return features


def heads_fn(params: TensorDict, features: Tensor, y1: Tensor, y2: Tensor) -> Tensor:
    out1 = call(heads["task1"], params["task1"], features).squeeze(1)
    out2 = call(heads["task2"], params["task2"], features).squeeze(1)
    return torch.stack([(out1 - y1).pow(2).mean(), (out2 - y2).pow(2).mean()])


def step(
    shared: TensorDict,
    head: TensorDict,
    x: Tensor,
    y1: Tensor,
    y2: Tensor,
    lr: float,
    weighting: PureWeighting,
) -> tuple[TensorDict, TensorDict, Tensor, dict[str, Tensor]]:
    """One Jacobian-descent step.

    Returns the new params, the losses, and ``J @ update`` per task for every weighting of
    ``WEIGHTINGS`` (the first-order decrease of each loss along that weighting's update).
    """
    out = mtl_jacobian(trunk_fn, heads_fn, shared, head, (x,), (y1, y2))
    gram = gramian(out.jacobian)  # [2, 2]: inner products of the task gradients
    decreases = {}
    for name, candidate in WEIGHTINGS.items():
        candidate_weights, _ = candidate.update(gram, candidate.init(2))
        decreases[name] = gram @ candidate_weights  # = J @ (Jᵀ w), without forming J
    weights, _ = weighting.update(gram, weighting.init(2))  # both weightings are stateless
    update = combine(out.jacobian, weights)
    return shared - lr * update, head - lr * out.head_grads, out.losses, decreases


def make_data(n_batches: int, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Two tasks that share inputs but pull the features in partly opposite directions."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches, batch_size, 10, generator=generator)
    direction = torch.randn(10, generator=generator)
    y1 = x @ direction + 0.1 * torch.randn(n_batches, batch_size, generator=generator)
    y2 = -0.5 * (x @ direction) + x[..., 0] ** 2
    return x, y1, y2


def main(steps: int = 200, lr: float = 0.05, weighting: str = "upgrad") -> dict[str, Tensor]:
    """Trains for ``steps`` steps with the given weighting.

    Returns the per-task losses ``[steps, 2]`` and, for every weighting, ``J @ update``
    ``[steps, 2]`` at every step.
    """
    torch.manual_seed(0)
    shared, head = params_of(trunk), params_of(heads)
    x, y1, y2 = make_data(n_batches=8, batch_size=32)
    losses_history, decreases_history = [], []
    print("step   task losses        J @ update (UPGrad)    J @ update (mean)")
    for i in range(steps):
        b = i % x.shape[0]
        shared, head, losses, decreases = step(
            shared, head, x[b], y1[b], y2[b], lr, WEIGHTINGS[weighting]
        )
        losses_history.append(losses)
        decreases_history.append(decreases)
        if i % 25 == 0 or i == steps - 1:
            up, mn = decreases["upgrad"].tolist(), decreases["mean"].tolist()
            print(
                f"{i:4d}   {losses[0].item():7.4f} {losses[1].item():7.4f}"
                f"   {up[0]:+9.4f} {up[1]:+9.4f}   {mn[0]:+9.4f} {mn[1]:+9.4f}"
            )
    history = {"losses": torch.stack(losses_history)}
    for name in WEIGHTINGS:
        history[name] = torch.stack([d[name] for d in decreases_history])
        increases = int((history[name] < 0).any(dim=1).sum())
        print(f"steps where {name}'s update increases a task's loss to first order: {increases}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weighting", choices=sorted(WEIGHTINGS), default="upgrad")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.lr, arguments.weighting)
