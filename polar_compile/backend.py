"""The ``polar`` Dynamo backend: options -> :class:`PolarConfig` -> graph passes -> Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(m, backend="polar")`` works
after ``pip install`` without importing this package.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import ops  # noqa: F401  (registers the polar:: ops the rewritten graph calls)
from .config import PolarConfig
from .passes.manager import run_passes
from .passes.records import PassRecord
from .routers import RouterBank

__all__ = ["attach", "backend", "compile_graph", "polar_backend"]

NO_ROUTERS_WARNING = (
    "polar: no routers given, so the model compiles dense. Calibrate them with "
    "`polar_compile.calibrate(model, texts)` (or `polar-compile calibrate`), then pass "
    "options={'routers': bank_or_dir} or call `polar_compile.attach(model, bank)`."
)

# parameter tensor -> (bank, density, min_saved_mib) for models given to attach(); weak, so models can be freed.
_ATTACHED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def attach(model: nn.Module, routers: RouterBank | str | Path, *, density: float | Sequence[float] | None = None,
           min_saved_mib: float | None = None) -> nn.Module:
    """Tie ``routers`` (and optionally ``density``, ``min_saved_mib``: see :class:`PolarConfig`) to ``model`` so
    ``backend="polar"`` finds them without options.

    For callers that cannot pass ``options`` (HF ``CompileConfig`` with a ``mode``). Checks the bank against the
    model's config and raises naming the first mismatch. Returns ``model``.
    """
    bank = routers if isinstance(routers, RouterBank) else RouterBank.load(routers)
    bank.check_model(model)
    PolarConfig(routers=bank, density=density, min_saved_mib=min_saved_mib)  # validates now, not at compile time
    for parameter in model.parameters():
        _ATTACHED[parameter] = (bank, density, min_saved_mib)
    return model


def _find_attached(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[RouterBank, Any, Any] | None:
    """The bank attached to the model whose parameters this graph takes (as inputs or as attributes)."""
    candidates = [*example_inputs, *gm.parameters()]
    for tensor in candidates:
        if isinstance(tensor, torch.Tensor) and tensor in _ATTACHED:
            return _ATTACHED[tensor]
    return None


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
    if config.routers is None:
        attached = _find_attached(gm, example_inputs)
        if attached is not None:
            bank, density, min_saved_mib = attached
            config = dataclasses.replace(
                config, routers=bank, density=config.density if config.density is not None else density,
                min_saved_mib=config.min_saved_mib if config.min_saved_mib is not None else min_saved_mib,
            )
    if config.routers is None:
        warnings.warn(NO_ROUTERS_WARNING, stacklevel=2)
    # Rewritten in place: a copy would lose what Dynamo attaches to the module and its placeholders
    # (`_param_name_to_source`, `_dynamo_source`), from which Inductor learns that the KV cache is a static
    # input; without it every mutated cache tensor makes Inductor skip CUDA graphs.
    graph_records = run_passes(gm, config)
    if config.routers is not None:
        for record in graph_records:
            if record.note:
                warnings.warn(f"polar ({record.name} pass): {record.note}", stacklevel=2)
    if records is not None:
        records.append(graph_records)
    if not config.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode else {}
    # Inductor calls the polar ops as opaque extern kernels instead of tracing into their Triton kernels: tracing
    # costs ~0.3 s of TTIR analysis per kernel launch site (three per routed layer; polar compiled 1.5x slower
    # than dense, H200), to then launch the same kernels. torch.export sets this flag too, to keep the ops whole.
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        return compile_fx(gm, list(example_inputs), config_patches=patches)


def polar_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The Dynamo backend behind ``torch.compile(..., backend="polar", mode=..., options=...)``."""
    return compile_graph(gm, example_inputs, PolarConfig.from_options(options), mode)


def backend(
    routers: RouterBank | str | Path | None = None,
    density: float | Sequence[float] | None = None,
    *,
    passes: Sequence[str] | None = None,
    mode: str | None = None,
    inductor: bool = True,
    min_saved_mib: float | None = None,
) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    """A backend callable for ``torch.compile(backend=polar_compile.backend(routers=..., density=...))``."""
    options: dict[str, Any] = {"routers": routers, "density": density, "inductor": inductor,
                               "min_saved_mib": min_saved_mib}
    if passes is not None:
        options["passes"] = tuple(passes)
    config = PolarConfig.from_options(options)

    def polar(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_graph(gm, example_inputs, config, mode)

    return polar
