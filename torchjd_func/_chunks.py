"""Vector-Jacobian products of many cotangent rows, ``chunk_size`` rows at a time.

One implementation serves the functional core (``torch.func.vjp`` functions) and the autograd
front door (``torch.autograd.grad`` on an existing graph, which must free the graph on its last
call only).
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

ChunkVjp = Callable[[tuple[Tensor, ...], bool], tuple[Tensor, ...]]
"""``vjp(cotangents, is_last_call) -> gradients`` for one row (or a vmapped batch of rows)."""


def batched_vjp(
    vjp: ChunkVjp, cotangents: tuple[Tensor, ...], chunk_size: int | None
) -> tuple[Tensor, ...]:
    """Applies ``vjp`` to every row of ``cotangents`` (each ``[M, ...]``); returns ``[M, ...]``s.

    Rows are vmapped ``chunk_size`` at a time (``None``: all at once). A chunk of one row calls
    ``vjp`` directly, without ``vmap``, so ``chunk_size=1`` never relies on batching rules.
    """
    n_rows = cotangents[0].shape[0]
    size = n_rows if chunk_size is None else min(chunk_size, n_rows)
    chunks: list[tuple[Tensor, ...]] = []
    for start in range(0, n_rows, size):
        chunk = tuple(c[start : start + size] for c in cotangents)
        is_last = start + size >= n_rows
        if chunk[0].shape[0] == 1:
            single = vjp(tuple(c[0] for c in chunk), is_last)
            chunks.append(tuple(t.unsqueeze(0) for t in single))
        else:

            def vjp_of_rows(*rows: Tensor, is_last: bool = is_last) -> tuple[Tensor, ...]:
                return vjp(rows, is_last)

            chunks.append(vmap(vjp_of_rows)(*chunk))
    if len(chunks) == 1:
        return chunks[0]
    return tuple(torch.cat(column) for column in zip(*chunks, strict=True))
