"""Aggregation of Jacobian TensorDicts, as a whole or per group of parameters."""

from collections.abc import Mapping
from typing import Any, Generic, NamedTuple, TypeAlias, overload

import torch
from tensordict import TensorDict, TensorDictBase

from torchjd_func._gramian import combine, flatten_gramian, gramian, reshape_weights
from torchjd_func._grouping import GroupingStrategy, Groups, group_params
from torchjd_func._tree import from_leaves, leaves
from torchjd_func.aggregation._base import PureWeighting, S
from torchjd_func.aggregation._kinds import CrossWeighting, JacobianAggregator, describe_kind

__all__ = [
    "Aggregation",
    "GroupAggregation",
    "JacobianAggregation",
    "aggregate",
    "aggregate_groups",
    "init_group_states",
]

_Method: TypeAlias = PureWeighting[S] | JacobianAggregator[S]
"""What :func:`aggregate` and :func:`aggregate_groups` take: a Gramian weighting or a Jacobian
aggregator."""


class Aggregation(NamedTuple, Generic[S]):
    """What :func:`aggregate` returns (generic in the weighting's state type)."""

    update: TensorDict
    """The update direction ``Jᵀw``, params-shaped."""
    weights: torch.Tensor
    """The weights, in the losses' shape ``s``."""
    state: S
    """The weighting's new state."""


class JacobianAggregation(NamedTuple, Generic[S]):
    """What :func:`aggregate` returns for a :class:`JacobianAggregator`."""

    update: TensorDict
    """The update direction, params-shaped."""
    weights: torch.Tensor | None
    """The weights in the losses' shape ``s``, or ``None`` for an aggregator that does not weight
    the rows (e.g. GradDrop, TrimmedMean)."""
    state: S
    """The aggregator's new state."""


class GroupAggregation(NamedTuple, Generic[S]):
    """What :func:`aggregate_groups` returns (generic in the weightings' state type)."""

    update: TensorDict
    """The update, params-shaped: each group's parameters moved by its own aggregation."""
    weights: TensorDict
    """``{group name: weights}``, each in the losses' shape ``s`` (``batch_size = s``); the groups
    of a :class:`JacobianAggregator` that gives no weights are absent."""
    states: dict[str, S]
    """``{group name: new state}``."""


@overload
def aggregate(jac: TensorDictBase, weighting: PureWeighting[S], state: S) -> Aggregation[S]: ...


@overload
def aggregate(
    jac: TensorDictBase, weighting: JacobianAggregator[S], state: S
) -> JacobianAggregation[S]: ...


