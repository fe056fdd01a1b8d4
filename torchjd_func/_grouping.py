"""Partitions of a params TensorDict into groups, and Jacobians and Gramians per group.

Aggregating the Jacobian per group of parameters (Gradient Vaccine, Wang et al., ICLR 2021,
https://arxiv.org/abs/2010.05874) resolves conflicts at a finer granularity. The paper's four
strategies are the built-in ones:

==================  ====================================================  ===================
strategy            groups                                                paper's name
==================  ====================================================  ===================
``"together"``      one group, ``"all"``                                  ``whole_model``
``"per_network"``   one per top-level key (top-level submodule)           ``enc_dec``
``"per_layer"``     one per module owning parameters directly            ``all_layer``
``"per_tensor"``    one per parameter tensor                              ``all_matrix``
==================  ====================================================  ===================

Custom groups are a mapping ``group name -> keys`` (a key names a leaf or a whole sub-tree, as a
tuple or a dotted string) or a callable ``leaf key -> group name``. Every parameter must be in
exactly one group: a parameter in no group, or in two, is an error rather than a silent skip.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Literal, TypeAlias

from tensordict import TensorDict, TensorDictBase

from torchjd_func._gramian import gramian
from torchjd_func._tree import dotted, leaves
from torchjd_func._types import LeafKey

__all__ = ["GroupingStrategy", "Groups", "group_gramians", "group_params", "split_by_group"]

Groups: TypeAlias = dict[str, tuple[LeafKey, ...]]
"""Group name -> the full nested keys of the parameters in that group."""

GroupingStrategy: TypeAlias = (
    Literal["together", "per_network", "per_layer", "per_tensor"]
    | Mapping[str, Iterable[str | LeafKey]]
    | Callable[[LeafKey], str]
)

ROOT = "(root)"
"""The ``per_layer`` group of parameters registered directly on the root module."""


def _as_key(key: str | LeafKey) -> LeafKey:
    if isinstance(key, str):
        return tuple(key.split("."))
    if isinstance(key, tuple) and key and all(isinstance(part, str) for part in key):
        return key
    raise TypeError(f"A parameter key is a dotted string or a tuple of strings, got {key!r}.")


def _by_name(keys: Iterable[LeafKey], name_of: Callable[[LeafKey], str]) -> Groups:
    groups: dict[str, list[LeafKey]] = {}
    for key in keys:
        name = name_of(key)
        if not isinstance(name, str):
            raise TypeError(
                f"The grouping callable must return a group name (str) for every parameter; "
                f"it returned {name!r} for {dotted(key)!r}."
            )
        groups.setdefault(name, []).append(key)
    return {name: tuple(members) for name, members in groups.items()}


def _from_mapping(keys: list[LeafKey], mapping: Mapping[str, Iterable[str | LeafKey]]) -> Groups:
    owner: dict[LeafKey, str] = {}
    groups: Groups = {}
    for name, selectors in mapping.items():
        if isinstance(selectors, str):
            raise TypeError(
                f"Group {name!r} must be given a list of keys, got {selectors!r}: write "
                f"[{selectors!r}]."
            )
        members: list[LeafKey] = []
        for selector in selectors:
            prefix = _as_key(selector)
            matched = [key for key in keys if key[: len(prefix)] == prefix]
            if not matched:
                raise ValueError(
                    f"Group {name!r} names {dotted(prefix)!r}, which is no parameter nor module of "
                    f"the params (keys: {[dotted(k) for k in keys]})."
                )
            for key in matched:
                if key in owner:
                    raise ValueError(
                        f"Parameter {dotted(key)!r} is in two groups, {owner[key]!r} and "
                        f"{name!r}: every parameter must be in exactly one group."
                    )
                owner[key] = name
                members.append(key)
        if not members:
            raise ValueError(
                f"Group {name!r} is empty: give it at least one parameter or module key, or "
                "leave it out of the mapping."
            )
        groups[name] = tuple(members)
    missing = [dotted(key) for key in keys if key not in owner]
    if missing:
        raise ValueError(
            f"Parameters {missing} are in no group: every parameter must be in exactly one group "
            "(add them to a group, or leave them out of the params)."
        )
    return groups


def group_params(params: TensorDictBase, strategy: GroupingStrategy) -> Groups:
    """Partitions the leaves of ``params`` into named groups.

    Args:
        params: A params TensorDict (e.g. :func:`params_of`), or a Jacobian with the same keys.
        strategy: ``"together"``, ``"per_network"``, ``"per_layer"``, ``"per_tensor"``, a mapping
            ``group name -> keys`` (each key a dotted string or tuple naming a parameter or a
            sub-module), or a callable ``leaf key (tuple) -> group name``.

    Returns:
        ``{group name: (leaf key, ...)}``, covering every leaf exactly once, in the params' order.

    Raises:
        TypeError: ``params`` is not a TensorDict, the strategy is of an unknown kind, or a
            mapping gives a group one key instead of a list of keys.
        ValueError: ``params`` is empty, an unknown strategy name, an empty group, a key that
            names nothing, or a parameter in no group or in two.

    Example:
        >>> import torch
        >>> from torchjd_func import group_params, params_of
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> list(group_params(params_of(model), "per_layer"))
        ['0', '2']
        >>> list(group_params(params_of(model), "per_tensor"))
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> group_params(params_of(model), {"first": ["0"], "last": ["2.weight", "2.bias"]})["last"]
        (('2', 'weight'), ('2', 'bias'))
    """
    if not isinstance(params, TensorDictBase):
        raise TypeError(f"`params` must be a TensorDict, got {type(params).__name__}.")
    keys = list(leaves(params))
    if not keys:
        raise ValueError("`params` is empty: there is nothing to group.")
    if isinstance(strategy, str):
        namers: dict[str, Callable[[LeafKey], str]] = {
            "together": lambda key: "all",
            "per_network": lambda key: key[0],
            "per_layer": lambda key: dotted(key[:-1]) if len(key) > 1 else ROOT,
            "per_tensor": dotted,
        }
        if strategy not in namers:
            raise ValueError(
                f"Unknown grouping strategy {strategy!r}: use one of {sorted(namers)}, a mapping "
                "`group name -> keys`, or a callable `key -> group name`."
            )
        return _by_name(keys, namers[strategy])
    if isinstance(strategy, Mapping):
        return _from_mapping(keys, strategy)
    if callable(strategy):
        return _by_name(keys, strategy)
    raise TypeError(
        "`strategy` must be a strategy name, a mapping `group name -> keys` or a callable, got "
        f"{type(strategy).__name__}."
    )


def split_by_group(td: TensorDictBase, groups: Groups | GroupingStrategy) -> TensorDict:
    """Splits a params, gradient or Jacobian TensorDict by group.

    Args:
        td: A TensorDict keyed like the params (a Jacobian keeps its ``batch_size``).
        groups: The output of :func:`group_params` (itself a valid mapping strategy), or a
            strategy to apply to ``td``.

    Returns:
        A TensorDict ``{group name: sub-TensorDict}`` with the batch size of ``td``, each
        sub-TensorDict keeping the original nested keys of its leaves.

    Example:
        >>> import torch
        >>> from torchjd_func import jacobian, params_of, call, split_by_group
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        >>> jac = jacobian(lambda p, x: call(model, p, x).sum(0), params_of(model), torch.randn(4, 3))
        >>> per_layer = split_by_group(jac, "per_layer")
        >>> per_layer["1"]["1", "weight"].shape
        torch.Size([2, 2, 2])
    """
    resolved = group_params(td, groups)
    return TensorDict(
        {name: td.select(*members) for name, members in resolved.items()},
        batch_size=td.batch_size,
    )


def group_gramians(jac: TensorDictBase, groups: Groups | GroupingStrategy) -> TensorDict:
    """One (generalized) Gramian per group of parameters.

    The Jacobian is column-blocked by group, so the per-group Gramians sum to the whole
    :func:`gramian`.

    Args:
        jac: A Jacobian TensorDict (leaves ``[*s, *param.shape]``).
        groups: The output of :func:`group_params`, or a strategy.

    Returns:
        A TensorDict ``{group name: Gramian [*s, *reversed(s)]}`` (``batch_size=[]``).

    Example:
        >>> import torch
        >>> from torchjd_func import call, group_gramians, jacobian, params_of
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        >>> jac = jacobian(lambda p, x: call(model, p, x).sum(0), params_of(model), torch.randn(4, 3))
        >>> grams = group_gramians(jac, "per_network")
        >>> sorted(grams.keys()), grams["0"].shape
        (['0', '1'], torch.Size([2, 2]))
    """
    resolved = group_params(jac, groups)
    return TensorDict(
        {name: gramian(jac.select(*members)) for name, members in resolved.items()},
        batch_size=[],
    )
