"""Helpers shared by the tests."""

from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-11)}
"""(rtol, atol) by dtype."""


def assert_close(actual: Tensor | None, expected: Tensor) -> None:
    """``torch.testing.assert_close`` with a tolerance set by the expected dtype (``actual`` may
    be an optional ``.grad``, which must then be set)."""
    assert actual is not None
    rtol, atol = TOLERANCES.get(expected.dtype, (1e-4, 1e-5))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def dotted_leaves(td: TensorDictBase) -> dict[str, Tensor]:
    """The leaves of a TensorDict keyed like ``named_parameters`` (``"0.weight"``)."""
    out: dict[str, Tensor] = {}
    for key, value in td.items(include_nested=True, leaves_only=True):
        nested: object = key
        name = ".".join(nested) if isinstance(nested, tuple) else str(nested)
        assert isinstance(value, Tensor)
        out[name] = value
    return out


def assert_leaves_close(actual: TensorDictBase, expected: dict[str, Tensor]) -> None:
    """Same names, shapes, dtypes and values (tolerance by dtype)."""
    found = dotted_leaves(actual)
    assert list(found) == list(expected)
    for name, value in found.items():
        reference = expected[name]
        assert value.shape == reference.shape, name
        assert value.dtype == reference.dtype, name
        assert_close(value, reference)


def reference_gramian(modules: tuple[nn.Module, ...], output: Tensor) -> Tensor:
    """``J Jᵀ`` with ``J`` built row by row: one ``torch.autograd.grad`` per element of
    ``output``, w.r.t. the modules' trainable parameters, concatenated."""
    params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
    rows = []
    for value in output.reshape(-1):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        parts = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        rows.append(torch.cat([part.reshape(-1) for part in parts]))
    jac = torch.stack(rows)
    return jac @ jac.T


def token_ids(vocabulary: int, batch: int, length: int, device: torch.device | str) -> Tensor:
    """Ids ``[batch, length]`` (batch ≥ 4, length ≥ 2) with a padding token (0) and tokens
    repeated within and across samples."""
    ids = torch.randint(1, vocabulary, (batch, length), device=device)
    ids[1, 0] = ids[0, 1]
    ids[2, 1] = ids[2, 0]
    ids[3, 1] = 0
    return ids


class NoHostSync(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Raises on the operators behind ``.item()``, ``bool(tensor)`` and ``if tensor:``."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))
