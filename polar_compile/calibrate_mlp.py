"""MLP router calibration: low-rank routers trained online from the model's own activations, and the k table.

1. Train, streamed (:class:`MlpCalibrator`, an MLP hook of :mod:`.instrument`): per forward batch, each routed
   layer's (MLP input ``x``, active neurons ``h != 0``) pairs of the training windows give a few Adam steps of its
   router ``Linear(hidden, r) -> Linear(r, ffn)`` (no biases) on BCE-with-logits, each step on a random subsample
   of the batch's tokens; nothing is stored but the routers and their optimizer state. Few tokens: a few passes.
2. Hold out: of the last windows (the held-out share), a bounded random sample of tokens per layer is kept
   (:class:`TokenSample`: ``x`` in the model's dtype, the active mask as bool; ``capacity`` tokens at most).
3. Tabulate (:func:`k_table`): per batch size B (those the sample can fill), many random batches of B held-out
   tokens from different windows (decode batches are different sequences); the batch's scores are the sum of its
   tokens' ``relu`` router scores (:func:`.instrument_mlp.neuron_scores`), its truth the union of their active sets;
   k is the smallest multiple of ``MLP_K_TILE`` (or ffn) whose mean union recall reaches the target. ``k == ffn``
   is ``None``: the layer stays dense at that B. k never falls as B grows (a larger k only raises recall).
Memory: per routed layer the router with Adam state (4 x r x (hidden + ffn) fp32) and the held-out sample
(``capacity`` x (hidden x dtype bytes + ffn) bytes): for an OPT-6.7B shape at r = 192 and 4096 tokens about 150 MB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .instrument_mlp import MlpInfo, TokenSample, neuron_scores
from .mlp_routers import MLP_BATCH_SIZES, MLP_K_TILE, MlpRouters

__all__ = ["MlpCalibrator", "MlpLayerReport", "auto_rank", "draw_batches", "k_table", "rank_share", "table_recall",
           "union_recall_curve"]

RANK_BUDGET = 0.03  # router bytes r * (hidden + ffn) as a share of the MLP's weight bytes
# below ~128 a router misses too much: on tiny-opt-wt2 rank 32 kept 960 of 1024 neurons at B=1, rank 128 kept 704
MIN_RANK, RANK_STEP = 128, 16


def auto_rank(info: MlpInfo, budget: float = RANK_BUDGET) -> int:
    """The largest multiple of 16 whose router weights ``r * (hidden + ffn)`` stay within ``budget`` of the MLP's
    (2 or 3 matrices of ``hidden x ffn``), at least 128 or ``hidden`` if smaller (a small model's router then
    costs more than the budget: see :func:`rank_share`)."""
    rank = int(budget * info.weight_count / (info.hidden + info.ffn)) // RANK_STEP * RANK_STEP
    return max(min(MIN_RANK, info.hidden), rank)


def rank_share(info: MlpInfo, rank: int) -> float:
    """The router's weights as a share of the MLP's."""
    return rank * (info.hidden + info.ffn) / info.weight_count


@dataclass
class MlpLayerReport:
    """MLP calibration result of one layer (stored in the bank's provenance)."""

    layer: int
    rank: int
    router_share: float  # router weights / MLP weights
    train_tokens: int
    steps: int
    loss: float  # mean training loss over the last steps
    active: float  # mean share of active neurons per training token
    heldout_tokens: int
    topk: dict[str, int | None] = field(default_factory=dict)  # batch size -> k (None: dense)
    recall: dict[str, float] = field(default_factory=dict)  # batch size -> held-out mean union recall at k
    seconds: float = 0.0


class _Router(nn.Module):
    """``Linear(hidden, r) -> Linear(r, ffn)`` on inputs scaled per feature (folded into ``in`` at the end)."""

    def __init__(self, hidden: int, rank: int, ffn: int, scale: Tensor) -> None:
        super().__init__()
        self.inp = nn.Linear(hidden, rank, bias=False, device=scale.device)
        self.out = nn.Linear(rank, ffn, bias=False, device=scale.device)
        self.register_buffer("scale", scale)  # 1 / std of each input feature

    def forward(self, x: Tensor) -> Tensor:
        """Neuron logits ``[..., ffn]`` of the standardised MLP input ``x`` ``[..., hidden]``."""
        return self.out(self.inp(x * self.scale))

    def weights(self) -> tuple[Tensor, Tensor]:
        """(in [r, hidden], out [ffn, r]) fp32 on the CPU, the input scaling folded in."""
        return (self.inp.weight * self.scale).detach().float().cpu(), self.out.weight.detach().float().cpu()


@dataclass
class _Layer:
    info: MlpInfo
    router: _Router
    optimizer: torch.optim.Optimizer
    pos_weight: Tensor
    heldout: TokenSample
    active: float
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class MlpCalibrator:
    """The MLP hook that trains each routed layer's router online and samples held-out tokens (module docstring).

    Call :meth:`begin_batch` with the window index of each row before every forward batch; windows from
    ``train_windows`` on are held out. ``passes`` forward passes over the training windows are planned so that each
    router gets at least ``min_steps`` steps of ``step_tokens`` tokens (``steps_per_batch`` per batch and pass).
    """

    def __init__(self, *, rank: int | str, dense_layers: Sequence[int], train_windows: int, heldout_windows: int,
                 batch_size: int, seq_len: int, capacity: int = 4096, step_tokens: int = 2048,
                 steps_per_batch: int = 4, min_steps: int = 300, max_passes: int = 4, lr: float = 1e-2,
                 seed: int = 0) -> None:
        if rank != "auto" and not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"mlp_rank must be a positive int, 'auto' or 0/None (off), got {rank!r}")
        self.rank, self.dense_layers = rank, frozenset(dense_layers)
        self.train_windows, self.capacity, self.step_tokens, self.lr = train_windows, capacity, step_tokens, lr
        batches = math.ceil(train_windows / batch_size)
        self.passes = max(1, min(max_passes, math.ceil(min_steps / (batches * steps_per_batch))))
        self.steps_per_batch = max(steps_per_batch, math.ceil(min_steps / (batches * self.passes)))
        self.total_steps = self.steps_per_batch * batches * self.passes
        self.per_window = max(1, min(seq_len, math.ceil(capacity / max(1, heldout_windows))))
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.layers: dict[int, _Layer] = {}
        self.required = rank != "auto"  # an explicit rank: a model without ReLU MLPs is an error
        self.rows = torch.zeros(0, dtype=torch.long)  # window index of each row of the current batch
        self.sample_heldout = True

    def begin_batch(self, windows: Sequence[int] | Tensor, *, heldout: bool = True) -> None:
        """The window index of each row of the next batch; ``heldout=False`` skips held-out sampling (later passes)."""
        self.rows = torch.as_tensor(windows, dtype=torch.long)
        self.sample_heldout = heldout

    def __call__(self, info: MlpInfo, x: Tensor, h: Tensor) -> Tensor:
        # x: [B, T, hidden]   h: [B, T, ffn]
        if info.layer in self.dense_layers:
            return h
        start = time.perf_counter()
        active = h != 0  # [B, T, ffn]
        layer = self.layers.get(info.layer) or self._new_layer(info, x, active)
        train = self.rows < self.train_windows  # [B]
        if train.any():
            self._train(layer, x[train].flatten(0, 1), active[train].flatten(0, 1))
        if self.sample_heldout and not train.all():
            self._hold_out(layer, x[~train], active[~train], self.rows[~train])
        layer.seconds += time.perf_counter() - start
        return h

    def _new_layer(self, info: MlpInfo, x: Tensor, active: Tensor) -> _Layer:
        rank = auto_rank(info) if self.rank == "auto" else int(self.rank)
        scale = 1.0 / x.flatten(0, 1).float().std(0).clamp_min(1e-3)
        with torch.random.fork_rng(devices=[]):  # the routers' initialisation, leaving the caller's RNG alone
            torch.manual_seed(self.seed + info.layer)
            router = _Router(info.hidden, rank, info.ffn, scale.cpu()).to(x.device)
        share = active.float().mean().clamp(1e-3, 1 - 1e-3)
        pos_weight = ((1 - share) / share).clamp(1.0, 10.0).to(x.device)
        optimizer = torch.optim.Adam(router.parameters(), lr=self.lr)
        layer = _Layer(info, router, optimizer, pos_weight, TokenSample(self.capacity), float(share))
        self.layers[info.layer] = layer
        return layer

    def _train(self, layer: _Layer, x: Tensor, active: Tensor) -> None:
        # x: [N, hidden]   active: [N, ffn]
        layer.tokens += len(x)
        layer.active = 0.99 * layer.active + 0.01 * active.float().mean().item()
        for _ in range(self.steps_per_batch):
            rows = torch.randperm(len(x), generator=self.generator)[: self.step_tokens].to(x.device)
            progress = min(1.0, layer.steps / max(1, self.total_steps))
            for group in layer.optimizer.param_groups:  # cosine decay to a tenth
                group["lr"] = self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
            with torch.enable_grad():
                logits = layer.router(x[rows].float())
                loss = F.binary_cross_entropy_with_logits(logits, active[rows].float(), pos_weight=layer.pos_weight)
                layer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                layer.optimizer.step()
            layer.steps += 1
            layer.losses = [*layer.losses[-19:], loss.item()]

    def _hold_out(self, layer: _Layer, x: Tensor, active: Tensor, windows: Tensor) -> None:
        # x: [b, T, hidden]   active: [b, T, ffn]   windows: [b]
        length = x.shape[1]
        keep = min(length, self.per_window)
        positions = torch.rand(len(x), length, generator=self.generator).argsort(1)[:, :keep].sort(1).values
        index = positions.to(x.device)
        picked_x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])).flatten(0, 1)
        picked_active = active.gather(1, index[..., None].expand(-1, -1, active.shape[-1])).flatten(0, 1)
        layer.heldout.append(picked_x, picked_active, windows.repeat_interleave(keep))

    def finish(self, num_layers: int, *, recall: float = 0.99, draws: int = 256,
               batch_sizes: Sequence[int] = MLP_BATCH_SIZES) -> tuple[MlpRouters | None, list[MlpLayerReport]]:
        """The trained routers with their k table (rows: the batch sizes the held-out sample fills) and the
        per-layer reports; ``(None, [])`` when no layer was routed."""
        if not self.layers:
            return None, []
        w_in, w_out, table, reports = {}, {}, {}, []
        for index, layer in sorted(self.layers.items()):
            start = time.perf_counter()
            w_in[index], w_out[index] = layer.router.weights()
            report = MlpLayerReport(
                layer=index, rank=w_in[index].shape[0], router_share=round(rank_share(layer.info, w_in[index].shape[0]), 4),
                train_tokens=layer.tokens, steps=layer.steps,
                loss=sum(layer.losses) / max(1, len(layer.losses)), active=round(layer.active, 4),
                heldout_tokens=layer.heldout.count)
            if layer.heldout.count:
                x, active, windows = layer.heldout.tensors()
                scores = neuron_scores(x, w_in[index], w_out[index])  # [N, ffn]
                generator = torch.Generator().manual_seed(self.seed)
                for size, (k, measured) in k_table(scores, active, windows, recall=recall, draws=draws,
                                                   batch_sizes=batch_sizes, generator=generator).items():
                    table.setdefault(size, [None] * num_layers)[index] = k
                    report.topk[str(size)], report.recall[str(size)] = k, round(measured, 5)
            report.seconds = round(layer.seconds + time.perf_counter() - start, 3)
            reports.append(report)
        rank = reports[0].rank
        topk = {size: tuple(row) for size, row in sorted(table.items())}
        return MlpRouters(rank, w_in, w_out, topk), reports

    def provenance(self, reports: list[MlpLayerReport], recall: float) -> dict:
        """What the bank's provenance keeps about this calibration."""
        return {"recall_target": recall, "passes": self.passes, "steps_per_batch": self.steps_per_batch,
                "step_tokens": self.step_tokens, "heldout_capacity": self.capacity, "lr": self.lr,
                "loss": "BCE-with-logits on h != 0, pos_weight (1 - p) / p clamped to [1, 10]",
                "layers": [asdict(r) for r in reports]}


