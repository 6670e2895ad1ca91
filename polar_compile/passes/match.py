"""The one matcher: self-attention sites of a decode-step graph, with the parts a rewrite needs.

A site is a ``scaled_dot_product_attention`` call, owned by the module that makes it (the innermost entry of its
``nn_module_stack``, e.g. ``model.layers.3.self_attn``). From it the matcher recovers, by walking the graph inside
that module only and never by module class names:
- the query projection: the nearest ``linear`` (or Conv1D's ``addmm``, or Falcon's ``x @ weight.T``) of the owner
  above the SDPA query (through RoPE, q-norms, pre-scaling, fused QKV splits); its input is the router input (the
  layer's post-norm hidden state);
- the KV cache tensors as they sit in memory: the SDPA key/value themselves (MHA, ``enable_gqa=True``) or the
  tensors under HF's ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, R, L, D).reshape(B, H, L, D)``). They must be
  the owner's own self-attention K/V: computed, or written into the cache in this graph, from a projection of the
  owner whose input is the router input. Cross-attention (K/V of the encoder's states, or a cache this graph does
  not write) stays dense;
- the mask, the scale, and the decoder layer: the innermost module around the call that is an item of a module
  list (``members.0.model.layers.3`` -> layer 3); a site outside any layer list stays dense, never renumbered.
Each site carries ``dense_reason``: None when it can be rewritten, else why it must stay dense. Calibration,
``explain``, export and the rewrite all read sites from :func:`find_attention_sites`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from .graph import (
    SDPA_DEFAULTS,
    bound_args,
    fake_value,
    is_dtensor,
    is_full_slice,
    is_projection,
    is_within,
    layer_of,
    module_path,
    op_name,
    same_size,
    shape_of,
    static_int,
    unsqueeze_dim_of_getitem,
)

__all__ = ["AttentionSite", "find_attention_sites"]

# How far above the SDPA query the query projection may sit (RoPE, norms and reshapes are ~20 nodes).
_QUERY_PROJECTION_SEARCH_LIMIT = 64


@dataclass(eq=False)  # identity: sites key per-site tables
class AttentionSite:
    """One SDPA call and its parts. Node fields are None where the matcher could not find them."""

    sdpa: fx.Node
    layer: int | None  # index in the decoder's layer list
    layer_module: str | None  # path of that decoder layer, e.g. "model.layers.3"
    module: str  # path of the module that calls SDPA (the owner)
    query: fx.Node
    key_cache: fx.Node | None  # [B, Hkv, L, D], before repeat_kv
    value_cache: fx.Node | None
    attn_mask: fx.Node | None  # [B|1, 1, 1, L]
    scale: float | fx.Node | None  # a node when Dynamo traces the scale as an unspecialised float (dynamic=True)
    query_projection: fx.Node | None  # the linear (or addmm) whose input is the router input
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    query_len: int | None
    hidden_size: int | None
    dense_reason: str | None = None  # why the decode rewrite does not apply (None: it does)
    ownership_reason: str | None = None  # why this is not a decoder layer's self-attention (None: it is)

    @property
    def router_input(self) -> fx.Node | None:
        """The activation entering the query projection: ``[B, T, hidden]`` (or ``[B*T, hidden]``)."""
        return None if self.query_projection is None else _input_of(self.query_projection)

    @property
    def is_decode(self) -> bool:
        """One query token per sequence: a decode step."""
        return self.query_len == 1

    @property
    def kind(self) -> str:
        """'decode' (one query token), 'prefill', or 'unknown' when the query length is not static."""
        return "unknown" if self.query_len is None else "decode" if self.is_decode else "prefill"


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every SDPA call of ``gm`` in graph order, with its parts and, where it can't be rewritten, the reason."""
    return [_match_site(node) for node in gm.graph.nodes if op_name(node) == "sdpa"]


