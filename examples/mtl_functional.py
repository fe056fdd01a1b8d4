"""Multi-task training with compiled Jacobian-descent steps: UPGrad against the mean.

A shared trunk and two regression heads learn two deliberately conflicting tasks (the second
target pulls the shared features against the first). The same model, from the same
initialisation, is trained twice with a compiled `mtl_step` (one graph: forward, Jacobian of the
task losses through the features, aggregation, SGD with momentum): once aggregating the task
gradients with UPGrad, once with their mean. Parameters are TensorDicts passed in and returned.

The per-task losses of both runs are printed side by side, with `J @ d`: the first-order decrease
of each task's loss along the aggregated direction `d`. The mean's is sometimes negative (its
step increases a task's loss); UPGrad's never is. With matplotlib installed, the loss curves are
written to a PNG.

Run: ``python examples/mtl_functional.py [--steps N] [--no-compile] [--plot PATH]``
"""

import argparse
import importlib.util
import warnings
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from torchjd_func import call, params_of
from torchjd_func.aggregation import PureWeighting, mean, upgrad
from torchjd_func.optim import sgd
from torchjd_func.step import StepFn, mtl_step

# Printed by torch's own compiler (torch 2.13), not by this example.
warnings.filterwarnings("ignore", message="`torch._prims_common.check` is deprecated")

torch.manual_seed(0)
trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
heads = nn.ModuleDict({"task1": nn.Linear(16, 1), "task2": nn.Linear(16, 1)})
WEIGHTINGS: dict[str, PureWeighting[Any]] = {"upgrad": upgrad(), "mean": mean()}


def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
    features: Tensor = call(trunk, params, x)
    return features


def heads_fn(params: TensorDict, features: Tensor, y1: Tensor, y2: Tensor) -> Tensor:
    out1 = call(heads["task1"], params["task1"], features).squeeze(1)
    out2 = call(heads["task2"], params["task2"], features).squeeze(1)
    return torch.stack([(out1 - y1).pow(2).mean(), (out2 - y2).pow(2).mean()])


def make_data(n_batches: int, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Two tasks on the same inputs: the second target is anti-correlated with the first along
    ``direction`` and adds a non-linear term, so the tasks pull the shared features apart."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches, batch_size, 10, generator=generator)
    direction = torch.randn(10, generator=generator)
    y1 = x @ direction + 0.1 * torch.randn(n_batches, batch_size, generator=generator)
    y2 = -0.8 * (x @ direction) + (x[..., :3] ** 2).sum(-1)
    return x, y1, y2


def train(
    weighting: PureWeighting[Any], steps: int, lr: float, compile_step: bool
) -> dict[str, Tensor]:
    """Trains from the shared initialisation; returns the losses and ``J @ d`` of every step."""
    optimizer = sgd(lr, momentum=0.5)
    step: StepFn[Any, Any] = mtl_step(trunk_fn, heads_fn, weighting, optimizer)
    if compile_step:
        step = torch.compile(step, fullgraph=True)
    params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)})
    opt_state, agg_state = optimizer.init(params), weighting.init(2)
    x, y1, y2 = make_data(n_batches=8, batch_size=32)
    losses, decreases = [], []
    for i in range(steps):
        b = i % x.shape[0]
        out = step(params, opt_state, agg_state, ((x[b],), (y1[b], y2[b])))
        params, opt_state, agg_state = out.params, out.opt_state, out.agg_state
        losses.append(out.metrics["losses"])
        decreases.append(out.metrics["decrease"])
    return {"losses": torch.stack(losses), "decrease": torch.stack(decreases)}


def plot(histories: dict[str, dict[str, Tensor]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for task, axis in enumerate(axes):
        for name, history in histories.items():
            axis.plot(history["losses"][:, task].tolist(), label=name)
        axis.set_title(f"task {task + 1}")
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.legend()
    axes[0].set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(path)
    print(f"loss curves written to {path}")


def main(
    steps: int = 200, lr: float = 0.05, compile_step: bool = True, plot_path: str | None = None
) -> dict[str, dict[str, Tensor]]:
    """Trains with every weighting of ``WEIGHTINGS``; returns their histories."""
    histories = {
        name: train(weighting, steps, lr, compile_step) for name, weighting in WEIGHTINGS.items()
    }
    print("step   UPGrad losses       mean losses         J @ d (UPGrad)      J @ d (mean)")
    for i in [*range(0, steps, max(1, steps // 8)), steps - 1]:
        row = [histories[name][key][i].tolist() for key in ("losses",) for name in WEIGHTINGS]
        row += [histories[name]["decrease"][i].tolist() for name in WEIGHTINGS]
        print(f"{i:4d}   " + "   ".join(f"{a:+8.4f} {b:+8.4f}" for a, b in row))
    for name, history in histories.items():
        final = history["losses"][-8:].mean(dim=0).tolist()
        increases = int((history["decrease"] < 0).any(dim=1).sum())
        print(
            f"{name:>6}: final losses {final[0]:.4f} {final[1]:.4f}; steps whose update increases "
            f"a task's loss to first order: {increases}/{steps}"
        )
    if plot_path is not None:
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
        else:
            plot(histories, plot_path)
    return histories


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--no-compile", action="store_true", help="run the steps eagerly")
    parser.add_argument(
        "--plot", default="loss_curves.png", help="where to write the plot ('none': no plot)"
    )
    arguments = parser.parse_args()
    plot_path = None if arguments.plot == "none" else arguments.plot
    main(arguments.steps, arguments.lr, not arguments.no_compile, plot_path)
