"""Seed 003 (per-group aggregation with stateful GradVac) written with the functional core.

``seed_003_*.py`` call ``jac_to_grad`` once per group with one ``GradVac`` instance per group.
Here one call to ``aggregate_groups`` aggregates every group with its own explicit GradVac state,
for each of the four strategies of the Gradient Vaccine paper. The models and data are created
in the same order as in the seeds, so with the same ``torch.manual_seed`` both train to the same
weights.

Run: ``python examples/functional_003_grouping.py [--strategy per_layer]``
"""

import argparse

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.nn import Linear, ReLU, Sequential
from torch.nn.functional import mse_loss

from torchjd_func import GroupingStrategy, call, group_params, mtl_jacobian, params_of
from torchjd_func.aggregation import aggregate_groups, gradvac, init_group_states

STRATEGIES: list[GroupingStrategy] = ["together", "per_network", "per_layer", "per_tensor"]


def main(strategy: GroupingStrategy = "per_layer") -> tuple[TensorDict, TensorDict]:
    """Trains like the seed of ``strategy``; returns the final shared and head parameters."""
    if strategy == "per_network":
        # One group per sub-network: the seed splits the encoder into encoder + decoder.
        encoder: nn.Module = nn.ModuleDict(
            {
                "encoder": Sequential(Linear(10, 5), ReLU()),
                "decoder": Sequential(Linear(5, 3), ReLU()),
            }
        )
    else:
        encoder = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
    task1_head, task2_head = Linear(3, 1), Linear(3, 1)
    inputs, t1, t2 = torch.randn(8, 16, 10), torch.randn(8, 16, 1), torch.randn(8, 16, 1)

    def trunk_fn(params: TensorDict, x: Tensor) -> Tensor:
        if isinstance(encoder, nn.ModuleDict):
            hidden = call(encoder["encoder"], params["encoder"], x)
            features: Tensor = call(encoder["decoder"], params["decoder"], hidden)
        else:
            features = call(encoder, params, x)
        return features

    def heads_fn(params: TensorDict, features: Tensor, y1: Tensor, y2: Tensor) -> Tensor:
        loss1 = mse_loss(call(task1_head, params["task1"], features), y1)
        loss2 = mse_loss(call(task2_head, params["task2"], features), y2)
        return torch.stack([loss1, loss2])

    shared = params_of(encoder)
    heads = TensorDict({"task1": params_of(task1_head), "task2": params_of(task2_head)})
    groups = group_params(shared, strategy)
    weighting = gradvac()
    states = init_group_states(groups, weighting, m=2)  # one GradVac state per group
    for x, y1, y2 in zip(inputs, t1, t2, strict=True):
        out = mtl_jacobian(trunk_fn, heads_fn, shared, heads, (x,), (y1, y2))
        update, _, states = aggregate_groups(out.jacobian, groups, weighting, states)
        shared = shared - 0.1 * update
        heads = heads - 0.1 * out.head_grads
    print(f"{strategy}: groups {list(groups)}, last losses {out.losses.tolist()}")
    return shared, heads


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=STRATEGIES, default="per_layer")
    main(parser.parse_args().strategy)