def _match_site(sdpa: fx.Node) -> AttentionSite:
    args = {**SDPA_DEFAULTS, **bound_args(sdpa, "sdpa")}
    query, key, value = args["query"], args["key"], args["value"]
    q_shape, k_shape, v_shape = shape_of(query), shape_of(key), shape_of(value)
    layer = layer_of(sdpa)
    site = AttentionSite(
        sdpa=sdpa,
        layer=layer[1] if layer else None,
        layer_module=layer[0] if layer else None,
        module=module_path(sdpa),
        query=query,
        key_cache=None,
        value_cache=None,
        attn_mask=args["attn_mask"],
        scale=None,
        query_projection=None,
        num_heads=None,
        num_kv_heads=None,
        head_dim=None,
        query_len=None,
        hidden_size=None,
    )
    if q_shape is None or k_shape is None or v_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        site.dense_reason = site.ownership_reason = "query/key shapes unknown or not 4-D [B, H, T, D]"
        return site
    site.num_heads, site.query_len, site.head_dim = (static_int(s) for s in q_shape[1:])
    if site.num_heads is None or site.head_dim is None:
        site.dense_reason = site.ownership_reason = f"heads or head_dim are dynamic ({q_shape})"
        return site
    site.query_projection = _projection_above(query, site.module)
    router_in = shape_of(site.router_input)
    site.hidden_size = static_int(router_in[-1]) if router_in else None
    site.key_cache = _unrepeated_cache(key, site.num_heads)
    site.value_cache = _unrepeated_cache(value, site.num_heads)
    kv_shape = shape_of(site.key_cache)
    site.num_kv_heads = static_int(kv_shape[1]) if kv_shape else None
    scale = args["scale"]
    if isinstance(scale, (int, float)):
        site.scale = float(scale)
    elif scale is None:
        site.scale = 1.0 / math.sqrt(site.head_dim)
    elif isinstance(scale, fx.Node) and isinstance(scale.meta.get("example_value", scale.meta.get("val")),
                                                   (float, torch.SymFloat)):
        site.scale = scale
    site.ownership_reason = _why_not_owned(site)
    if site.ownership_reason is not None:
        site.ownership_reason += _tensor_parallel_hint(site)
    site.dense_reason = site.ownership_reason or _why_not_decode(site, args, v_shape)
    return site


def _why_not_owned(site: AttentionSite) -> str | None:
    """Why the site is not a decoder layer's self-attention with a known router input, or None."""
    if not site.module:
        return "the graph records no module for this SDPA call (no nn_module_stack), so nothing owns it"
    if site.layer is None:
        return (f"{site.module} is not inside an item of a module list (a decoder layer), so it has no layer index "
                "for a router")
    if site.query_projection is None:
        return (f"no linear/addmm/matmul-by-weight query projection inside {site.module} above the SDPA query "
                "(router input unknown)")
    if site.hidden_size is None:
        return "router input width is unknown or dynamic"
    if site.key_cache is None or site.value_cache is None:
        return "key/value are neither the KV cache nor HF's repeat_kv of it"
    for name, cache in (("key", site.key_cache), ("value", site.value_cache)):
        if not _is_own_kv(cache, site):
            return (f"{name} is not {site.module}'s own self-attention K/V (not computed or written in this graph "
                    "from its projection of the router input): cross-attention, an outside cache, or K/V from "
                    "another input (such as a latent projection)")
    mixing = _op_mixing_heads(site)
    if mixing is not None:
        return (f"{mixing} acts on the attention output between SDPA and the output projection (only reshapes and "
                "head-wise scalings may: else zeroing unselected heads at SDPA is not zeroing them there)")
    return None


def _tensor_parallel_hint(site: AttentionSite) -> str:
    """For a site that is not owned, when its module's nodes take or make ``DTensor``s through an op the matcher
    does not look through (tensor parallelism recorded in a form :func:`~.graph.op_name` does not know): that op,
    the likely cause (a TP site must never stay dense without saying so). "" otherwise."""
    for node in site.sdpa.graph.nodes:
        if node.op not in ("call_function", "call_method") or op_name(node) is not None:
            continue
        if not is_within(node, site.module):
            continue
        if is_dtensor(fake_value(node)) or any(is_dtensor(fake_value(arg)) for arg in node.all_input_nodes):
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            return (f"; tensor parallel: {site.module} takes or makes DTensors through {name!r}, which the matcher "
                    f"does not look through (torch {torch.__version__}), so it cannot follow the local tensors from "
                    "the projections to the attention")
    return ""


