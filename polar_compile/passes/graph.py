"""FX helpers shared by the passes: one table that names ops on Dynamo (torch-level) and export (ATen) graphs.

Dynamo graphs call ``torch._C._nn.linear`` or ``Tensor.expand`` (``call_method``); ``torch.export`` graphs call
``aten.linear.default`` or ``aten.expand.default``. The matcher only ever asks :func:`op_name`, so one matcher
serves both.
"""

from __future__ import annotations

import operator
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

aten = torch.ops.aten

# canonical name -> call_function targets (torch-level and ATen overloads)
_FUNCTION_TARGETS: dict[str, tuple[Any, ...]] = {
    "sdpa": (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default),
    "linear": (F.linear, aten.linear.default),
    "addmm": (torch.addmm, aten.addmm.default),  # HF Conv1D (GPT-2): addmm(bias, x.view(-1, d_in), weight)
    "matmul": (operator.matmul, torch.matmul, aten.matmul.default, aten.mm.default),  # Falcon: x @ weight.T
    "expand": (torch.Tensor.expand, aten.expand.default),
    "reshape": (
        torch.reshape,
        torch.Tensor.reshape,
        torch.Tensor.view,
        aten.reshape.default,
        aten.view.default,
        aten._unsafe_view.default,
    ),
    "unsqueeze": (torch.unsqueeze, torch.Tensor.unsqueeze, aten.unsqueeze.default),
    "softmax": (F.softmax, torch.softmax, torch.Tensor.softmax, aten._softmax.default, aten.softmax.int),
    # what MLP activations are made of (GPT-2's tanh GELU is a chain of mul, pow, add, tanh)
    "relu": (F.relu, torch.relu, torch.Tensor.relu, aten.relu.default),
    "activation": (F.silu, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.Tensor.sigmoid, aten.silu.default,
                   aten.gelu.default, aten.sigmoid.default, aten.tanh.default, F.leaky_relu, aten.leaky_relu.default,
                   F.elu, aten.elu.default, F.selu, F.celu, F.softplus, aten.softplus.default, F.mish, torch.erf,
                   aten.erf.default, torch.exp, aten.exp.default),
    "mul": (operator.mul, torch.mul, torch.Tensor.mul, aten.mul.Tensor),
    "add": (operator.add, torch.add, torch.Tensor.add, aten.add.Tensor),
    "pow": (operator.pow, torch.pow, torch.Tensor.pow, aten.pow.Tensor_Scalar),
    "square": (torch.square, torch.Tensor.square, aten.square.default),  # squared ReLU (Nemotron, Persimmon)
    "dropout": (F.dropout, aten.dropout.default),
    "getitem": (operator.getitem,),
    # a tensor cut in pieces (Phi-3's fused gate/up projection, chunked in two)
    "split": (torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split, aten.chunk.default,
              aten.split.Tensor, aten.split_with_sizes.default),
    "cat": (torch.cat, aten.cat.default),
    "transpose": (torch.transpose, torch.Tensor.transpose, aten.transpose.int, torch.permute, torch.Tensor.permute,
                  aten.permute.default, torch.t, torch.Tensor.t, aten.t.default),
    "slice": (aten.slice.Tensor,),
    "alias": (aten.alias.default, torch.Tensor.contiguous, aten.contiguous.default, aten.clone.default),
    # in-place writes into a tensor (KV-cache updates); the written value is the last tensor argument
    "write": (
        torch.Tensor.index_copy_,
        aten.index_copy_.default,
        torch.Tensor.copy_,
        aten.copy_.default,
        torch.Tensor.index_put_,
        aten.index_put_.default,
        operator.setitem,
    ),
}
_METHOD_NAMES: dict[str, str] = {
    "expand": "expand",
    "reshape": "reshape",
    "view": "reshape",
    "unsqueeze": "unsqueeze",
    "contiguous": "alias",
    "softmax": "softmax",
    "relu": "relu",
    "transpose": "transpose",
    "permute": "transpose",
    "mul": "mul",
    "add": "add",
    "pow": "pow",
    "square": "square",
    "index_copy_": "write",
    "copy_": "write",
    "index_put_": "write",
    "__setitem__": "write",
    "chunk": "split",
    "split": "split",
    "to_local": "dtensor",  # tensor parallelism's DTensor wrapping: same values, another layout
    "redistribute": "dtensor",
}
_TARGET_TO_NAME: dict[Any, str] = {t: name for name, ts in _FUNCTION_TARGETS.items() for t in ts}

# Argument names of the ops whose arguments the matcher reads (positional order of the torch signature).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    "linear": ("input", "weight", "bias"),
    "addmm": ("bias", "input", "weight"),
    "matmul": ("input", "other"),
}
PROJECTIONS = ("linear", "addmm", "matmul")  # ops whose "input" a router can read (matmul only by a 2-D weight)
SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def is_projection(node: fx.Node) -> bool:
    """A linear layer: ``linear``, ``addmm``, or ``matmul`` by a 2-D right operand (``x @ weight.T``); a matmul of
    two activations (batched) is not one."""
    name = op_name(node)
    if name != "matmul":
        return name in PROJECTIONS
    other = shape_of(bound_args(node, name).get("other"))
    return other is not None and len(other) == 2


