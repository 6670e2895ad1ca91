"""Router calibration: collect (router input, per-unit output norm) at every attention site, train one Linear per layer.

1. Collect: the model runs full windows under :func:`.instrument.instrument` (the backend's matcher); per window a
   random subset of positions is kept and each layer's router inputs ``[hidden]`` and per-unit output norms
   ``[units]`` (GQA: summed over the group's query heads) are written to fp16/fp32 memory maps on disk, so only
   one layer is ever in memory (a 7B model at 400k tokens: ~3.3 GB per layer on disk).
2. Train (per routed layer): ``Linear(hidden, units)`` on standardized inputs, full-batch L-BFGS on a
   norm-gap-weighted pairwise ranking loss (RankNet): for every pair of units, the logistic loss of ordering them
   as their norms do, weighted by the norm gap, so mistakes on near-ties cost little and the whole ranking (every
   density) is learned. Recall of the true top-k is measured on held-out windows.
3. Optionally pick each layer's density greedily to meet a target mean loss increase on held-out windows.
4. MLP routers (ReLU and gated-ReLU MLPs, :mod:`.calibrate_mlp`): trained online during the same forward passes
   (plus a few passes over the training windows when tokens are few), and the per-batch-size k table built on a
   bounded sample of held-out tokens.

Routed layers are the attention layers (see :mod:`.instrument`) outside ``dense_layers``: in a hybrid model the
Mamba, linear-attention or conv layers get no router and stay dense.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibrate_mlp import MlpCalibrator
from .data import DataError, as_windows
from .evaluate import Evaluator, Sparsity
from .instrument import InstrumentedModel, SiteInfo, check_routable, instrument, unit_norms
from .routers import ModelShape, RouterBank, RouterBankError, check_density, kept_units, router_from_linear

__all__ = ["FeatureStore", "LayerReport", "calibrate", "collect", "router_recall", "select_densities", "train_router"]


@dataclass
class LayerReport:
    """Calibration result of one layer (stored in the bank's provenance)."""

    layer: int
    train_samples: int
    heldout_samples: int
    loss: float  # final training loss
    recall: float  # held-out recall of the true top-k at the calibration density
    seconds: float


def calibrate(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    density: float = 0.5,
    tokens: int | None = 400_000,
    samples: int | None = 400_000,
    batch_size: int = 8,
    seq_len: int = 512,
    heldout: float = 0.1,
    dense_layers: Sequence[int] = (0,),
    target_loss_increase: float | None = None,
    steps: int = 50,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    mlp_rank: int | str | None = "auto",
    mlp_recall: float = 0.99,
    mlp_heldout_tokens: int = 4096,
    mlp_steps: int = 300,
) -> RouterBank:
    """Train per-layer attention routers for ``model`` on ``data`` and return them as a :class:`RouterBank`.

    ``data``: a text file or HF dataset name (``name[:config]``), a list of texts (these need ``tokenizer``), or
    token ids (a stream ``[N]`` or windows ``[n, seq_len + 1]``). ``tokens`` caps the tokens run through the
    model, ``samples`` the positions stored per layer (a uniform subsample). The last ``heldout`` share of the
    windows is held out for recall and density selection. ``density`` is each layer's kept fraction, unless
    ``target_loss_increase`` (mean NLL increase in nats per token over dense) picks per-layer densities.
    Features are memory-mapped under ``cache_dir`` (a temporary directory by default).

    MLP routers: ``mlp_rank`` is the router rank, ``"auto"`` (the default: MLP routers when the model has ReLU
    MLPs, none otherwise, rank from :func:`.calibrate_mlp.auto_rank`), or 0 / None (none). The k table reaches mean
    union recall ``mlp_recall`` on up to ``mlp_heldout_tokens`` held-out tokens per layer; each router gets at least
    ``mlp_steps`` Adam steps (more passes over the training windows when they are few). An explicit rank on a
    model without ReLU MLPs raises :class:`~.instrument.InstrumentError` naming the activation found.

    Routers are trained for the attention layers not in ``dense_layers``. Raises
    :class:`~.instrument.InstrumentError` for a model with no attention the matcher can route (a state-space
    model; attention that does not call SDPA), for an attention layer without a routable site, and for an
    encoder-decoder model; :class:`RouterBankError` for a config without attention heads, for multi-query
    attention and when every attention layer is in ``dense_layers``.
    """
    check_density(density)
    expected = check_routable(model, "calibrate")
    shape = ModelShape.of(model)
    if shape.num_kv_heads < 2:
        raise RouterBankError(
            f"{shape.model_type} attention reads 1 KV head per layer (multi-query): every query head attends over "
            "the same K/V, so selecting heads would skip no K/V reads; attention routers need at least 2 KV heads"
        )
    windows = as_windows(data, tokenizer, seq_len, max_tokens=tokens)  # [n, seq_len + 1]
    n_heldout = math.ceil(heldout * len(windows))
    if not 0 < n_heldout < len(windows):
        raise DataError(
            f"calibration needs at least 2 windows of {seq_len} tokens (one held out, heldout={heldout}); "
            f"the data gives {len(windows)}"
        )
    device = next(model.parameters()).device
    if expected is not None and set(expected) <= set(dense_layers):
        raise _nothing_to_route(expected, dense_layers)
    per_window = min(seq_len, math.ceil((samples or len(windows) * seq_len) / len(windows)))
    mlp = None
    if mlp_rank not in (0, None):
        mlp = MlpCalibrator(rank=mlp_rank, dense_layers=dense_layers, train_windows=len(windows) - n_heldout,
                            heldout_windows=n_heldout, batch_size=batch_size, seq_len=seq_len,
                            capacity=mlp_heldout_tokens, min_steps=mlp_steps, seed=seed)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="polar-calibrate-") as directory:
        candidates = [layer for layer in range(shape.num_layers) if layer not in set(dense_layers)]
        store = FeatureStore(Path(directory), candidates, len(windows) * per_window, shape)
        found = collect(model, windows, store, per_window=per_window, batch_size=batch_size, seed=seed,
                        progress=progress, mlp=mlp)
        layers = store.layers
        if not layers:
            raise _nothing_to_route(found.layers, dense_layers)
        split = (len(windows) - n_heldout) * per_window
        weights, biases, reports = {}, {}, []
        for layer in tqdm(layers, desc="train routers", disable=not progress):
            start = time.perf_counter()
            x, norms = (t.to(device) for t in store.load(layer))
            k = kept_units(density, shape.num_kv_heads)
            linear, loss = train_router(x[:split], norms[:split], steps=steps)
            with torch.no_grad():
                recall = router_recall(linear(x[split:]), norms[split:], k)
            weights[layer], biases[layer] = router_from_linear(linear)
            reports.append(LayerReport(layer, split, len(x) - split, loss, recall, time.perf_counter() - start))
    mlp_routers, mlp_provenance = None, {"off": "mlp_rank is 0"}
    if mlp is not None:
        mlp_routers, mlp_reports = mlp.finish(shape.num_layers, recall=mlp_recall)
        mlp_provenance = (mlp.provenance(mlp_reports, mlp_recall) if mlp_routers is not None
                          else {"off": found.mlp_absent or "no ReLU MLP outside dense_layers"})
    bank = RouterBank(shape, weights, biases, dict.fromkeys(layers, float(density)), mlp=mlp_routers, provenance={
        "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        "windows": len(windows), "seq_len": seq_len, "tokens": len(windows) * seq_len,
        "heldout_windows": n_heldout, "samples_per_layer": len(windows) * per_window,
        "loss": "norm-gap-weighted pairwise logistic (RankNet)", "density": density,
        "attention_layers": found.layers, "skipped_sites": found.skipped,
        "layers": [asdict(r) for r in reports], "mlp": mlp_provenance,
    })
    if target_loss_increase is not None:
        bank.densities = select_densities(model, bank, windows[-n_heldout:], target_loss_increase,
                                          batch_size=batch_size, progress=progress)
        bank.provenance["target_loss_increase"] = target_loss_increase
    return bank