def _why_not_decode(site: AttentionSite, args: dict, v_shape: tuple) -> str | None:
    """Why an owned site can't take the selective decode rewrite, or None."""
    if site.query_len is None:
        return "query length is dynamic"
    if site.query_len != 1:
        return f"prefill (query length {site.query_len}); only decode steps are rewritten"
    if not _reads_a_cache(site.key_cache, site.module):
        return "K/V are computed in this step, not read from a KV cache (an encoder's attention): no past to skip"
    if args["is_causal"] is not False:
        return f"is_causal={args['is_causal']} with a single query"
    if isinstance(args["dropout_p"], fx.Node):
        return "dropout_p is a float traced as a graph input (its value is unknown when compiling)"
    if args["dropout_p"] != 0.0:
        return f"dropout_p={args['dropout_p']} (attention dropout is not supported)"
    if site.scale is None:
        return f"scale is neither a number nor a float in the graph ({args['scale']!r})"
    if shape_of(site.key_cache) != shape_of(site.value_cache) or static_int(v_shape[-1]) != site.head_dim:
        return f"value shape {v_shape} differs from key's (head_dim {site.head_dim})"
    if site.num_kv_heads is None or site.num_heads % site.num_kv_heads != 0:
        return f"{site.num_heads} query heads are not a multiple of {site.num_kv_heads} KV heads"
    mask = site.attn_mask
    if mask is not None:
        m_shape, k_shape = shape_of(mask), shape_of(site.key_cache)
        if m_shape is None or len(m_shape) != 4 or static_int(m_shape[1]) != 1 or static_int(m_shape[2]) != 1:
            return f"attn_mask shape {m_shape} is not [B|1, 1, 1, L] (per-head or per-query masks stay dense)"
        if not same_size(m_shape[3], k_shape[2]):
            return f"attn_mask length {m_shape[3]} differs from the cache length {k_shape[2]}"
        q_dtype, m_dtype = fake_value(site.query).dtype, fake_value(mask).dtype
        if m_dtype not in (torch.bool, q_dtype):
            return f"attn_mask dtype {m_dtype} is neither bool nor the query dtype {q_dtype}"
    return None


def _projection_above(start: fx.Node, owner: str) -> fx.Node | None:
    """Breadth-first up from ``start`` through nodes of module ``owner`` to the nearest projection
    (:func:`is_projection`), not searching past any projection nor leaving the module."""
    return _search_up(start, lambda node: is_within(node, owner), is_projection)


def _search_up(start: fx.Node, inside: Callable[[fx.Node], bool], wanted: Callable[[fx.Node], bool]
               ) -> fx.Node | None:
    """The nearest ancestor of ``start`` (itself included) that is ``wanted``, walking only ``inside`` nodes."""
    if not inside(start):
        return None
    seen, frontier = {start}, deque([start])
    while frontier and len(seen) < _QUERY_PROJECTION_SEARCH_LIMIT:
        node = frontier.popleft()
        if wanted(node):
            return node
        for parent in node.all_input_nodes:
            if parent not in seen and parent.op in ("call_function", "call_method") and inside(parent):
                seen.add(parent)
                frontier.append(parent)
    return None


def _is_own_kv(cache: fx.Node, site: AttentionSite) -> bool:
    """True when ``cache`` (K or V as SDPA reads it, before ``repeat_kv``) is computed by the owner from a projection
    of the router input, or is a tensor the owner writes such a value into in this graph (a static KV cache)."""
    for value in (cache, *_written_into(cache, site.module)):
        projection = _projection_above(value, site.module) if isinstance(value, fx.Node) else None
        if projection is not None and _same_tensor(_input_of(projection), site.router_input):
            return True
    return False


def _written_into(node: fx.Node, owner: str, depth: int = 2) -> list[fx.Node]:
    """The values module ``owner`` writes into ``node`` in place, and those written into them in turn (a sliding
    window cache: ``new = cache.roll(-1, -2); new[..., -1:, :] = k; cache.copy_(new)``)."""
    values = []
    for user in node.users:
        if op_name(user) == "write" and user.args[0] is node and is_within(user, owner):
            value = user.args[-1]
            if isinstance(value, fx.Node):
                values.append(value)
                if depth > 1:
                    values += _written_into(value, owner, depth - 1)
    return values


def _reads_a_cache(cache: fx.Node, owner: str) -> bool:
    """True when ``cache`` holds past K/V: a tensor written in place in this graph (static cache; export graphs
    read the write's result), or a concatenation with earlier K/V (dynamic cache)."""
    return bool(_written_into(cache, owner)) or op_name(cache) in ("write", "cat")


