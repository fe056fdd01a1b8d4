"""Records of the calls of the engine's modules, kept in the autograd graph they belong to.

A forward hook stores each call (its inputs and which of its outputs require grad) in the
``metadata`` dict of the autograd nodes of its outputs. The record thus lives exactly as long as
that part of the graph: a forward whose output never reaches :meth:`Engine.compute_gramian` leaves
nothing behind once its graph is freed, and the engine itself holds no activation. A record holds
the call's inputs (upstream of its output nodes) and never its outputs, so it closes no reference
cycle through the C++ graph, which Python's garbage collector could not break.

An in-place operation on a module's output (``nn.ReLU(inplace=True)``, ``out += identity``)
gives the output a new node whose next edge is the recorded one, so the record stays in the graph
and its cotangent is the derivative w.r.t. the output as the module returned it. Not so for an
output that is a *view* (``InstanceNorm``, ``nn.Linear`` on ``[B, T, in]``, a module ending in
``.view``/``[:, :k]``): an in-place operation on a view rewrites the history of its base and
drops the view's node, record included. Such outputs are returned through :class:`_Anchor`, an
identity autograd node (same values, same storage, not a view), on which the record is kept.
"""

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

# `torch.utils._pytree` is private but is what torch.func itself uses to walk module inputs and
# outputs; TorchJD's engine relies on it too.
from torchjd_func._torch_compat import tree_flatten, tree_leaves, tree_unflatten

_TOKENS = itertools.count()


class OutputSlot(NamedTuple):
    """One output of a call that requires grad: where it is in the flattened output pytree."""

    position: int
    """Position among the leaves of ``tree_flatten(output)``."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


@dataclass(eq=False)
class Call:
    """One recorded call ``module(*args, **kwargs)``."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slots: list[OutputSlot]
    """The outputs that require grad, in the order of the output pytree's leaves."""
    versions: list[int]
    """Version counters of the input tensors at the end of the call."""
    aliased: bool = False
    """Whether outputs share memory without coming from one node (see ``_anchor_outputs``)."""

    def input_tensors(self) -> list[Tensor]:
        return [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, Tensor)]


class Reached(NamedTuple):
    """An output of a recorded call, found in the graph of the differentiated tensor."""

    call: Call
    slot: int
    """Index into ``call.slots``."""
    edge: GradientEdge


class RecordingState:
    """What the hooks of one engine share: the metadata key and whether to record."""

    def __init__(self) -> None:
        self.key = f"torchjd_func.autogram.{next(_TOKENS)}"
        self.paused = False