def op_name(node: fx.Node) -> str | None:
    """The canonical name of the op ``node`` calls ('sdpa', 'linear', 'expand', ...), or None if not in the table."""
    if node.op == "call_method":
        return _METHOD_NAMES.get(str(node.target))
    if node.op == "call_function":
        try:
            name = _TARGET_TO_NAME.get(node.target)
        except TypeError:  # unhashable target
            return None
        return "dtensor" if name is None and (_is_from_local(node.target) or _is_prim_dtensor(node.target)) else name
    return None


def _is_from_local(target: Any) -> bool:
    """``DTensor.from_local`` (tensor parallelism's wrapping of a local tensor, same values), looked up only where
    ``torch.distributed.tensor`` is imported: a graph without DTensors cannot call it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and target is module.DTensor.from_local


def is_dtensor(value: Any) -> bool:
    """True for a ``DTensor`` (real or fake), looked up only where ``torch.distributed.tensor`` is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


# How Dynamo records DTensor's from_local / redistribute / to_local while the device mesh is not an opaque graph
# input (torch 2.11 and earlier; pytorch#176661 changed it after 2.11's branch cut, and torch 2.13 records
# ``DTensor.from_local(x, mesh, ...)`` and the two methods as they are): each is a call_function of a closure that
# holds the mesh and placements, with its tensor as the first argument, named by Dynamo for debugging
# (torch/_dynamo/variables/torch.py and tensor.py).
PRIM_DTENSOR_NAMES = ("prim from_local", "prim_redistribute", "prim_to_local")


def _is_prim_dtensor(target: Any) -> bool:
    """A closure Dynamo made for a DTensor call (:data:`PRIM_DTENSOR_NAMES`)."""
    return callable(target) and getattr(target, "__name__", None) in PRIM_DTENSOR_NAMES


def bound_args(node: fx.Node, name: str) -> dict[str, Any]:
    """Positional and keyword arguments of ``node`` keyed by the parameter names of op ``name``."""
    params = SIGNATURES[name]
    bound = dict(zip(params, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def fake_value(node: Any) -> torch.Tensor | None:
    """The fake tensor recorded for ``node`` by Dynamo (``example_value``) or export (``val``), if any."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> tuple[Any, ...] | None:
    """The shape of ``node``'s value (ints or SymInts), or None when unknown."""
    value = fake_value(node)
    return tuple(value.shape) if value is not None else None


def static_int(value: Any) -> int | None:
    """``value`` as a Python int when it is statically known, else None (a symbolic size)."""
    return int(value) if is_concrete_int(value) else None


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes (ints or SymInts) are provably equal."""
    return bool(statically_known_true(a == b))


_DYNAMO_ROOT = re.compile(r"^[LG]\[[^\]]*\](?:\[\d+\])*\.?")  # "L['self'].", "L['args'][0].", "G['model']."
_DICT_MODULES = re.compile(r"\.?(?:__dict__\[)?'?_modules'?\]?\['([^']+)'\]")  # "__dict__['_modules']['x']" -> ".x"
_ITEM_INDEX = re.compile(r"(?:\.|\[)(\d+)\]?$")  # a path ending in ".3" or "[3]": an item of a module list


def module_stack(node: fx.Node) -> list[str]:
    """The dotted paths of the modules whose calls produced ``node``, outermost first ([] when not recorded).

    Dynamo writes "L['self'].model.layers.0.self_attn", export writes "model.layers.0.self_attn"; both become the
    latter.
    """
    stack = node.meta.get("nn_module_stack") or {}
    return [_DICT_MODULES.sub(r".\1", _DYNAMO_ROOT.sub("", str(path))).lstrip(".") for path, _ in stack.values()]


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced ``node`` ('' when the graph does not record it)."""
    stack = module_stack(node)
    return stack[-1] if stack else ""


def is_within(node: fx.Node, owner: str) -> bool:
    """True when ``node`` was produced inside module ``owner`` (by it or by one of its submodules)."""
    path = module_path(node)
    return bool(owner) and (path == owner or path.startswith(owner + "."))


def layer_of(node: fx.Node) -> tuple[str, int] | None:
    """The innermost module around ``node`` that is an item of a module list (a decoder layer), as (path, index).

    ``members.0.model.layers.3.self_attn`` -> ("members.0.model.layers.3", 3): the index that follows the layer
    list closest to the node, never the first integer of the path.
    """
    for path in reversed(module_stack(node)):
        match = _ITEM_INDEX.search(path)
        if match:
            return path, int(match.group(1))
    return None


def is_full_slice(index: Any) -> bool:
    """True for ``slice(None)``, ``slice(None, None, None)`` and ``Ellipsis`` (indexing that selects everything)."""
    return index is Ellipsis or (isinstance(index, slice) and index == slice(None, None, None))


def unsqueeze_dim_of_getitem(index: Sequence[Any]) -> int | None:
    """For ``x[:, :, None, ...]``-style indices that only insert one new axis, the position of that axis."""
    if not isinstance(index, tuple):
        return None
    nones = [i for i, item in enumerate(index) if item is None]
    if len(nones) != 1 or not all(item is None or is_full_slice(item) for item in index):
        return None
    if any(item is Ellipsis for item in index[: nones[0]]):
        return None
    return nones[0]


_VIEW_OPS = ("reshape", "expand", "unsqueeze", "getitem", "slice", "alias")


def erase_dead_views(graph: fx.Graph, node: object) -> None:
    """Erase ``node`` and the view ops above it that nothing uses any more (a dead ``repeat_kv``)."""
    while isinstance(node, fx.Node) and not node.users and op_name(node) in _VIEW_OPS:
        parent = node.args[0]
        graph.erase_node(node)
        node = parent
