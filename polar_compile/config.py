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
    """

    VERSION: ClassVar[int] = 1
    DEFAULT_DENSITY: ClassVar[float] = 0.5

    routers: RouterBank | None = None
    density: float | tuple[float, ...] | None = None
    passes: tuple[str, ...] = AVAILABLE_PASSES
    inductor: bool = True

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
        unknown = [p for p in self.passes if p not in AVAILABLE_PASSES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; available: {list(AVAILABLE_PASSES)}")
        object.__setattr__(self, "passes", tuple(p for p in AVAILABLE_PASSES if p in self.passes))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PolarConfig:
        """Build from ``torch.compile``'s ``options``; unknown keys are rejected with the list of valid ones."""
        options = dict(options or {})
        valid = ("routers", "density", "passes", "inductor")
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
                   inductor=bool(options.get("inductor", True)))

    def layer_density(self, layer: int) -> float:
        """The density that layer ``layer`` runs at."""
        if isinstance(self.density, tuple):
            return self.density[layer]
        if self.density is not None:
            return self.density
        if self.routers is not None and layer in self.routers.densities:
            return self.routers.densities[layer]
        return self.DEFAULT_DENSITY
