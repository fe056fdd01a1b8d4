"""Aggregation of Jacobian TensorDicts, as a whole or per group of parameters."""

from collections.abc import Mapping
from typing import Generic, NamedTuple

import torch
from tensordict import TensorDict, TensorDictBase

from torchjd_func._gramian import combine, flatten_gramian, gramian, reshape_weights
from torchjd_func._grouping import GroupingStrategy, Groups, group_params
from torchjd_func._tree import from_leaves, leaves
from torchjd_func.aggregation._base import PureWeighting, S

__all__ = ["Aggregation", "GroupAggregation", "aggregate", "aggregate_groups", "init_group_states"]


class Aggregation(NamedTuple, Generic[S]):
    """What :func:`aggregate` returns (generic in the weighting's state type)."""

    update: TensorDict
    """The update direction ``Jᵀw``, params-shaped."""
    weights: torch.Tensor
    """The weights, in the losses' shape ``s``."""
    state: S
    """The weighting's new state."""


class GroupAggregation(NamedTuple, Generic[S]):
    """What :func:`aggregate_groups` returns (generic in the weightings' state type)."""

    update: TensorDict
    """The update, params-shaped: each group's parameters moved by its own aggregation."""
    weights: TensorDict
    """``{group name: weights}``, each in the losses' shape ``s`` (``batch_size = s``)."""
    states: dict[str, S]
    """``{group name: new state}``."""


def aggregate(jac: TensorDictBase, weighting: PureWeighting[S], state: S) -> Aggregation[S]:
    """Aggregates a Jacobian TensorDict with a weighting of its Gramian.

    ``G = flatten_gramian(gramian(J))`` (generalized Gramians of losses ``s`` are flattened to
    ``[M, M]``, as TorchJD's ``Flattening`` does), ``w, state = weighting.update(G, state)``, and
    the update is ``combine(J, w)`` with ``w`` reshaped to ``s``. Pure: nothing is mutated.

    Args:
        jac: A Jacobian TensorDict (leaves ``[*s, *param.shape]``).
        weighting: A :class:`PureWeighting`, e.g. ``upgrad()``.
        state: Its state, from ``weighting.init(M, dtype=..., device=...)``.

    Returns:
        ``Aggregation(update, weights, state)``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import aggregate, upgrad
        >>> jac = TensorDict({"p": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, batch_size=[2])
        >>> weighting = upgrad()
        >>> update, weights, state = aggregate(jac, weighting, weighting.init(2))
        >>> update["p"]
        tensor([0.2929, 1.9004, 1.9004])
    """
    if not isinstance(weighting, PureWeighting):
        raise TypeError(
            "`weighting` must be a PureWeighting (e.g. `upgrad()`), got "
            f"{type(weighting).__name__}. Class-style weightings hold their own state: call them "
            "on `flatten_gramian(gramian(jac))` instead."
        )
    square = flatten_gramian(gramian(jac))
    flat_weights, new_state = weighting.update(square, state)
    weights = reshape_weights(flat_weights, jac.batch_size)
    return Aggregation(combine(jac, weights), weights, new_state)


def _per_group(
    names: list[str], weightings: PureWeighting[S] | Mapping[str, PureWeighting[S]]
) -> dict[str, PureWeighting[S]]:
    if isinstance(weightings, PureWeighting):
        return dict.fromkeys(names, weightings)
    if not isinstance(weightings, Mapping):
        raise TypeError(
            "`weightings` must be a PureWeighting (the same for every group) or a mapping "
            f"`group name -> PureWeighting`, got {type(weightings).__name__}."
        )
    if set(weightings) != set(names):
        raise ValueError(
            f"`weightings` must name exactly the groups {names}, got {sorted(weightings)}."
        )
    return {name: weightings[name] for name in names}


def init_group_states(
    groups: Groups,
    weightings: PureWeighting[S] | Mapping[str, PureWeighting[S]],
    m: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, S]:
    """One initial state per group: ``{group name: weighting.init(m, ...)}``.

    Args:
        groups: The groups, from :func:`torchjd_func.group_params`.
        weightings: One weighting for all groups, or one per group name.
        m: The number of losses (``prod(s)`` for losses of shape ``s``).
        dtype: The dtype of the states' floating-point tensors.
        device: Their device.

    Returns:
        ``{group name: state}``.

    Example:
        >>> import torch
        >>> from torchjd_func import group_params, params_of
        >>> from torchjd_func.aggregation import gradvac, init_group_states
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> states = init_group_states(group_params(params_of(model), "per_layer"), gradvac(), m=2)
        >>> sorted(states), states["0"].targets.shape
        (['0', '1'], torch.Size([2, 2]))
    """
    per_group = _per_group(list(groups), weightings)
    return {name: w.init(m, dtype=dtype, device=device) for name, w in per_group.items()}


def aggregate_groups(
    jac: TensorDictBase,
    groups: Groups | GroupingStrategy,
    weightings: PureWeighting[S] | Mapping[str, PureWeighting[S]],
    states: Mapping[str, S],
) -> GroupAggregation[S]:
    """Aggregates each group of parameters independently, with its own weighting and state.

    The Gradient Vaccine strategies (together, per network, per layer, per tensor) in one call:
    for every group, the Gramian of the group's sub-Jacobian is weighted by the group's weighting
    and state, and the group's parameters get the resulting combination of their Jacobian rows.

    Args:
        jac: A Jacobian TensorDict (leaves ``[*s, *param.shape]``).
        groups: A partition from :func:`torchjd_func.group_params`, or a strategy.
        weightings: One :class:`PureWeighting` for all groups, or one per group name.
        states: ``{group name: state}`` (see :func:`init_group_states`).

    Returns:
        ``GroupAggregation(update, weights, states)``.

    Raises:
        ValueError: ``weightings`` or ``states`` do not name exactly the groups.

    Example:
        >>> import torch
        >>> from torchjd_func import call, group_params, jacobian, params_of
        >>> from torchjd_func.aggregation import aggregate_groups, gradvac, init_group_states
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> jac = jacobian(lambda p, x: call(model, p, x).pow(2).mean(0), params_of(model), torch.randn(8, 3))
        >>> groups = group_params(params_of(model), "per_layer")
        >>> states = init_group_states(groups, gradvac(), m=2)
        >>> update, weights, states = aggregate_groups(jac, groups, gradvac(), states)
        >>> update["2", "weight"].shape, weights["0"].shape
        (torch.Size([2, 4]), torch.Size([2]))
    """
    resolved = group_params(jac, groups)
    names = list(resolved)
    per_group = _per_group(names, weightings)
    if not isinstance(states, Mapping) or set(states) != set(names):
        given = sorted(states) if isinstance(states, Mapping) else type(states).__name__
        raise ValueError(
            f"`states` must map exactly the groups {names} to their states, got {given}. "
            "Create them with `init_group_states`."
        )
    updates: dict[tuple[str, ...], torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    new_states: dict[str, S] = {}
    for name, members in resolved.items():
        result = aggregate(jac.select(*members), per_group[name], states[name])
        updates.update(leaves(result.update))
        weights[name] = result.weights
        new_states[name] = result.state
    ordered = {key: updates[key] for key in leaves(jac)}
    return GroupAggregation(
        from_leaves(ordered, batch_size=[]),
        TensorDict(weights, batch_size=jac.batch_size),
        new_states,
    )