class _Anchor(torch.autograd.Function):
    """Identity on tensors, as a node of its own: its outputs share the values, storage and
    version counters of its inputs but are not views, so an in-place operation on them keeps this
    node (and the record on it) in the graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:
        return grads


def _storage_key(tensor: Tensor) -> int | None:
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor wrapped by torch.func
        return None
    return pointer or None  # 0: an empty (or meta) storage, which identifies nothing


class _Outputs(NamedTuple):
    leaves: list[Any]
    """The output leaves, anchored where needed."""
    replaced: bool
    aliased: bool
    """Whether outputs to record share memory with each other without coming from one node
    (e.g. a tensor and a view of it): their cotangents overlap and cannot be told apart."""


def _anchor_outputs(
    module: nn.Module, inputs: list[Tensor], leaves: list[Any], candidates: list[Tensor]
) -> _Outputs:
    """Routes the outputs to record (``candidates``) through one :class:`_Anchor` node when they
    need it: a view (an in-place operation on it would drop its node), or one of several outputs
    (the node of one may be upstream of another's, as in ``return h, 2 * h``, whose cotangent would
    then include the other's). The anchor's outputs get the cotangents of their uses outside the
    module only.

    An output sharing memory with an input, a parameter or a buffer of the module, or with another
    output, is left as is: anchoring would hide the aliasing from autograd (an in-place operation on
    it would change the other tensor without rewriting its history).
    """
    unique = list({id(t): t for t in candidates}.values())
    if len(unique) == 1 and not unique[0]._is_view():
        return _Outputs(leaves, False, False)
    keys = {id(t): _storage_key(t) for t in unique}
    sharing: dict[int | None, list[Tensor]] = {}
    for t in unique:
        sharing.setdefault(keys[id(t)], []).append(t)
    aliased = any(
        key is not None and len({id(t.grad_fn) for t in group}) > 1
        for key, group in sharing.items()
    )
    outside = {id(t) for t in unique}
    known = {
        _storage_key(t)
        for t in [*inputs, *module.parameters(), *module.buffers()]
        + [leaf for leaf in leaves if isinstance(leaf, Tensor) and id(leaf) not in outside]
    }
    chosen = [
        t
        for t in unique
        if keys[id(t)] is not None and keys[id(t)] not in known and len(sharing[keys[id(t)]]) == 1
    ]
    if not chosen:
        return _Outputs(leaves, False, aliased)
    # `Function.apply` is untyped in torch's annotations.
    through: tuple[Tensor, ...] = _Anchor.apply(*chosen)  # type: ignore[no-untyped-call]
    anchored = dict(zip((id(t) for t in chosen), through, strict=True))
    new = [anchored.get(id(leaf), leaf) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    return _Outputs(new, True, aliased)


class Recorder:
    """Forward hook (``with_kwargs=True``) recording each call in the graph. It returns ``None``
    (the module's outputs are left untouched) unless an output is a view or the module has
    several outputs to record: then the outputs with those anchored (see
    :func:`_anchor_outputs`)."""

    def __init__(self, state: RecordingState) -> None:
        self.state = state

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if self.state.paused:
            return None
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        input_edges = [_edge_key(get_gradient_edge(t)) for t in inputs if t.requires_grad]
        flat, spec = tree_flatten(output)
        # No graph (no grad needed) or a leaf tensor (a parameter returned as is): nothing to
        # record. A parameter used that way is caught by `check_params_used_inside`. An input
        # returned unchanged carries no derivative w.r.t. the module's params; recording it would
        # also make the record reference its own node (a cycle).
        candidates = [
            leaf
            for leaf in flat
            if isinstance(leaf, Tensor)
            and leaf.grad_fn is not None
            and _edge_key(get_gradient_edge(leaf)) not in input_edges
        ]
        if not candidates:
            return None
        outputs = _anchor_outputs(module, inputs, flat, candidates)
        chosen = {id(t) for t in candidates}
        recorded = {id(outputs.leaves[i]) for i, leaf in enumerate(flat) if id(leaf) in chosen}
        slots: list[OutputSlot] = []
        edges: list[GradientEdge] = []
        for index, leaf in enumerate(outputs.leaves):
            if id(leaf) in recorded:
                slots.append(OutputSlot(index, leaf.shape, leaf.dtype, leaf.device))
                edges.append(get_gradient_edge(leaf))
        call = Call(module, args, kwargs, slots, [t._version for t in inputs], outputs.aliased)
        for slot, edge in enumerate(edges):
            entry = (call, slot, edge.output_nr)
            _metadata(edge.node).setdefault(self.state.key, []).append(entry)
        return tree_unflatten(outputs.leaves, spec) if outputs.replaced else None


def _metadata(node: Node) -> dict[str, Any]:
    # A property at run time, declared as a method in torch's annotations.
    return cast("dict[str, Any]", node.metadata)


def _edge_key(edge: GradientEdge) -> tuple[int, int]:
    return id(edge.node), edge.output_nr


def _next_nodes(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _walk(root: Node, children: Callable[[Node], Iterable[Node]]) -> list[Node]:
    """The nodes reachable from ``root``, each once (they are kept alive by the returned list, so
    their ids stay unique)."""
    seen = {id(root)}
    stack, order = [root], []
    while stack:
        node = stack.pop()
        order.append(node)
        for child in children(node):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return order


def _entries(node: Node, key: str) -> list[tuple[Call, int, int]]:
    entries: list[tuple[Call, int, int]] = _metadata(node).get(key, [])
    return entries


def reached_calls(root: Node, key: str) -> tuple[list[Reached], list[Node]]:
    """The recorded outputs that ``root`` depends on, and the nodes holding their records."""
    reached: list[Reached] = []
    holders: list[Node] = []
    for node in _walk(root, _next_nodes):
        entries = _entries(node, key)
        if entries:
            holders.append(node)
            reached.extend(
                Reached(call, slot, GradientEdge(node, nr)) for call, slot, nr in entries
            )
    return reached, holders


def forget(holders: Iterable[Node], key: str) -> None:
    """Drops the records from the graph, releasing the inputs they hold."""
    for node in holders:
        _metadata(node).pop(key, None)


def check_params_used_inside(root: Node, key: str, owners: dict[int, str]) -> None:
    """Raises if a parameter named in ``owners`` (by id) reaches ``root`` other than through a
    recorded call.

    The walk jumps over each recorded call, from its output nodes straight to its inputs, so a
    parameter still found on the way is used outside the forward of the module that holds it
    (e.g. a parent module using ``self.child.weight`` directly): its derivative would be
    missing from the per-sample Jacobians.
    """

    def children(node: Node) -> list[Node]:
        entries = _entries(node, key)
        if not entries:
            return _next_nodes(node)
        return [
            get_gradient_edge(t).node
            for call, _, _ in entries
            for t in call.input_tensors()
            if t.requires_grad
        ]

    for node in _walk(root, children):
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if not _entries(node, key) and isinstance(variable, Tensor) and id(variable) in owners:
            raise ValueError(
                f"The parameter {owners[id(variable)]} is used outside the recorded forward of "
                "the module that holds it, e.g. by a parent module reading `self.child.weight` "
                "instead of calling `self.child`, by code outside the modules, or because it was "
                "made trainable after the Engine was created. With `batch_dim` set, each "
                "parameter must be used only inside the forward of its module: call the module "
                "(or re-create the Engine), or use `batch_dim=None`, which works for any code."
            )
