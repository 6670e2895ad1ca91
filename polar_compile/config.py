"""PolarConfig: the validated, versioned form of ``torch.compile(..., backend="polar", options={...})``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .bank_format import describe, is_number
from .routers import RouterBank, check_density

__all__ = ["AVAILABLE_PASSES", "PolarConfig", "PolarOptionError"]

AVAILABLE_PASSES = ("attention", "gqa", "mlp")  # in the order they run
OPTIONS = ("routers", "density", "passes", "inductor", "min_saved_mib")


class PolarOptionError(TypeError, ValueError):
    """An option of the polar backend with the wrong type or value (both a ``TypeError`` and a ``ValueError``)."""


@dataclass(frozen=True)
class PolarConfig:
    """What the polar backend does to a graph.

    - ``routers``: the :class:`RouterBank` or its directory (``None``: found through :func:`polar_compile.attach`,
      else dense).
    - ``density``: fraction of units kept, one float for every routed layer or a per-layer sequence; ``None``
      takes each layer's density from the bank (0.5 where the bank has none).
    - ``passes``: which rewrites run, in the order of :data:`AVAILABLE_PASSES`.
    - ``inductor``: hand the rewritten graph to Inductor (``False`` runs it eagerly, for debugging and tests).
    - ``min_saved_mib``: a decode site whose sparse attention would skip at most this many MiB of K/V reads per
      step stays dense (e.g. batch 1): there the router and kernel launches cost more than the reads saved.
      ``None``: :attr:`CUDA_MIN_SAVED_MIB` on CUDA (measured on an H200), 0 elsewhere; 0 always routes.

    Construction raises :class:`PolarOptionError` naming the option, the expected and the actual.
    """

    VERSION: ClassVar[int] = 1
    DEFAULT_DENSITY: ClassVar[float] = 0.5
    # Between the H200 decode runs' crossings: sites skipping 49.5 MiB a step (OPT-66B B=1 L=1920, attention
    # density 0.3) were 0.98x with routing; 64 MiB (Llama-2-7B, OPT-6.7B B=1 L=8192, 0.5) 1.01-1.02x
    CUDA_MIN_SAVED_MIB: ClassVar[float] = 56.0
    # Neuron density past which a routed sparse MLP (router + gather-GEMMs) is slower than the dense one on CUDA:
    # (largest MLP weight bytes, ((largest batch size, density), ...)). Measured on an H200 in bf16 with the
    # router of 32fd67d (benchmarks/mlp-runs/run04-routed.md: OPT-6.7B's 256 MiB MLP and OPT-66B's 1.27 GiB at
    # B = 1, 16, 32, 64, 128), a little below each crossing. The router's fixed ~27-42 µs weighs most on small
    # MLPs. A sparse MLP layer whose k is past it stays dense.
    CUDA_MLP_BREAK_EVEN: ClassVar[tuple[tuple[int, tuple[tuple[int, float], ...]], ...]] = (
        (2**30, ((16, 0.5), (32, 0.4), (64, 0.3), (2**62, 0.3))),
        (2**62, ((16, 0.7), (32, 0.6), (64, 0.5), (2**62, 0.4))),
    )

    routers: RouterBank | None = None
    density: float | tuple[float, ...] | None = None
    passes: tuple[str, ...] = AVAILABLE_PASSES
    inductor: bool = True
    min_saved_mib: float | None = None

    def __post_init__(self) -> None:
        routers = self.routers
        if isinstance(routers, (str, Path)):
            routers = RouterBank.load(routers)
            object.__setattr__(self, "routers", routers)
        if routers is not None and not isinstance(routers, RouterBank):
            raise PolarOptionError(
                f"routers must be a RouterBank or a router bank directory (str or Path), got {describe(routers)}"
            )
        self._check_density()
        if not isinstance(self.inductor, bool):
            raise PolarOptionError(f"inductor must be a bool (True or False), got {describe(self.inductor)}")
        mib = self.min_saved_mib
        if mib is not None and (not is_number(mib) or not mib >= 0):
            raise PolarOptionError(
                f"min_saved_mib must be a number >= 0 (MiB), got {repr(mib) if is_number(mib) else describe(mib)}"
            )
        passes = self.passes
        if isinstance(passes, str):
            passes = (passes,)
        if not isinstance(passes, (list, tuple)):
            raise PolarOptionError(
                f"passes must be a pass name (str) or a list/tuple of pass names, got {describe(passes)}"
            )
        for i, name in enumerate(passes):
            if not isinstance(name, str):
                raise PolarOptionError(f"passes[{i}] must be a pass name (str), got {describe(name)}")
        unknown = [p for p in passes if p not in AVAILABLE_PASSES]
        if unknown:
            raise PolarOptionError(f"unknown pass(es) {unknown}; available: {list(AVAILABLE_PASSES)}")
        object.__setattr__(self, "passes", tuple(p for p in AVAILABLE_PASSES if p in passes))

    def _check_density(self) -> None:
        density = self.density
        if density is None:
            return
        if is_number(density):
            object.__setattr__(self, "density", _density(density, "density"))
            return
        if not isinstance(density, Sequence) or isinstance(density, (str, bytes)) or not density:
            raise PolarOptionError(
                "density must be a number in (0, 1] or a non-empty sequence of such numbers (one per layer), "
                f"got {describe(density)}"
            )
        densities = tuple(_density(d, f"density[{i}]") for i, d in enumerate(density))
        object.__setattr__(self, "density", densities)
        if self.routers is not None and len(densities) != self.routers.shape.num_layers:
            raise PolarOptionError(
                f"per-layer density has {len(densities)} entries, the model has {self.routers.shape.num_layers} layers"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PolarConfig:
        """Build from ``torch.compile``'s ``options``; unknown keys are rejected with the list of valid ones.

        Raises :class:`PolarOptionError` naming the option, the expected and the actual on a malformed option.
        """
        if options is not None and not isinstance(options, Mapping):
            raise PolarOptionError(f"polar options must be a dict, got {describe(options)}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS), key=str)
        if unknown:
            raise PolarOptionError(f"unknown polar option(s) {unknown}; valid options: {list(OPTIONS)}")
        return cls(routers=options.get("routers"), density=options.get("density"),
                   passes=options.get("passes", AVAILABLE_PASSES), inductor=options.get("inductor", True),
                   min_saved_mib=options.get("min_saved_mib"))

    def saved_bytes_threshold(self, device_type: str) -> float:
        """Bytes of K/V reads per step a sparse site must skip to be worth routing on ``device_type``."""
        mib = self.min_saved_mib
        if mib is None:
            mib = self.CUDA_MIN_SAVED_MIB if device_type == "cuda" else 0.0
        return mib * 2**20

    def mlp_break_even(self, device_type: str, batch: int, weight_bytes: int) -> float:
        """The neuron density up to which a sparse MLP of ``batch`` tokens and ``weight_bytes`` of weights beats the
        dense one on ``device_type`` (1.0 off CUDA, where the reference ops exist for correctness, not speed)."""
        if device_type != "cuda":
            return 1.0
        table = next(rows for largest, rows in self.CUDA_MLP_BREAK_EVEN if weight_bytes <= largest)
        return next(density for largest, density in table if batch <= largest)

    def layer_density(self, layer: int) -> float:
        """The density that layer ``layer`` runs at."""
        if isinstance(self.density, tuple):
            if not 0 <= layer < len(self.density):
                raise PolarOptionError(
                    f"density has {len(self.density)} per-layer entries, but the graph routes layer {layer}: give "
                    "one density per layer of the model"
                )
            return self.density[layer]
        if self.density is not None:
            return self.density
        if self.routers is not None and layer in self.routers.densities:
            return self.routers.densities[layer]
        return self.DEFAULT_DENSITY


def _density(value: Any, what: str) -> float:
    """``check_density`` raising :class:`PolarOptionError`."""
    try:
        return check_density(value, what)
    except ValueError as err:
        raise PolarOptionError(str(err)) from None