def aggregate(
    jac: TensorDictBase, weighting: _Method[S], state: S
) -> Aggregation[S] | JacobianAggregation[S]:
    """Aggregates a Jacobian TensorDict with a weighting of its Gramian, or with a
    :class:`JacobianAggregator`.

    ``G = flatten_gramian(gramian(J))`` (generalized Gramians of losses ``s`` are flattened to
    ``[M, M]``, as TorchJD's ``Flattening`` does), ``w, state = weighting.update(G, state)``, and
    the update is ``combine(J, w)`` with ``w`` reshaped to ``s``. A :class:`JacobianAggregator`
    gets ``J`` with its losses flattened to ``[M]``, and its weights (if any) are reshaped to
    ``s``. Pure: nothing is mutated.

    Args:
        jac: A Jacobian TensorDict (leaves ``[*s, *param.shape]``).
        weighting: A :class:`PureWeighting`, e.g. ``upgrad()``, or a
            :class:`JacobianAggregator`, e.g. ``trimmed_mean(1)``.
        state: Its state, from ``weighting.init(M, dtype=..., device=...)`` (for a
            ``JacobianAggregator``: ``init(params, M)``).

    Returns:
        ``Aggregation(update, weights, state)`` (a ``JacobianAggregation``, whose weights may be
        ``None``, for a ``JacobianAggregator``).

    Raises:
        TypeError: ``weighting`` is a class-style object or a :class:`CrossWeighting` (whose
            input is the cross-Gramian of two batches, see :func:`cross_gramian`).

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
    _check_method(weighting)
    if isinstance(weighting, JacobianAggregator):
        update, flat, new_state = weighting.update(jac.reshape(-1), state)
        weights = None if flat is None else reshape_weights(flat, jac.batch_size)
        return JacobianAggregation(update, weights, new_state)
    square = flatten_gramian(gramian(jac))
    flat_weights, new_state = weighting.update(square, state)
    weights = reshape_weights(flat_weights, jac.batch_size)
    return Aggregation(combine(jac, weights), weights, new_state)


def _check_method(weighting: object) -> None:
    if isinstance(weighting, PureWeighting | JacobianAggregator):
        return
    if isinstance(weighting, CrossWeighting):
        raise TypeError(
            f"`weighting` is {describe_kind(weighting)}, whose input is not the Gramian of one "
            "Jacobian: compute `cross_gramian(jac_1, jac_2)` from two independent batches, weight "
            "it with `weighting.update`, and apply the weights with `combine(jac, weights)`."
        )
    raise TypeError(
        "`weighting` must be a PureWeighting (e.g. `upgrad()`) or a JacobianAggregator (e.g. "
        f"`trimmed_mean(1)`), got {type(weighting).__name__}. Class-style weightings hold their "
        "own state: call them on `flatten_gramian(gramian(jac))` instead."
    )


def _per_group(names: list[str], weightings: object) -> dict[str, _Method[Any]]:
    if isinstance(weightings, PureWeighting | JacobianAggregator):
        return dict.fromkeys(names, weightings)
    if not isinstance(weightings, Mapping):
        _check_method(weightings)
        raise TypeError(
            "`weightings` must be a PureWeighting or a JacobianAggregator (the same for every "
            f"group) or a mapping `group name -> weighting`, got {type(weightings).__name__}."
        )
    for weighting in weightings.values():
        _check_method(weighting)
    if set(weightings) != set(names):
        raise ValueError(
            f"`weightings` must name exactly the groups {names}, got {sorted(weightings)}."
        )
    return {name: weightings[name] for name in names}


def init_group_states(
    groups: Groups,
    weightings: _Method[S] | Mapping[str, _Method[S]],
    m: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    params: TensorDictBase | None = None,
) -> dict[str, S]:
    """One initial state per group: ``{group name: weighting.init(m, ...)}`` (for a
    :class:`JacobianAggregator`, ``init(group's params, m)``).

    Args:
        groups: The groups, from :func:`torchjd_func.group_params`.
        weightings: One weighting for all groups, or one per group name.
        m: The number of losses (``prod(s)`` for losses of shape ``s``).
        dtype: The dtype of the states' floating-point tensors.
        device: Their device.
        params: The parameters (e.g. :func:`~torchjd_func.params_of`), needed by the
            :class:`JacobianAggregator` s, whose state may be shaped like their group's params
            (their ``dtype`` and ``device`` are the params').

    Returns:
        ``{group name: state}``.

    Raises:
        ValueError: a ``JacobianAggregator`` without ``params``.

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
    states: dict[str, Any] = {}
    for name, weighting in per_group.items():
        if isinstance(weighting, JacobianAggregator):
            if params is None:
                raise ValueError(
                    f"Group {name!r} has a JacobianAggregator, whose state is built from the "
                    "group's parameters: pass `params=` (e.g. `params_of(model)`)."
                )
            states[name] = weighting.init(params.select(*groups[name]), m)
        else:
            states[name] = weighting.init(m, dtype=dtype, device=device)
    return states


def aggregate_groups(
    jac: TensorDictBase,
    groups: Groups | GroupingStrategy,
    weightings: _Method[S] | Mapping[str, _Method[S]],
    states: Mapping[str, S],
) -> GroupAggregation[S]:
    """Aggregates each group of parameters independently, with its own weighting and state.

    The Gradient Vaccine strategies (together, per network, per layer, per tensor) in one call:
    for every group, the Gramian of the group's sub-Jacobian is weighted by the group's weighting
    and state, and the group's parameters get the resulting combination of their Jacobian rows.

    Args:
        jac: A Jacobian TensorDict (leaves ``[*s, *param.shape]``).
        groups: A partition from :func:`torchjd_func.group_params`, or a strategy.
        weightings: One :class:`PureWeighting` or :class:`JacobianAggregator` for all groups,
            or one per group name.
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
        if result.weights is not None:
            weights[name] = result.weights
        new_states[name] = result.state
    ordered = {key: updates[key] for key in leaves(jac)}
    return GroupAggregation(
        from_leaves(ordered, batch_size=[]),
        TensorDict(weights, batch_size=jac.batch_size),
        new_states,
    )
