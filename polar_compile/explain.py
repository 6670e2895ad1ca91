"""``explain``: which attention sites the polar backend finds in a model's graphs (or an exported program), and what
it does to each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from .backend import compile_graph
from .config import PolarConfig
from .passes.records import PassRecord, SiteRecord

__all__ = ["ExplainReport", "explain"]


@dataclass
class ExplainReport:
    """Per Dynamo graph, the records of every pass. ``sites``, ``rewritten`` and ``dense`` are those of the
    attention pass (the sparse rewrite), in graph order; :meth:`sites_of` gives another pass's."""

    graphs: list[list[PassRecord]]

    def sites_of(self, pass_name: str) -> list[SiteRecord]:
        """Every site that pass ``pass_name`` matched, in every graph."""
        return [site for graph in self.graphs for record in graph if record.name == pass_name
                for site in record.sites]

    @property
    def sites(self) -> list[SiteRecord]:
        """Every site the attention pass matched."""
        return self.sites_of("attention")

    @property
    def rewritten(self) -> list[SiteRecord]:
        """The sites routed to sparse attention."""
        return [site for site in self.sites if site.rewritten]

    @property
    def dense(self) -> list[SiteRecord]:
        """The sites kept dense by the attention pass (each with its reason)."""
        return [site for site in self.sites if not site.rewritten]

    def __str__(self) -> str:
        lines = [f"polar explain: {len(self.graphs)} graph(s), {len(self.sites)} site(s), "
                 f"{len(self.rewritten)} rewritten"]
        header = f"{'graph':>5} {'pass':<9} {'layer':>5} {'kind':<7} {'heads':>5} {'kv':>3} {'kept':>9}  result"
        lines.append(header)
        for index, graph in enumerate(self.graphs):
            for record in graph:
                if record.note:
                    lines.append(f"{index:>5} {record.name:<9} {record.note}")
                for s in record.sites:
                    kept = f"{s.kept}/{s.units}" if s.kept is not None else "-"
                    result = ("rewritten" if s.rewritten else f"dense: {s.reason}") + f"  [{s.module}]"
                    lines.append(f"{index:>5} {s.pass_name:<9} {s.layer!s:>5} {s.kind:<7} {s.heads!s:>5} "
                                 f"{s.kv_heads!s:>3} {kept:>9}  {result}")
        return "\n".join(lines)


def explain(model: nn.Module | Callable[..., Any] | ExportedProgram, *example_args: Any,
            options: dict[str, Any] | None = None, **example_kwargs: Any) -> ExplainReport:
    """Run ``model(*example_args, **example_kwargs)`` once under ``torch.compile`` and report every site found.

    ``options`` are the backend's (routers, density, passes); without routers the ones attached to the model
    (:func:`polar_compile.attach`) are used. The rewritten graphs run eagerly (no Inductor), so the call is cheap,
    but it is a real forward: a ``StaticCache`` among the arguments advances by one step.

    Given an ``ExportedProgram`` (:func:`polar_compile.export`'s, or ``torch.export.load``-ed), runs nothing and
    reports the sites the program holds: one graph with the attention and MLP sites it routes and the attention
    sites it keeps dense.
    """
    if isinstance(model, ExportedProgram):
        from .export.sites import program_records

        return ExplainReport([program_records(model)])
    config = PolarConfig.from_options({**(options or {}), "inductor": False})
    if config.routers is not None and isinstance(model, nn.Module):
        config.routers.check_model(model)  # what attach() checks, before any graph
    graphs: list[list[PassRecord]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return compile_graph(gm, example_inputs, config, records=graphs)

    target = model
    if isinstance(model, nn.Module):
        original = torch._dynamo.eval_frame.innermost_fn(model.forward)
        if original is not model.forward:  # `model.forward = torch.compile(model.forward, ...)`: trace the original
            target = original
    # every explain compiles anew: without room, a model compiled in many variants would report 0 graphs
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
        torch.compile(target, backend=recording_backend, dynamic=False)(*example_args, **example_kwargs)
    return ExplainReport(graphs)
