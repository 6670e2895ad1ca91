"""The matcher's MLP half: the MLP sites of a decode-step graph, found by structure, never by class names.

A site is a *down* projection whose input is computed, through elementwise ops only, from *up* projection(s):
- plain: ``down(act(up(x)))`` (OPT's ``fc1 -> relu -> fc2`` on a 2-D flatten, GPT-NeoX's, GPT-2's Conv1D
  ``addmm``s with their views);
- gated: ``down(act(gate(x)) * up(x))`` (Llama-style; ReLU-fied Llama/Mistral), also with gate and up as the two
  halves of one fused projection (Phi-3's ``gate_up_proj``, chunked along its output).
Projections are ``linear``, Conv1D's ``addmm`` and ``matmul`` by a 2-D weight (:func:`.graph.is_projection`). The
activation is named from the ops between: a bare ``relu`` and, in plain MLPs, the squared ReLU ``relu2``
(``square(relu(.))``: Nemotron, Persimmon) have exact zeros, which Polar's neuron sparsity needs; any other
activation (SiLU, GELU, GPT-2's tanh-GELU chain) keeps the site dense with that reason. The site's layer is the
decoder layer around it (``graph.layer_of``), as for attention sites.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .graph import bound_args, is_projection, layer_of, op_name, same_size, shape_of, static_int

__all__ = ["MlpSite", "find_mlp_sites"]

# Ops an MLP's activation is made of (GPT-2's tanh GELU is a chain of them); anything else ends the search.
_ELEMENTWISE = ("relu", "activation", "mul", "add", "pow", "square", "tanh", "reshape", "alias", "dropout", "dtensor")
SPARSE_ACTIVATIONS = ("relu", "relu2")  # exact zeros wherever the up projection is <= 0
_SEARCH_LIMIT = 32  # nodes between the projections (GPT-2's tanh GELU is 8)


@dataclass(eq=False)
class MlpSite:
    """One MLP: its projections, its activation and, where it can't be sparsified, why."""

    down: fx.Node
    up: fx.Node
    gate: fx.Node | None  # gated MLPs: the projection under the activation (``up`` is the other factor)
    activation: str  # "relu", "relu2", or the op names between the projections ("gelu", "silu", "add+mul+pow+tanh")
    layer: int | None
    layer_module: str | None
    hidden_size: int | None
    ffn_size: int | None
    dense_reason: str | None = None
    halves: tuple[int, int] | None = None  # fused gate/up (``gate is up``): (gate's half, up's half) of its output

    @property
    def has_exact_zeros(self) -> bool:
        """The activation is one the sparse MLP computes (:data:`SPARSE_ACTIVATIONS`)."""
        return self.activation in SPARSE_ACTIVATIONS


def find_mlp_sites(gm: fx.GraphModule) -> list[MlpSite]:
    """Every MLP of ``gm`` in graph order (see the module docstring), with the reason where it must stay dense."""
    sites = []
    for node in gm.graph.nodes:
        if is_projection(node):
            site = _match_site(node)
            if site is not None:
                sites.append(site)
    return sites


