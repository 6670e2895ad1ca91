"""The timed object: one decode step on a filled StaticCache (:class:`DecodeStep`), how it is timed, and the MLP
routers' time on their own (:func:`mlp_router_seconds`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class CudaUnavailableError(RuntimeError):
    """Raised by :func:`require_cuda` when no CUDA GPU is usable."""


def require_cuda() -> None:
    """Raise :class:`CudaUnavailableError` with a readable reason unless ``torch.cuda.is_available()``."""
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda
                                                  else "built without CUDA")
        raise CudaUnavailableError(
            "the decode benchmark needs a CUDA GPU (it times with CUDA events and runs CUDA graphs), but "
            f"torch.cuda.is_available() is False ({build})")


class DecodeStep:
    """A model, a StaticCache of length L filled with random K/V, and the inputs of the step at position L-1.

    ``reset()`` rewinds the cache write counter so every step attends to all L positions; ``time(step, repeats)``
    times ``step(**inputs)`` with CUDA events. ``device`` is for tests; the benchmark uses CUDA.
    """

    def __init__(self, model: nn.Module, batch: int, context: int, device: str | torch.device = "cuda") -> None:
        from transformers import StaticCache

        self.model, self.batch, self.context = model, batch, context
        self._rewind: list[Tensor] = []  # L-1 per counter, the source of reset()'s one copy
        self.cache = StaticCache(config=model.config, max_cache_len=context)
        self.inputs = dict(
            input_ids=torch.randint(0, model.config.vocab_size, (batch, 1), device=device),
            past_key_values=self.cache, use_cache=True,
            cache_position=torch.tensor([context - 1], device=device),
            position_ids=torch.full((batch, 1), context - 1, device=device),
            # explicit: without it OPT sizes its own mask from the cache length, a data-dependent size
            attention_mask=torch.ones(batch, context, dtype=torch.long, device=device),
        )
        with torch.no_grad():
            self.reset()
            model(**self.inputs)  # allocates the cache tensors
        for layer in self.cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            # mark it whether or not this transformers version does: an unmarked counter makes Inductor skip CUDA graphs
            torch._dynamo.mark_static_address(layer.cumulative_length)

    def reset(self) -> None:
        """Set every initialised cache layer's write counter back to L-1 (the step writes position L-1 again)."""
        counters = [layer.cumulative_length for layer in self.cache.layers if getattr(layer, "is_initialized", False)]
        if len(counters) != len(self._rewind):  # the counters exist once the first step has run
            self._rewind = [torch.full_like(c, self.context - 1) for c in counters]
        if counters:  # one launch for all layers, so back-to-back timing adds almost nothing between steps
            torch._foreach_copy_(counters, self._rewind)

    def time(self, step: Callable[..., Any], repeats: int, runs: int = 3) -> tuple[float, float, float]:
        """Seconds per step: (back to back, host-synced, first call = compile + capture for compiled steps).

        Back to back: ``runs`` runs of ``repeats`` steps between two CUDA events with no host sync in between,
        so the host's work for the next step overlaps the GPU's (a decode loop that does not wait on every token);
        the median run's time per step. Host-synced: ``repeats`` single steps, each timed with CUDA events and
        followed by a sync (a loop that reads every token before the next step); the median. Three warm-up steps
        come first.
        """
        synced = []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(repeats + 3):
                self.reset()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step(**self.inputs)
                end.record()
                torch.cuda.synchronize()
                if i == 0:
                    first = time.perf_counter() - start
                if i >= 3:
                    synced.append(begin.elapsed_time(end) / 1e3)
            back_to_back = []
            for _ in range(runs):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(repeats):
                    self.reset()
                    step(**self.inputs)
                end.record()
                torch.cuda.synchronize()
                back_to_back.append(begin.elapsed_time(end) / 1e3 / repeats)
        return statistics.median(back_to_back), statistics.median(synced), first


@contextlib.contextmanager
def full_compiles() -> Iterator[None]:
    """Inside, every compile is a full one: FX-graph and AOTAutograd caches are off, so variants whose graphs match
    ((2) and (3) for MHA models) do not share one; Triton's kernel cache stays on and serves all alike."""
    with (torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        yield


def mlp_router_seconds(routers: Sequence[tuple[Tensor, Tensor, int]], batch: int, repeats: int = 20,
                       dtype: torch.dtype = torch.bfloat16) -> float:
    """GPU seconds of the MLP routers of one decode step on their own: ``polar::mlp_route`` for each
    ``(w_in [r, hidden], w_out [ffn, r], k)`` in ``routers`` (the layers that route at this batch size) on a random
    ``[batch, hidden]`` input, each layer with its own weights (no layer finds its router in L2 from the one before),
    captured in one CUDA graph and replayed ``repeats`` times; the median replay. 0.0 when no layer routes.

    The in-step profile cannot tell the router's cuBLAS GEMM (above 16 rows) from the model's own (CUDA graphs hide
    which op launched a kernel), so this is the MLP router time the report gives.
    """
    from .. import ops  # noqa: F401  (registers polar::mlp_route)

    if not routers:
        return 0.0
    weights = [(w_in.to("cuda", dtype), w_out.to("cuda", dtype), k) for w_in, w_out, k in routers]
    x = torch.randn(batch, weights[0][0].shape[1], device="cuda", dtype=dtype)

    def all_layers() -> None:
        for w_in, w_out, k in weights:
            torch.ops.polar.mlp_route(x, w_in, w_out, k)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS handles, workspaces)
        all_layers()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_layers()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times)
