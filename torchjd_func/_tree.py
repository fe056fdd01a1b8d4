"""Leaves of parameter TensorDicts, their validation, and the functional call of a module."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torch.func import functional_call

from torchjd_func._types import LeafKey, Params


def leaves(td: TensorDictBase) -> dict[LeafKey, Tensor]:
    """The leaves of ``td`` keyed by their full nested key, in the TensorDict's order."""
    out: dict[LeafKey, Tensor] = {}
    for key, value in td.items(include_nested=True, leaves_only=True):
        nested: object = key
        out[nested if isinstance(nested, tuple) else (str(nested),)] = cast(Tensor, value)
    return out


def from_leaves(
    leaves_: Mapping[LeafKey, Tensor], batch_size: Sequence[int] | torch.Size
) -> TensorDict:
    """Rebuilds a nested TensorDict from leaves keyed by their full nested key."""
    nested: dict[str, Any] = {}
    for key, value in leaves_.items():
        node = nested
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return TensorDict(nested, batch_size=torch.Size(batch_size))


def dotted(key: LeafKey) -> str:
    """``("0", "weight")`` -> ``"0.weight"``, the name ``nn.Module.named_parameters`` uses."""
    return ".".join(key)


def check_params(params: object, name: str = "params") -> dict[LeafKey, Tensor]:
    """Validates a params TensorDict and returns its leaves.

    Raises:
        TypeError: ``params`` is not a TensorDict, or a leaf is not a floating-point tensor.
        ValueError: ``params`` has no leaf, or its leaves are on several devices.
    """
    if not isinstance(params, TensorDictBase):
        raise TypeError(
            f"`{name}` must be a TensorDict of parameters (e.g. `params_of(model)`), "
            f"got {type(params).__name__}."
        )
    found = leaves(params)
    if not found:
        raise ValueError(
            f"`{name}` is empty: there is no parameter to differentiate. Pass the parameters that "
            "the losses depend on, e.g. `params_of(model)`."
        )
    for key, leaf in found.items():
        if not leaf.is_floating_point():
            raise TypeError(
                f"`{name}[{dotted(key)!r}]` has dtype {leaf.dtype}; only floating-point parameters "
                "can be differentiated. Leave integer tensors out of the params (e.g. as buffers)."
            )
    devices = {leaf.device for leaf in found.values()}
    if len(devices) > 1:
        placed = ", ".join(f"{dotted(k)}: {v.device}" for k, v in found.items())
        raise ValueError(
            f"`{name}` has leaves on several devices ({placed}). Move them to one device first, "
            "e.g. `params.to(device)`."
        )
    return found


def params_of(module: nn.Module, *, trainable_only: bool = True) -> Params:
    """The parameters of ``module`` as a nested TensorDict, detached from autograd.

    The nested keys mirror the module tree, so ``params_of(model)["0", "weight"]`` is
    ``model[0].weight``. The leaves share storage with the module's parameters (no copy).
    A parameter registered under two names (tied weights) appears once, under its first name,
    as in ``module.named_parameters()``.

    Args:
        module: The module whose parameters to take.
        trainable_only: Keep only the parameters with ``requires_grad=True`` (the default), so
            frozen parameters stay constants of the model.

    Returns:
        A TensorDict with ``batch_size=[]`` and one leaf per parameter.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``module`` has no (trainable) parameter.

    Example:
        >>> import torch
        >>> from torchjd_func import params_of
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> params = params_of(model)
        >>> sorted(params.keys(include_nested=True, leaves_only=True))
        [('0', 'bias'), ('0', 'weight'), ('2', 'bias'), ('2', 'weight')]
        >>> params["0", "weight"].shape
        torch.Size([2, 3])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    named = {
        tuple(name.split(".")): param.detach()
        for name, param in module.named_parameters()
        if param.requires_grad or not trainable_only
    }
    if not named:
        what = "trainable parameter" if trainable_only else "parameter"
        raise ValueError(f"{type(module).__name__} has no {what}.")
    return from_leaves(named, batch_size=[])


def _check_devices(
    module: nn.Module,
    replacements: dict[str, Tensor],
    own: dict[str, tuple[str, Tensor]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Raises a ValueError if the module's own tensors or its floating-point inputs are not on
    the device of ``params``. Zero-dim tensors are exempt, as in torch's own device checks, and so
    are integer inputs (e.g. the sequence lengths that ``pack_padded_sequence`` wants on the CPU)."""
    device = next(iter(replacements.values())).device
    for name, (kind, tensor) in own.items():
        if name not in replacements and tensor.ndim > 0 and tensor.device != device:
            raise ValueError(
                f"{type(module).__name__}'s {kind} {name!r} is on {tensor.device}, but `params` "
                f"are on {device}. The module's own {kind}s (those not in `params`) are used as "
                f"they are: move the module to that device first, `module.to({str(device)!r})`."
            )
    named = [(f"Input {i}", arg) for i, arg in enumerate(args)]
    named += [(f"Keyword input {key!r}", arg) for key, arg in kwargs.items()]
    for what, arg in named:
        if (
            isinstance(arg, Tensor)
            and arg.is_floating_point()
            and arg.ndim > 0
            and arg.device != device
        ):
            raise ValueError(
                f"{what} of {type(module).__name__} is on {arg.device}, but `params` are on "
                f"{device}: move the inputs (or the parameters) to one device."
            )


