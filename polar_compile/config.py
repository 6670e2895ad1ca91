"""PolarConfig: the validated, versioned form of ``torch.compile(..., backend="polar", options={...})``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .routers import RouterBank, check_density

__all__ = ["AVAILABLE_PASSES", "PolarConfig"]

AVAILABLE_PASSES = ("attention",)


@dataclass(frozen=True)
class PolarConfig:
    """What the polar backend does to a graph.

    - ``routers``: the :class:`RouterBank` (``None``: found through :func:`polar_compile.attach`, else dense).
    - ``density``: fraction of units kept, one float for every routed layer or a per-layer sequence; ``None``
      takes each layer's density from the bank (0.5 where the bank has none).
    - ``passes``: which rewrites run, in the order of :data:`AVAILABLE_PASSES`.
    - ``inductor``: hand the rewritten graph to Inductor (``False`` runs it eagerly, for debugging and tests).
    - ``min_saved_mib``: a decode site whose sparse attention would skip at most this many MiB of K/V reads per
      step stays dense (e.g. batch 1): there the router and kernel launches cost more than the reads saved.
      ``None``: :attr:`CUDA_MIN_SAVED_MIB` on CUDA (measured on an H200), 0 elsewhere; 0 always routes.
    """

    VERSION: ClassVar[int] = 1
    DEFAULT_DENSITY: ClassVar[float] = 0.5
    CUDA_MIN_SAVED_MIB: ClassVar[float] = 32.0

    routers: RouterBank | None = None
    density: float | tuple[float, ...] | None = None
    passes: tuple[str, ...] = AVAILABLE_PASSES
    inductor: bool = True
    min_saved_mib: float | None = None

    def __post_init__(self) -> None:
        if self.routers is not None and not isinstance(self.routers, RouterBank):
            raise TypeError(f"routers must be a RouterBank or a directory, got {type(self.routers).__name__}")
        if isinstance(self.density, Sequence) and not isinstance(self.density, str):
            densities = tuple(check_density(d, f"density[{i}]") for i, d in enumerate(self.density))
            object.__setattr__(self, "density", densities)
            if self.routers is not None and len(densities) != self.routers.shape.num_layers:
                raise ValueError(
                    f"per-layer density has {len(densities)} entries, the model has "
                    f"{self.routers.shape.num_layers} layers"
                )
        elif self.density is not None:
            object.__setattr__(self, "density", check_density(self.density))
        if self.min_saved_mib is not None and (
            isinstance(self.min_saved_mib, bool) or not isinstance(self.min_saved_mib, (int, float))
            or not self.min_saved_mib >= 0
        ):
            raise ValueError(f"min_saved_mib must be a number >= 0 (MiB), got {self.min_saved_mib!r}")
        unknown = [p for p in self.passes if p not in AVAILABLE_PASSES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; available: {list(AVAILABLE_PASSES)}")
        object.__setattr__(self, "passes", tuple(p for p in AVAILABLE_PASSES if p in self.passes))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PolarConfig:
        """Build from ``torch.compile``'s ``options``; unknown keys are rejected with the list of valid ones."""
        options = dict(options or {})
        valid = ("routers", "density", "passes", "inductor", "min_saved_mib")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown polar option(s) {unknown}; valid options: {list(valid)}")
        routers = options.get("routers")
        if isinstance(routers, (str, Path)):
            routers = RouterBank.load(routers)
        passes = options.get("passes", AVAILABLE_PASSES)
        if isinstance(passes, str):
            passes = (passes,)
        return cls(routers=routers, density=options.get("density"), passes=tuple(passes),
                   inductor=bool(options.get("inductor", True)), min_saved_mib=options.get("min_saved_mib"))

    def saved_bytes_threshold(self, device_type: str) -> float:
        """Bytes of K/V reads per step a sparse site must skip to be worth routing on ``device_type``."""
        mib = self.min_saved_mib
        if mib is None:
            mib = self.CUDA_MIN_SAVED_MIB if device_type == "cuda" else 0.0
        return mib * 2**20

    def layer_density(self, layer: int) -> float:
        """The density that layer ``layer`` runs at."""
        if isinstance(self.density, tuple):
            return self.density[layer]
        if self.density is not None:
            return self.density
        if self.routers is not None and layer in self.routers.densities:
            return self.routers.densities[layer]
        return self.DEFAULT_DENSITY
