"""Functional optimizers over TensorDicts: SGD (with momentum) and Adam as pure functions.

An optimizer is a pair ``(init, update)``: ``init(params) -> state`` and
``update(grads, state, params) -> (new_params, new_state)``, where ``params`` and ``grads`` are
TensorDicts with the same keys and the state is a NamedTuple of tensors and TensorDicts (its step
counter is a 0-d tensor, so a compiled training step does not recompile as it grows). The update
rules are those of ``torch.optim.SGD`` and ``torch.optim.Adam`` (tested against them).

Parameters and state keep the parameters' dtype: gradients are cast to it first, as autograd
does for ``.grad`` before ``torch.optim`` reads it. Non-finite gradients propagate into the new
parameters and state: nothing is checked on the host, so that the update compiles without a
synchronisation.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchjd_func._tree import dotted, from_leaves, leaves

__all__ = ["AdamState", "Optimizer", "SGDState", "adam", "sgd"]


OptState = TypeVar("OptState", bound=tuple[object, ...])
"""The state type of an optimizer (``SGDState``, ``AdamState``)."""


class Optimizer(NamedTuple, Generic[OptState]):
    """A functional optimizer: ``init(params) -> state``, ``update(grads, state, params)``.

    Generic in its state type: ``sgd(...)`` is an ``Optimizer[SGDState]``, ``adam(...)`` an
    ``Optimizer[AdamState]``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.optim import sgd
        >>> optimizer = sgd(lr=0.5)
        >>> params = TensorDict({"w": torch.ones(2)})
        >>> state = optimizer.init(params)
        >>> params, state = optimizer.update(TensorDict({"w": torch.ones(2)}), state, params)
        >>> params["w"], int(state.steps)
        (tensor([0.5000, 0.5000]), 1)
    """

    init: Callable[[TensorDictBase], OptState]
    update: Callable[[TensorDictBase, OptState, TensorDictBase], tuple[TensorDict, OptState]]


class SGDState(NamedTuple):
    """State of :func:`sgd`."""

    steps: Tensor
    """``[]`` int64: the number of updates done."""
    momentum: TensorDict
    """The momentum buffers, params-shaped (zeros before the first update)."""


class AdamState(NamedTuple):
    """State of :func:`adam`."""

    steps: Tensor
    """``[]`` int64: the number of updates done."""
    mu: TensorDict
    """First-moment EMA, params-shaped."""
    nu: TensorDict
    """Second-moment EMA, params-shaped."""


def _check_hyperparameter(value: float, name: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number (a Python float), got {value!r}.")
    bound = f"in [0, {upper:g})" if upper is not None else "finite and non-negative"
    if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return float(value)


def _check_betas(betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r}.")
    if len(betas) != 2:
        raise ValueError(
            f"`betas` must be a pair (beta1, beta2), e.g. (0.9, 0.999), got {len(betas)} values: "
            f"{betas!r}."
        )
    return (
        _check_hyperparameter(betas[0], "betas[0]", upper=1.0),
        _check_hyperparameter(betas[1], "betas[1]", upper=1.0),
    )


def _check_tensordict(value: object, name: str) -> TensorDictBase:
    if not isinstance(value, TensorDictBase):
        raise TypeError(
            f"`{name}` must be a TensorDict, got {type(value).__name__}: wrap a dict of tensors "
            f"as `TensorDict({name})`."
        )
    if not leaves(value):
        raise ValueError(f"`{name}` is empty: give at least one parameter.")
    return value


def _check_state(
    state: object, kind: type[tuple[Any, ...]], buffers: tuple[str, ...], params: TensorDictBase
) -> None:
    """``state`` must be what ``init(params)`` of this optimizer returns (up to values)."""
    fix = "build it with this optimizer's `init(params)`"
    if not isinstance(state, kind):
        raise TypeError(f"`state` must be a {kind.__name__}, got {type(state).__name__}: {fix}.")
    steps = state.steps  # type: ignore[attr-defined]
    if not isinstance(steps, Tensor) or steps.ndim != 0 or steps.is_floating_point():
        raise ValueError(f"`state.steps` must be a 0-d integer tensor, got {steps!r}: {fix}.")
    param_leaves = leaves(params)
    for name in buffers:
        buffer = getattr(state, name)
        if not isinstance(buffer, TensorDictBase):
            raise TypeError(f"`state.{name}` must be a TensorDict, got {type(buffer).__name__}.")
        found = leaves(buffer)
        if set(found) != set(param_leaves):
            raise ValueError(
                f"`state.{name}` does not have the keys of the params (only in the state: "
                f"{sorted(map(dotted, set(found) - set(param_leaves)))}, only in the params: "
                f"{sorted(map(dotted, set(param_leaves) - set(found)))}): {fix}."
            )
        for key, param in param_leaves.items():
            value = found[key]
            if (value.shape, value.dtype, value.device) != (param.shape, param.dtype, param.device):
                raise ValueError(
                    f"`state.{name}[{dotted(key)!r}]` is {list(value.shape)} {value.dtype} on "
                    f"{value.device}, but the parameter is {list(param.shape)} {param.dtype} on "
                    f"{param.device}: {fix}."
                )


def _check_same_keys(grads: TensorDictBase, params: TensorDictBase) -> None:
    _check_tensordict(grads, "grads")
    _check_tensordict(params, "params")
    grad_keys = set(grads.keys(include_nested=True, leaves_only=True))
    param_keys = set(params.keys(include_nested=True, leaves_only=True))
    if grad_keys != param_keys:
        raise ValueError(
            "`grads` and `params` must have the same keys; only in grads: "
            f"{sorted(map(str, grad_keys - param_keys))}, only in params: "
            f"{sorted(map(str, param_keys - grad_keys))}."
        )
    grad_leaves = leaves(grads)
    for key, param in leaves(params).items():
        grad = grad_leaves[key]
        if grad.shape != param.shape or grad.device != param.device:
            raise ValueError(
                f"The gradient of {dotted(key)!r} has shape {list(grad.shape)} on "
                f"{grad.device}, but the parameter has shape {list(param.shape)} on {param.device}: "
                "give gradients shaped and placed like the parameters."
            )


def _map(fn: Callable[..., Tensor], first: TensorDictBase, *others: TensorDictBase) -> TensorDict:
    """``fn`` applied leaf by leaf to TensorDicts with the same keys."""
    other_leaves = [leaves(other) for other in others]
    return from_leaves(
        {key: fn(value, *(o[key] for o in other_leaves)) for key, value in leaves(first).items()},
        batch_size=first.batch_size,
    )


def _map_lists(
    fn: Callable[..., Sequence[Tensor]], first: TensorDictBase, *others: TensorDictBase
) -> TensorDict:
    """``fn`` applied once to the lists of leaves of TensorDicts with the same keys: one
    ``torch._foreach_*`` operation for all the leaves (one kernel launch per operation on CUDA,
    as ``torch.optim``'s default ``foreach`` implementation) instead of one per leaf."""
    first_leaves = leaves(first)
    keys = list(first_leaves)
    other_leaves = [leaves(other) for other in others]
    lists = [list(first_leaves.values()), *([o[key] for key in keys] for o in other_leaves)]
    return from_leaves(dict(zip(keys, fn(*lists), strict=True)), batch_size=first.batch_size)


def _zeros_like(params: TensorDictBase) -> TensorDict:
    return _map(lambda p: torch.zeros_like(p.detach()), _check_tensordict(params, "params"))


def _cast_like(grads: TensorDictBase, params: TensorDictBase) -> TensorDict:
    return _map(lambda g, p: g.to(p.dtype), grads, params)


def sgd(
    lr: float,
    momentum: float = 0.0,
    *,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Optimizer[SGDState]:
    """Stochastic gradient descent, with the update rule of ``torch.optim.SGD``.

    .. math::

        g \\leftarrow g + \\lambda p, \\quad
        b \\leftarrow \\mu b + (1 - \\tau) g \\ (b = g \\text{ at the first step}), \\quad
        p \\leftarrow p - \\eta\\,(g + \\mu b \\text{ if nesterov else } b).

    Args:
        lr: Learning rate ``η``.
        momentum: Momentum ``μ`` (0: plain SGD).
        dampening: Dampening ``τ`` of the momentum.
        weight_decay: L2 penalty ``λ``.
        nesterov: Nesterov momentum.

    Raises:
        TypeError: a hyperparameter that is not a real number; at update, ``grads``, ``params``
            or ``state`` of the wrong type (e.g. a dict, or the state of another optimizer).
        ValueError: a non-finite or negative hyperparameter, Nesterov without momentum or with
            dampening; at update, empty params, or grads or state not matching the params.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.optim import sgd
        >>> optimizer = sgd(lr=0.1, momentum=0.9)
        >>> params = TensorDict({"w": torch.ones(2)})
        >>> state = optimizer.init(params)
        >>> params, state = optimizer.update(TensorDict({"w": torch.ones(2)}), state, params)
        >>> params["w"]
        tensor([0.9000, 0.9000])
    """
    lr = _check_hyperparameter(lr, "lr")
    momentum = _check_hyperparameter(momentum, "momentum")
    dampening = _check_hyperparameter(dampening, "dampening")
    weight_decay = _check_hyperparameter(weight_decay, "weight_decay")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("Nesterov momentum needs a positive momentum and zero dampening.")

    def init(params: TensorDictBase) -> SGDState:
        return SGDState(torch.zeros((), dtype=torch.int64), _zeros_like(params))

    def update(
        grads: TensorDictBase, state: SGDState, params: TensorDictBase
    ) -> tuple[TensorDict, SGDState]:
        _check_same_keys(grads, params)
        _check_state(state, SGDState, ("momentum",), params)
        decayed = grads = _cast_like(grads, params)
        if weight_decay:
            decayed = _map_lists(
                lambda g, p: torch._foreach_add(g, p, alpha=weight_decay), grads, params
            )
        count = state.steps + 1
        if not momentum:
            new_params = _map_lists(
                lambda p, g: torch._foreach_add(p, g, alpha=-lr), params, decayed
            )
            return new_params, SGDState(count, state.momentum)
        if dampening:
            # torch.optim.SGD's first buffer is the gradient itself, not (1 − τ)·g.
            first = state.steps == 0
            buffer = _map(
                lambda g, b: torch.where(first, g, momentum * b + (1 - dampening) * g),
                decayed,
                state.momentum,
            )
        else:
            # μ·b + g, also at the first step: the buffers start at zero.
            buffer = _map_lists(
                lambda b, g: torch._foreach_add(torch._foreach_mul(b, momentum), g),
                state.momentum,
                decayed,
            )
        direction = buffer
        if nesterov:
            direction = _map_lists(
                lambda g, b: torch._foreach_add(g, b, alpha=momentum), decayed, buffer
            )
        new_params = _map_lists(lambda p, d: torch._foreach_add(p, d, alpha=-lr), params, direction)
        return new_params, SGDState(count, buffer)

    return Optimizer(init, update)


def adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
) -> Optimizer[AdamState]:
    """Adam, with the update rule of ``torch.optim.Adam``.

    .. math::

        m \\leftarrow \\beta_1 m + (1-\\beta_1) g, \\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2, \\quad
        p \\leftarrow p - \\frac{\\eta}{1-\\beta_1^t}\\,
        \\frac{m}{\\sqrt{v}/\\sqrt{1-\\beta_2^t} + \\epsilon}.

    Args:
        lr: Learning rate ``η``.
        betas: EMA rates ``(β₁, β₂)``, each in ``[0, 1)``.
        eps: Added to the denominator.
        weight_decay: L2 penalty added to the gradient (Adam, not AdamW).

    Raises:
        TypeError: a hyperparameter that is not a real number; at update, ``grads``, ``params``
            or ``state`` of the wrong type (e.g. a dict, or the state of another optimizer).
        ValueError: a non-finite or out-of-range hyperparameter, ``betas`` not a pair; at update,
            empty params, or grads or state not matching the params.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.optim import adam
        >>> optimizer = adam(lr=0.1)
        >>> params = TensorDict({"w": torch.ones(2)})
        >>> params, state = optimizer.update(TensorDict({"w": torch.ones(2)}), optimizer.init(params), params)
        >>> params["w"]
        tensor([0.9000, 0.9000])
    """
    lr = _check_hyperparameter(lr, "lr")
    beta1, beta2 = _check_betas(betas)
    eps = _check_hyperparameter(eps, "eps")
    weight_decay = _check_hyperparameter(weight_decay, "weight_decay")

    def init(params: TensorDictBase) -> AdamState:
        zeros = _zeros_like(params)
        return AdamState(torch.zeros((), dtype=torch.int64), zeros, zeros.clone())

    def update(
        grads: TensorDictBase, state: AdamState, params: TensorDictBase
    ) -> tuple[TensorDict, AdamState]:
        _check_same_keys(grads, params)
        _check_state(state, AdamState, ("mu", "nu"), params)
        decayed = grads = _cast_like(grads, params)
        if weight_decay:
            decayed = _map_lists(
                lambda g, p: torch._foreach_add(g, p, alpha=weight_decay), grads, params
            )
        count = state.steps + 1
        # The moments with foreach operations (Python-float coefficients); the bias corrections
        # are 0-d tensors (the step count is a tensor), applied leaf by leaf.
        mu = _map_lists(
            lambda m, g: torch._foreach_add(torch._foreach_mul(m, beta1), g, alpha=1 - beta1),
            state.mu,
            decayed,
        )
        nu = _map_lists(
            lambda v, g: torch._foreach_addcmul(
                torch._foreach_mul(v, beta2), g, g, value=1 - beta2
            ),
            state.nu,
            decayed,
        )
        roots = _map_lists(torch._foreach_sqrt, nu)
        step = count.to(torch.float64)
        step_size = lr / (1 - beta1**step)
        root_correction = (1 - beta2**step).sqrt()
        new_params = _map(
            lambda p, m, r: p - step_size.to(p.dtype) * m / (r / root_correction.to(p.dtype) + eps),
            params,
            mu,
            roots,
        )
        return new_params, AdamState(count, mu, nu)

    return Optimizer(init, update)