_Output_co = TypeVar("_Output_co", covariant=True)


class _Forward(Protocol[_Output_co]):
    """A module whose ``forward`` returns ``_Output_co`` (``Tensor`` for ``nn.Linear``)."""

    @property
    def forward(self) -> Callable[..., _Output_co]: ...


def call(
    module: _Forward[_Output_co],
    params: TensorDictBase,
    # The module's inputs: ``forward``'s own parameters, which this wrapper cannot spell.
    *args: Any,
    buffers: TensorDictBase | None = None,
    **kwargs: Any,
) -> _Output_co:
    """Calls ``module(*args, **kwargs)`` with its parameters replaced by ``params``.

    A thin wrapper of ``torch.func.functional_call`` that takes a nested TensorDict. Parameters
    and buffers that ``params`` and ``buffers`` do not name keep the module's own values (frozen
    parameters, BatchNorm running statistics, ...). Tied weights stay tied.

    Args:
        module: The module to call.
        params: Replacement parameters, keys as given by :func:`params_of`.
        *args: Positional inputs of the module.
        buffers: Optional replacement buffers, keyed like the module's buffers.
        **kwargs: Keyword inputs of the module.

    Returns:
        Whatever ``module`` returns; for a type checker, the return type of its ``forward``
        (``Tensor`` for ``nn.Linear``; ``Any`` where ``forward`` is not annotated, as in
        ``nn.Sequential``: annotate the result, ``out: Tensor = call(model, params, x)``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``params`` is not a TensorDict.
        ValueError: ``params`` or ``buffers`` names something the module does not have, or a
            floating-point input (positional or keyword) or a tensor of the module that
            ``params`` does not replace is on another device than ``params``.

    Example:
        >>> import torch
        >>> from torchjd_func import call, params_of
        >>> model = torch.nn.Linear(3, 1)
        >>> zeros = params_of(model).apply(torch.zeros_like)
        >>> call(model, zeros, torch.ones(2, 3))
        tensor([[0.],
                [0.]])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    replacements = {dotted(k): v for k, v in check_params(params).items()}
    if buffers is not None:
        if not isinstance(buffers, TensorDictBase):
            raise TypeError(f"`buffers` must be a TensorDict, got {type(buffers).__name__}.")
        replacements.update({dotted(k): v for k, v in leaves(buffers).items()})
    own = {
        **{name: ("buffer", t) for name, t in module.named_buffers(remove_duplicate=False)},
        **{name: ("parameter", t) for name, t in module.named_parameters(remove_duplicate=False)},
    }
    unknown = sorted(set(replacements) - set(own))
    if unknown:
        raise ValueError(
            f"{type(module).__name__} has no parameter or buffer named {unknown}. The keys of "
            "`params` must mirror the module tree, as `params_of(module)` gives them."
        )
    _check_devices(module, replacements, own, args, kwargs)
    output: _Output_co = functional(module, replacements, args, kwargs)
    return output


def _slots(module: nn.Module) -> dict[str, tuple[int, str]]:
    """Every name of a parameter or buffer of ``module`` (duplicates included) -> the slot it
    names: the id of the module object holding it, and its attribute there."""
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in module.named_buffers(remove_duplicate=False)]
    slots: dict[str, tuple[int, str]] = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        slots[name] = (id(module.get_submodule(path)), attr)
    return slots


def functional(
    module: nn.Module, replacements: Mapping[str, Tensor], args: Any, kwargs: dict[str, Any]
) -> Any:
    """``torch.func.functional_call`` with ``replacements`` (dotted names), tied tensors replaced
    everywhere they are used, and the module exactly as it was afterwards.

    ``functional_call(tie_weights=True)`` fails to restore a module registered under two names
    (``self.b = self.a``, ``nn.Sequential(lin, act, lin)``): it swaps the shared attribute once per
    name, and puts the swapped-in tensors back last, leaving them in place of the
    ``nn.Parameter``s. So each replaced tensor is given here under one name per distinct slot
    (module object and attribute) that holds it, and ``tie_weights=False`` swaps each slot once.

    Raises:
        ValueError: two names of ``replacements`` name the same tensor.
    """
    own = {
        **dict(module.named_buffers(remove_duplicate=False)),
        **dict(module.named_parameters(remove_duplicate=False)),
    }
    slots = _slots(module)
    given: dict[int, str] = {}
    for name in replacements:
        if name not in own:
            continue  # strict=False: functional_call ignores it, as before
        first = given.setdefault(id(own[name]), name)
        if first != name:
            raise ValueError(
                f"{name!r} and {first!r} name the same tensor of {type(module).__name__} (tied "
                "weights or a module registered twice): give it once, under its first name as "
                "`params_of` does."
            )
    expanded: dict[str, Tensor] = {}
    swapped: set[tuple[int, str]] = set()
    for name, tensor in own.items():
        replacing = given.get(id(tensor))
        if replacing is not None and slots[name] not in swapped:
            swapped.add(slots[name])
            expanded[name] = replacements[replacing]
    return functional_call(module, expanded, args, kwargs, tie_weights=False, strict=False)