# Ops between SDPA and the output projection that keep each head's values apart (zeros stay zeros).
_HEADWISE = ("reshape", "alias", "transpose", "mul", "dropout", "getitem", "dtensor")
_OUTPUT_SEARCH_LIMIT = 16


def _op_mixing_heads(site: AttentionSite) -> str | None:
    """The first op on the way from SDPA to the owner's output projection that may turn an unselected head's zeros
    into something else (a norm over all heads, as BitNet's ``attn_sub_norm``; a sum), or None."""
    frontier, seen = [site.sdpa], {site.sdpa}
    while frontier and len(seen) < _OUTPUT_SEARCH_LIMIT:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen or not is_within(user, site.module):
                continue
            seen.add(user)
            if is_projection(user):
                continue
            if op_name(user) not in _HEADWISE:
                return str(getattr(user.target, "__name__", user.target))
            frontier.append(user)
    return None


def _input_of(projection: fx.Node) -> fx.Node | None:
    """The projection's input as a local tensor: under tensor parallelism (``parallelize_module``) a projection
    reads ``DTensor.from_local(x)`` (or Dynamo's ``prim from_local`` closure of ``x``), and ``x`` is the input."""
    arg = bound_args(projection, op_name(projection)).get("input")
    while isinstance(arg, fx.Node) and op_name(arg) == "dtensor" and arg.args and isinstance(arg.args[0], fx.Node):
        arg = arg.args[0]
    return arg if isinstance(arg, fx.Node) else None


def _same_tensor(a: fx.Node | None, b: fx.Node | None) -> bool:
    """True when ``a`` and ``b`` are the same node up to reshapes (Conv1D flattens its input per projection)."""
    return a is not None and b is not None and _unreshaped(a) is _unreshaped(b)


def _unreshaped(node: fx.Node) -> fx.Node:
    while op_name(node) == "reshape" and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _unrepeated_cache(node: fx.Node, num_heads: int) -> fx.Node | None:
    """The ``[B, Hkv, L, D]`` tensor that SDPA's key/value ``node`` reads, looking through HF's ``repeat_kv``.

    Accepts ``node`` itself when it has ``Hkv`` dividing ``num_heads`` heads (MHA, ``enable_gqa=True``), or the
    exact chain ``reshape(expand(unsqueeze(src, 2), [B, Hkv, R, L, D]), [B, Hkv * R, L, D])``; anything else is
    None, so a site whose K/V come from elsewhere stays dense.
    """
    shape = shape_of(node)
    if shape is None or len(shape) != 4:
        return None
    if op_name(node) == "reshape":
        expanded = _skip_aliases(node.args[0])
        e_shape = shape_of(expanded)
        if op_name(expanded) == "expand" and e_shape is not None and len(e_shape) == 5:
            unsqueezed = _skip_aliases(expanded.args[0])
            source = _skip_aliases(_unsqueezed_source(unsqueezed, dim=2))
            s_shape = shape_of(source)
            if (
                s_shape is not None
                and len(s_shape) == 4
                and all(same_size(a, b) for a, b in zip(s_shape[:2], e_shape[:2], strict=False))
                and all(same_size(a, b) for a, b in zip(s_shape[2:], e_shape[3:], strict=False))
                and same_size(s_shape[1] * e_shape[2], shape[1])
            ):
                return source
    kv_heads = static_int(shape[1])
    if kv_heads is not None and num_heads % kv_heads == 0:
        return node
    return None


def _unsqueezed_source(node: fx.Node, dim: int) -> fx.Node | None:
    """``src`` when ``node`` is ``src.unsqueeze(dim)`` or ``src[:, :, None]``-style indexing at ``dim``."""
    name = op_name(node)
    if name == "unsqueeze":
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] if axis == dim else None
    if name == "getitem" and isinstance(node.args[0], fx.Node):
        return node.args[0] if unsqueeze_dim_of_getitem(node.args[1]) == dim else None
    return None


def _skip_aliases(node: fx.Node) -> fx.Node:
    """Step over ops that return their input unchanged (full slices, aliases, ``contiguous``)."""
    while isinstance(node, fx.Node) and _is_identity_view(node):
        node = node.args[0]
    return node


def _is_identity_view(node: fx.Node) -> bool:
    name = op_name(node)
    if name == "alias":
        return True
    if name == "slice":
        return shape_of(node) == shape_of(node.args[0])
    return name == "getitem" and isinstance(node.args[1], tuple) and all(map(is_full_slice, node.args[1]))
