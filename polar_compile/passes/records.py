"""What each pass did to each site it found: the records ``explain`` prints and tests read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .match import AttentionSite

__all__ = ["PassRecord", "SiteRecord"]


@dataclass(frozen=True)
class SiteRecord:
    """One matched site: where it is, its width, and whether it was rewritten (else why it stayed dense)."""

    pass_name: str
    layer: int | None
    module: str
    kind: str  # "decode", "prefill" or "unknown" (query length not static)
    heads: int | None
    kv_heads: int | None
    units: int | None  # routed units: query heads (MHA) or KV groups (GQA)
    kept: int | None  # units kept per sequence when rewritten
    rewritten: bool
    reason: str  # why it stayed dense ("" when rewritten)

    @classmethod
    def of(cls, pass_name: str, site: AttentionSite, kept: int | None, reason: str | None) -> SiteRecord:
        """The record of ``site``: rewritten when ``reason`` is None (keeping ``kept`` units), else dense."""
        return cls(pass_name=pass_name, layer=site.layer, module=site.module,
                   kind=site.kind, heads=site.num_heads,
                   kv_heads=site.num_kv_heads, units=site.num_kv_heads, kept=kept, rewritten=reason is None,
                   reason=reason or "")


@dataclass
class PassRecord:
    """The records of one pass over one graph."""

    name: str
    sites: list[SiteRecord] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""  # about the graph as a whole (why a graph with attention has no site), "" when nothing to say

    @property
    def rewritten(self) -> int:
        """How many sites this pass rewrote."""
        return sum(site.rewritten for site in self.sites)