def draw_batches(windows: Tensor, batch: int, draws: int, generator: torch.Generator) -> Tensor:
    """``[draws, batch]`` token indices of random batches, each from as many different windows as there are (a
    window repeats only after every window has given a token)."""
    count = len(windows)
    order = torch.rand(draws, count, generator=generator).argsort(1)  # a random order of the tokens per draw
    by_window = torch.sort(windows[order], dim=1, stable=True)
    position = torch.arange(count).expand(draws, -1)
    starts = torch.ones(draws, count, dtype=torch.bool)
    starts[:, 1:] = by_window.values[:, 1:] != by_window.values[:, :-1]
    first = torch.where(starts, position, 0).cummax(1).values
    rank = torch.empty_like(position).scatter_(1, by_window.indices, position - first)  # within its window
    chosen = (rank * count + position).argsort(1)[:, :batch]  # lowest rank first, then the random order
    return order.gather(1, chosen)


def union_recall_curve(scores: Tensor, active: Tensor, batches: Tensor, chunk: int = 8192) -> Tensor:
    """Mean over ``batches [D, B]`` of the union recall at every k: ``[ffn]``, entry k-1 = mean of
    |top-k of the summed scores ∩ union of active| / |union| (1 for an empty union). ``scores``, ``active``: ``[N, ffn]``."""
    total = torch.zeros(scores.shape[1], dtype=torch.float64, device=scores.device)
    per_chunk = max(1, chunk // batches.shape[1])
    for start in range(0, len(batches), per_chunk):
        index = batches[start : start + per_chunk].to(scores.device)  # [d, B]
        summed = scores[index].sum(1) + 0.0  # [d, ffn]; + 0.0: -0.0 and +0.0 tie
        union = active[index].any(1)  # [d, ffn]
        order = torch.sort(summed, dim=1, descending=True, stable=True).indices  # ties to the lower index
        hits = union.gather(1, order).cumsum(1).double()  # [d, ffn]
        size = union.sum(1, keepdim=True).double()
        total += torch.where(size > 0, hits / size.clamp_min(1), 1.0).sum(0)
    return total / len(batches)


def k_table(scores: Tensor, active: Tensor, windows: Tensor, *, recall: float = 0.99, draws: int = 256,
            batch_sizes: Sequence[int] = MLP_BATCH_SIZES, tile: int = MLP_K_TILE,
            generator: torch.Generator | None = None) -> dict[int, tuple[int | None, float]]:
    """Per batch size (those ``<=`` the tokens): (k, the mean union recall at k); k = the smallest multiple of
    ``tile`` (or ffn) reaching ``recall``, at least the k of every smaller batch size, None when it is ffn."""
    generator = generator or torch.Generator().manual_seed(0)
    ffn = scores.shape[1]
    candidates = torch.tensor(sorted({min(ffn, k) for k in range(tile, ffn + tile, tile)}))
    table, floor = {}, 0
    for size in sorted(batch_sizes):
        if size > len(scores):
            break
        curve = union_recall_curve(scores, active, draw_batches(windows, size, draws, generator)).cpu()
        reaching = candidates[(curve[candidates - 1] >= recall) & (candidates >= floor)]
        k = int(reaching[0]) if len(reaching) else ffn
        floor = k
        table[size] = (None if k >= ffn else k, float(curve[k - 1]))
    return table


def table_recall(samples: dict[int, TokenSample], mlp: MlpRouters, *, draws: int = 256, seed: int = 0
                 ) -> tuple[dict[int, float], dict[int, float]]:
    """Per tabulated batch size (up to the fewest sampled tokens): the mean over the sampled layers of the union
    recall at the table's k (1.0 where the layer is dense at that size), and of the share of neurons kept."""
    generator = torch.Generator().manual_seed(seed)
    recall: dict[int, list[float]] = {}
    kept: dict[int, list[float]] = {}
    fewest = min(sample.count for sample in samples.values())
    for layer, sample in sorted(samples.items()):
        x, active, windows = sample.tensors()
        scores = neuron_scores(x, mlp.w_in[layer], mlp.w_out[layer])  # [N, ffn]
        for size in sorted(b for b in mlp.topk if b <= fewest):
            k = mlp.k_for(layer, size)
            measured = 1.0
            if k is not None:
                measured = float(union_recall_curve(scores, active, draw_batches(windows, size, draws, generator))[k - 1])
            recall.setdefault(size, []).append(measured)
            kept.setdefault(size, []).append((k or mlp.ffn_size) / mlp.ffn_size)
    return ({size: sum(v) / len(v) for size, v in recall.items()}, {size: sum(v) / len(v) for size, v in kept.items()})
