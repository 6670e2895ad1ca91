"""The ``polar`` Dynamo backend: options -> :class:`PolarConfig` -> graph passes -> Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(m, backend="polar")`` works
after ``pip install`` without importing this package.

Where the routers come from, and why a compiled graph can only run with its own (decided in issue 12): Dynamo
caches a graph per code object and reuses it whenever its guards pass, and it guards only what the traced code
touched. A side table read by the backend at compile time is invisible to those guards, so a re-attach, a second
model of the same class, or a new density silently reused the first graph (measured: wrong numbers, no warning).
So routers are either
- model state (:func:`polar_compile.attach`, ``state.py``): buffers and ints on each decoder layer that a forward
  pre-hook feeds through ``polar::layer_router`` into the traced graph. The buffers are graph inputs of that model,
  the ints guarded constants, and a model without the hooks fails the guards and compiles dense; or
- ``options={"routers": bank}``: part of the backend, which Dynamo compares by equality before reusing a graph;
  :class:`RouterBank` compares by identity, so another bank object recompiles. The bank is checked against the
  graph (widths at every routed site, the decoder's layer count) before any rewrite.
Options win over attached state where both are given (``density``, ``min_saved_mib``, ``routers``).
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import ops  # noqa: F401  (registers the polar:: ops the rewritten graph calls)
from .config import PolarConfig, PolarOptionError
from .passes.constants import refreshing
from .passes.finish import split_down_finish
from .passes.manager import run_passes
from .passes.match import find_attention_sites
from .passes.mlp import TRANSPOSED_META
from .passes.records import PassRecord
from .passes.routing import is_mlp_router_marker, is_router_marker
from .routers import RouterBank

__all__ = ["compile_graph", "make_backend", "polar_backend"]

NO_ROUTERS_WARNING = (
    "polar: no routers given, so the model compiles dense. Calibrate them with "
    "`polar_compile.calibrate(model, texts)` (or `polar-compile calibrate`), then pass "
    "options={'routers': bank_or_dir} or call `polar_compile.attach(model, bank)`."
)


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: PolarConfig,
    mode: str | None = None,
    records: list[list[PassRecord]] | None = None,
) -> Callable[..., Any]:
    """Rewrite ``gm`` in place with polar's passes and compile it (Inductor, or eager if ``config.inductor`` is off).

    Appends this graph's pass records to ``records`` when given.
    """
    attached = any(is_router_marker(node) or is_mlp_router_marker(node) for node in gm.graph.nodes)
    if config.routers is None and not attached and any(site.is_decode for site in find_attention_sites(gm)):
        warnings.warn(NO_ROUTERS_WARNING, stacklevel=2)
    # Rewritten in place: a copy would lose what Dynamo attaches to the module and its placeholders
    # (`_param_name_to_source`, `_dynamo_source`), from which Inductor learns that the KV cache is a static
    # input; without it every mutated cache tensor makes Inductor skip CUDA graphs.
    graph_records = run_passes(gm, config, example_inputs)
    if config.routers is not None or attached:
        for record in graph_records:
            if record.note:
                warnings.warn(f"polar ({record.name} pass): {record.note}", stacklevel=2)
    if records is not None:
        records.append(graph_records)
    # the MLP pass's transposed weight copies, brought up to date before each call if a weight changed in place
    copies = gm.meta.get(TRANSPOSED_META, [])
    if not config.inductor:
        return refreshing(gm.forward, copies)
    from torch._inductor.compile_fx import compile_fx

    split_down_finish(gm)  # Inductor fuses gather_down's split sum into its consumer
    patches = torch._inductor.list_mode_options(mode) if mode else {}
    # Inductor calls the polar ops as opaque extern kernels instead of tracing into their Triton kernels: tracing
    # costs ~0.3 s of TTIR analysis per kernel launch site (three per routed layer; polar compiled 1.5x slower
    # than dense, H200), to then launch the same kernels. torch.export sets this flag too, to keep the ops whole.
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        return refreshing(compile_fx(gm, list(example_inputs), config_patches=patches), copies)


def polar_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The Dynamo backend behind ``torch.compile(..., backend="polar", mode=..., options=...)``."""
    routers = (options or {}).get("routers")
    if isinstance(routers, (str, Path)):
        # torch.compile reuses a graph whenever the options compare equal, and a path stays equal when its files
        # change: a bank calibrated again into the same directory would silently not be used.
        raise PolarOptionError(
            f"options['routers'] must be a RouterBank (polar_compile.RouterBank.load(directory)), got the path "
            f"{str(routers)!r}: torch.compile reuses a compiled graph while its options compare equal, and a path "
            "compares equal after its files change"
        )
    return compile_graph(gm, example_inputs, PolarConfig.from_options(options), mode)


def make_backend(
    routers: RouterBank | str | Path | None = None,
    density: float | Sequence[float] | None = None,
    *,
    passes: Sequence[str] | None = None,
    mode: str | None = None,
    inductor: bool = True,
    min_saved_mib: float | None = None,
) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    """A backend callable for ``torch.compile(backend=polar_compile.make_backend(routers=..., density=...))``."""
    options: dict[str, Any] = {"routers": routers, "density": density, "inductor": inductor,
                               "min_saved_mib": min_saved_mib}
    if passes is not None:
        options["passes"] = tuple(passes)
    config = PolarConfig.from_options(options)

    def polar(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_graph(gm, example_inputs, config, mode)

    return polar


class _CallableModule(types.ModuleType):
    """This module, callable as the old ``polar_compile.make_backend(...)`` (a function of this name used to hide the
    module). TODO(0.3): remove, with the deprecation period over."""

    def __call__(self, *args: Any, **kwargs: Any) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
        warnings.warn("polar_compile.backend(...) is deprecated, use polar_compile.make_backend(...)",
                      DeprecationWarning, stacklevel=2)
        return make_backend(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