def _match_site(down: fx.Node) -> MlpSite | None:
    source = bound_args(down, op_name(down)).get("input")
    if not isinstance(source, fx.Node):
        return None
    ups, ops = _projections_above(source)
    if not ups or len(ups) > 2:
        return None
    layer = layer_of(down)
    up, gate, halves = ups[0], None, None
    if len(ups) == 1:  # in order when the ops are one chain (relu then square: relu2), else the set of them
        if _half_of(up):
            return None  # half of a projection feeding a plain MLP: not a structure the rewrite knows
        chain = _ops_between(_unviewed(source), up, inclusive=True)
        activation = _activation(chain if len(chain) == len(ops) else ops)
    else:  # gated: the factor with the activation on it is the gate
        up, gate = _split_gate(source, ups)
        if gate is None:
            return None
        activation = _activation(_ops_between(_unviewed(source), gate))
        if _half_of(up) or _half_of(gate):  # one fused projection, cut in two
            if not (_half_of(up) and _half_of(gate)) or _half_of(up)[0] is not _half_of(gate)[0]:
                return None
            (fused, up_half), (_, gate_half) = _half_of(up), _half_of(gate)
            up = gate = fused
            halves = (gate_half, up_half)
    width = _width(up)
    site = MlpSite(down=down, up=up, gate=gate, activation=activation, layer=layer[1] if layer else None,
                   layer_module=layer[0] if layer else None, hidden_size=_width(down),
                   ffn_size=width // 2 if halves and width else width, halves=halves)
    site.dense_reason = _why_dense(site)
    return site


def _why_dense(site: MlpSite) -> str | None:
    if not site.has_exact_zeros:
        return f"activation {site.activation} has no exact zeros (only ReLU MLPs are sparsified)"
    if site.activation != "relu" and site.gate is not None:
        return f"gated MLP with activation {site.activation}: the gated sparse MLP computes relu(gate) * up only"
    if site.layer is None:
        return "not inside an item of a module list (a decoder layer), so it has no layer index for a router"
    if site.hidden_size is None or site.ffn_size is None:
        return "hidden or ffn width unknown or dynamic"
    return None


def _projections_above(source: fx.Node) -> tuple[list[fx.Node], list[str]]:
    """The projections that ``source`` is computed from through elementwise ops, and those ops' names in order."""
    seen, frontier, projections, ops = {source}, [source], [], []
    while frontier and len(seen) < _SEARCH_LIMIT:
        node = frontier.pop(0)
        if is_projection(node) or _half_of(node):
            projections.append(node)
            continue
        name = op_name(node)
        if node.op not in ("call_function", "call_method") or name not in _ELEMENTWISE:
            return [], []  # something other than an activation between: not an MLP
        if name not in ("reshape", "alias", "dropout", "dtensor"):  # not activations
            ops.append(_activation_name(node))
        # DTensor.from_local also reads its device mesh (a graph input): the tensor is its first argument
        for parent in node.all_input_nodes if name != "dtensor" else node.all_input_nodes[:1]:
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return projections, ops


def _half_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(projection, 0 or 1) when ``node`` is the first or second half, along the last dim, of a projection's output
    cut in two equal pieces (``chunk(2, -1)``, ``split(width // 2, -1)``): read from the pieces' shapes."""
    if op_name(node) != "getitem" or len(node.args) != 2 or node.args[1] not in (0, 1):
        return None
    pieces_node = node.args[0]
    if not isinstance(pieces_node, fx.Node) or op_name(pieces_node) != "split":
        return None
    projection = pieces_node.args[0]
    if not isinstance(projection, fx.Node) or not is_projection(projection):
        return None
    pieces = pieces_node.meta.get("example_value", pieces_node.meta.get("val"))
    whole = shape_of(projection)
    if not isinstance(pieces, (tuple, list)) or len(pieces) != 2 or whole is None or _width(projection) is None:
        return None
    width = _width(projection)
    for piece in pieces:
        shape = getattr(piece, "shape", ())
        if (width % 2 or len(shape) != len(whole) or static_int(shape[-1]) != width // 2
                or not all(same_size(a, b) for a, b in zip(shape[:-1], whole[:-1], strict=True))):
            return None
    return projection, node.args[1]


def _split_gate(source: fx.Node, ups: list[fx.Node]) -> tuple[fx.Node, fx.Node | None]:
    """(up, gate) of a gated MLP ``act(gate) * up``: the factor computed from its projection by no op is ``up``."""
    product = _unviewed(source)
    if op_name(product) != "mul" or len(product.all_input_nodes) != 2:
        return ups[0], None
    first, second = (_unviewed(arg) for arg in product.all_input_nodes)
    if first in ups and second not in ups:
        return first, ups[1] if ups[0] is first else ups[0]
    if second in ups and first not in ups:
        return second, ups[1] if ups[0] is second else ups[0]
    return ups[0], None


def _ops_between(product: fx.Node, gate: fx.Node, inclusive: bool = False) -> list[str]:
    """The activation ops from ``gate`` up to the gated product (its operand on the gate's side), in order; with
    ``inclusive``, up to and including ``product`` itself (a plain MLP's down input)."""
    for arg in [product] if inclusive else product.all_input_nodes:
        ops, node = [], _unviewed(arg)
        while node is not gate and op_name(node) in _ELEMENTWISE and node.all_input_nodes:
            if op_name(node) not in ("reshape", "alias", "dropout", "dtensor"):
                ops.append(_activation_name(node))
            node = _unviewed(node.all_input_nodes[0])
        if node is gate:
            return ops[::-1]
    return ["unknown"]


def _activation(ops: list[str]) -> str:
    """'relu' for a bare ReLU, 'relu2' for a square of one (ops in order from the projection), else the distinct
    ops between the projections ('silu', 'add+mul+pow+tanh', ...)."""
    if ops == ["relu", "square"]:
        return "relu2"
    return "+".join(sorted(set(ops))) or "identity"


def _activation_name(node: fx.Node) -> str:
    name = op_name(node)
    if name == "pow" and len(node.args) == 2 and node.args[1] == 2:  # torch.export writes square as pow(x, 2)
        return "square"
    return str(getattr(node.target, "__name__", node.target)) if name == "activation" else name


def _unviewed(node: fx.Node) -> fx.Node:
    while op_name(node) in ("reshape", "alias") and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _width(projection: fx.Node) -> int | None:
    """The static output width of ``projection`` (its value's last dimension)."""
    shape = shape_of(projection)
    return static_int(shape[-1]) if shape else None
