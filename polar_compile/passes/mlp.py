"""MlpPass: finds the decode step's MLPs (``passes/match_mlp.py``) and records each for ``explain``.

Polar's neuron sparsity applies to ReLU MLPs (plain or gated) at decode steps; every other MLP stays dense with its
reason (an activation without exact zeros, prefill, no decoder layer). This version rewrites none: router banks do
not hold MLP routers yet (issue 13), so ReLU decode MLPs are recorded dense with that reason too.
"""

from __future__ import annotations

from torch import fx

from .graph import module_path, shape_of, static_int
from .match import find_attention_sites
from .match_mlp import MlpSite, find_mlp_sites
from .records import PassRecord, SiteRecord

__all__ = ["MlpPass"]

NO_MLP_ROUTERS = "no MLP router for layer {layer} (router banks hold attention routers only so far)"


class MlpPass:
    """Records the graph's MLP sites and why each stays dense (see the module docstring)."""

    name = "mlp"

    def __call__(self, gm: fx.GraphModule) -> PassRecord:
        record = PassRecord(self.name)
        attention = find_attention_sites(gm)
        decode_graph = bool(attention) and all(site.is_decode for site in attention)
        for site in find_mlp_sites(gm):
            kind = _kind(site, decode_graph)
            reason = site.dense_reason
            if reason is None:
                reason = (NO_MLP_ROUTERS.format(layer=site.layer) if kind == "decode"
                          else f"{kind}: only decode steps are sparsified")
            record.sites.append(SiteRecord(
                pass_name=self.name, layer=site.layer, module=module_path(site.down), kind=kind, heads=None,
                kv_heads=None, units=site.ffn_size, kept=None, rewritten=False, reason=reason))
        return record


def _kind(site: MlpSite, decode_graph: bool) -> str:
    """'decode' when each sequence feeds one token: ``[B, 1, d]`` inputs, or a 2-D flatten (OPT) in a graph whose
    attention sites all decode."""
    shape = shape_of(site.up)
    if shape is None:
        return "unknown"
    if len(shape) == 3:
        tokens = static_int(shape[1])
        return "unknown" if tokens is None else "decode" if tokens == 1 else "prefill"
    return "decode" if decode_graph else "prefill"