class FeatureStore:
    """Per-layer memory maps on disk: router inputs ``[N, hidden]`` fp16 and unit norms ``[N, units]`` fp32.

    Accepts samples for ``layers``; a layer's maps exist once it has samples (:attr:`layers`), so layers without
    attention take no disk.
    """

    def __init__(self, directory: Path, layers: Iterable[int], capacity: int, shape: ModelShape) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.capacity, self.shape = directory, capacity, shape
        self.accepted = frozenset(layers)
        self.x: dict[int, np.memmap] = {}
        self.norms: dict[int, np.memmap] = {}
        self.written: dict[int, int] = {}

    @property
    def layers(self) -> list[int]:
        """The layers with samples, ascending."""
        return sorted(self.written)

    def accepts(self, layer: int) -> bool:
        """True when samples of ``layer`` are stored."""
        return layer in self.accepted

    def append(self, layer: int, x: Tensor, norms: Tensor) -> None:
        """Write ``layer``'s router inputs and per-unit output norms of ``N`` more tokens after those stored."""
        # x: [N, hidden]   norms: [N, units]
        if layer not in self.written:
            self.x[layer] = np.lib.format.open_memmap(self.directory / f"x{layer}.npy", "w+", np.float16,
                                                      (self.capacity, self.shape.hidden_size))
            self.norms[layer] = np.lib.format.open_memmap(self.directory / f"n{layer}.npy", "w+", np.float32,
                                                          (self.capacity, self.shape.num_kv_heads))
            self.written[layer] = 0
        start, stop = self.written[layer], self.written[layer] + len(x)
        self.x[layer][start:stop] = x.detach().to(torch.float16).cpu().numpy()
        self.norms[layer][start:stop] = norms.detach().float().cpu().numpy()
        self.written[layer] = stop

    def load(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's samples as fp32 tensors ``[N, hidden]``, ``[N, units]``."""
        stop = self.written[layer]
        return (torch.from_numpy(np.asarray(self.x[layer][:stop], dtype=np.float32)),
                torch.from_numpy(np.array(self.norms[layer][:stop])))


def collect(model: nn.Module, windows: Tensor, store: FeatureStore, *, per_window: int, batch_size: int = 8,
            seed: int = 0, progress: bool = True, mlp: MlpCalibrator | None = None) -> InstrumentedModel:
    """Run windows ``[n, T + 1]`` through the instrumented model; store ``per_window`` random positions per window
    for each attention layer the store accepts. Returns the instrumented model (its attention layers, the SDPA
    calls it skipped).

    Positions are drawn per window (sorted), the same for every layer; rows are stored in window order. With
    ``mlp``, every ReLU MLP also feeds it (one pass, then ``mlp.passes - 1`` more over its training windows, which
    store no attention features); an explicit MLP rank on a model without ReLU MLPs fails after the first batch.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    positions: list[Tensor] = []  # [B, per_window] of the current batch; empty: store nothing

    def record(site: SiteInfo, x: Tensor, out: Tensor) -> Tensor:
        # x: [B, T, hidden]   out: [B, H, T, D]
        if positions and store.accepts(site.layer):
            index = positions[0].to(x.device)
            x_kept = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # [B, per_window, hidden]
            norms = unit_norms(out, site.units)  # [B, T, units]
            norms_kept = norms.gather(1, index[..., None].expand(-1, -1, site.units))
            store.append(site.layer, x_kept.flatten(0, 1), norms_kept.flatten(0, 1))
        return out

    instrumented = instrument(model, record, mlp_hook=mlp)
    seq_len = windows.shape[1] - 1
    for start in tqdm(range(0, len(windows), batch_size), desc="collect", disable=not progress):
        batch = windows[start : start + batch_size, :-1]
        order = torch.rand(len(batch), seq_len, generator=generator).argsort(dim=1)
        positions[:] = [order[:, :per_window].sort(dim=1).values]
        if mlp is not None:
            mlp.begin_batch(range(start, start + len(batch)))
        instrumented(batch.to(device))
        if mlp is not None and mlp.required and start == 0:
            instrumented.require_mlp()
    positions.clear()
    if mlp is not None and instrumented.mlp_layers:
        train = windows[: mlp.train_windows, :-1]
        for _ in tqdm(range(1, mlp.passes), desc="MLP router passes", disable=not progress):
            for start in range(0, len(train), batch_size):
                mlp.begin_batch(range(start, start + len(train[start : start + batch_size])), heldout=False)
                instrumented(train[start : start + batch_size].to(device))
    return instrumented


def train_router(x: Tensor, norms: Tensor, *, steps: int = 50, weight_decay: float = 1e-4
                 ) -> tuple[nn.Linear, float]:
    """A ``Linear(hidden, units)`` whose scores rank the units of each row as ``norms`` do, and its final loss.

    ``x``: ``[N, hidden]`` router inputs, ``norms``: ``[N, units]`` per-unit output norms. The loss is described
    in the module docstring; it is convex, so L-BFGS from zero finds its optimum.
    """
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # [N, hidden]
    first, second = torch.triu_indices(norms.shape[1], norms.shape[1], offset=1, device=x.device)  # pairs i < j
    gap = norms[:, first] - norms[:, second]  # [N, pairs]: > 0 where unit i should rank above unit j
    weight, sign = gap.abs() / gap.abs().sum(), gap.sign()
    linear = nn.Linear(x.shape[1], norms.shape[1], device=x.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def loss_fn() -> Tensor:
        scores = linear(z)  # [N, units]
        margin = sign * (scores[:, first] - scores[:, second])  # [N, pairs]
        return (weight * F.softplus(-margin)).sum() + weight_decay * linear.weight.square().sum()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        loss = loss_fn()
        linear.weight /= std  # fold the standardization in: W (x - m) / s + b
        linear.bias -= linear.weight @ mean
    return linear, float(loss)


def router_recall(scores: Tensor, norms: Tensor, k: int) -> float:
    """Mean over rows of |top-k by ``scores`` ∩ top-k by ``norms``| / k (both ``[N, units]``)."""
    predicted = F.one_hot(torch.topk(scores, k, dim=-1).indices, scores.shape[-1]).sum(1)  # [N, units]
    true = F.one_hot(torch.topk(norms, k, dim=-1).indices, norms.shape[-1]).sum(1)
    return (predicted * true).sum(-1).float().mean().item() / k


def select_densities(model: nn.Module, bank: RouterBank, windows: Tensor, target_loss_increase: float, *,
                     batch_size: int = 8, progress: bool = True) -> dict[int, float]:
    """Per-layer densities for ``bank``: greedily drop one unit at a time where held-out NLL rises least.

    Starts dense and stops before the mean NLL over ``windows`` exceeds dense's by ``target_loss_increase``
    nats per token.
    """
    evaluator = Evaluator(model, bank, batch_size=batch_size, progress=False)
    units = bank.shape.num_kv_heads

    def mean_nll(kept: dict[int, int]) -> float:
        return evaluator.token_nll(windows, Sparsity("routers", tuple(sorted(kept.items())))).mean().item()

    kept = dict.fromkeys(bank.layers, units)
    budget = mean_nll(kept) + target_loss_increase
    with tqdm(desc="select densities", disable=not progress) as bar:
        while True:
            trials = {layer: mean_nll({**kept, layer: k - 1}) for layer, k in kept.items() if k > 1}
            bar.update(1)
            if not trials or min(trials.values()) > budget:
                break
            best = min(trials, key=trials.get)
            kept[best] -= 1
    return {layer: k / units for layer, k in kept.items()}


def _nothing_to_route(attention: Sequence[int], dense_layers: Sequence[int]) -> RouterBankError:
    return RouterBankError(
        f"nothing to route: the attention layers {list(attention)} are all in dense_layers {list(dense_layers)}"
    )
