"""The MLP half of :mod:`.instrument`: a hook on the hidden activation of every ReLU MLP (calibration, evaluation).

At each MLP site the matcher (``passes/match_mlp.py``) finds with a bare ReLU and a decoder layer (a site without a
``dense_reason``), ``h = hook(info, x, h)`` is inserted in front of the down projection. ``x`` is the MLP's input
(the up and gate projections' input, the post-norm hidden state), ``h`` the down projection's input:
``relu(up x + b)``, or ``relu(gate x) * up x`` for a gated MLP. Both reach the hook as ``[B, T, width]``, whatever
the graph's own layout (OPT flattens tokens to ``[B*T, d]``); the hook's return, ``[B, T, ffn]``, replaces the down
projection's input. A token's true active neurons are those with ``h != 0``.

Also what MLP hooks share: the router math of the backend's semantics (DESIGN §4, :func:`neuron_scores`,
:func:`keep_top_k`), a bounded token sample (:class:`TokenSample`), and :class:`MlpGate`, the hook that applies a
bank's MLP routers per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from .mlp_routers import MlpRouters
from .passes.graph import bound_args, op_name
from .passes.match_mlp import MlpSite

__all__ = ["MlpGate", "MlpInfo", "MlpTrace", "TokenSample", "insert_mlp_hooks", "keep_top_k", "neuron_scores"]


@dataclass(frozen=True)
class MlpInfo:
    """What an MLP hook knows about its site: the layer, the MLP's widths and whether it is gated."""

    layer: int
    hidden: int
    ffn: int
    gated: bool = False

    @property
    def weight_count(self) -> int:
        """The MLP's weights (2 or 3 matrices of ``hidden x ffn``): what a decode step reads when it is dense."""
        return (3 if self.gated else 2) * self.hidden * self.ffn


MlpHook = Callable[[MlpInfo, Tensor, Tensor], Tensor]  # (site, x [B, T, hidden], h [B, T, ffn]) -> h


@dataclass
class MlpTrace:
    """The MLP sites the backend found: hooked layers, the others' reasons, and the hooks that ran in a call."""

    owned: set[int] = field(default_factory=set)
    dense: dict[str, None] = field(default_factory=dict)  # "module (layer i): reason" of MLPs left alone
    activations: dict[str, None] = field(default_factory=dict)  # activations of the MLPs left alone
    seen: set[int] = field(default_factory=set)
    batch: tuple[int, int] = (0, 0)  # (B, T) of the current call

    def why_none(self, name: str) -> str:
        """Why ``name`` (the model) has no MLP to hook: the activation found, or that the matcher found no MLP."""
        if self.activations:
            found = ", ".join(self.activations)
            zeros = "has" if len(self.activations) == 1 else "have"
            return (f"{name} has no ReLU MLP to route: its MLPs' activation is {found}, which {zeros} no exact zeros "
                    "(only ReLU MLPs are sparsified)")
        if self.dense:
            return f"{name} has no ReLU MLP to route: " + "; ".join(self.dense)
        return (f"{name} has no MLP the matcher can route: its graph has no down(relu(up(x))) or "
                "down(relu(gate(x)) * up(x)) inside a decoder layer")


def insert_mlp_hooks(gm: fx.GraphModule, sites: list[MlpSite], hook: MlpHook, trace: MlpTrace) -> None:
    """Put ``hook`` in front of the down projection of every site without a ``dense_reason``; note the others."""
    for site in sites:
        if site.dense_reason is not None:
            where = f"{site.layer_module or site.down.name} (layer {site.layer})"
            trace.dense[f"{where}: {site.dense_reason}"] = None
            if not site.has_exact_zeros:
                trace.activations[site.activation] = None
            continue
        info = MlpInfo(int(site.layer), int(site.hidden_size), int(site.ffn_size), site.gate is not None)
        trace.owned.add(info.layer)
        _insert(gm, site, info, hook, trace)


def _insert(gm: fx.GraphModule, site: MlpSite, info: MlpInfo, hook: MlpHook, trace: MlpTrace) -> None:
    x = bound_args(site.up, op_name(site.up))["input"]
    h = bound_args(site.down, op_name(site.down))["input"]

    def polar_mlp_hook(x: Tensor, h: Tensor) -> Tensor:
        # x: [B, T, hidden] or [B*T, hidden]   h: [B, T, ffn] or [B*T, ffn]
        trace.seen.add(info.layer)
        batch, length = trace.batch
        if h.numel() != batch * length * info.ffn or x.numel() != batch * length * info.hidden:
            raise RuntimeError(f"layer {info.layer}: MLP tensors {tuple(x.shape)}, {tuple(h.shape)} are not the "
                               f"{batch} x {length} tokens of the call")
        out = hook(info, x.reshape(batch, length, info.hidden), h.reshape(batch, length, info.ffn))
        return out.reshape(h.shape)

    with gm.graph.inserting_before(site.down):
        new = gm.graph.call_function(polar_mlp_hook, (x, h))
    site.down.replace_input_with(h, new)


def neuron_scores(x: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Per-token router scores ``relu((x @ w_in.T) @ w_out.T)`` ``[..., ffn]`` fp32, the rank-r activation rounded
    to x's dtype between the products (as ``polar::mlp_route``); a batch's scores are their sum over tokens."""
    low = (x.float() @ w_in.float().to(x.device).T).to(x.dtype).float()  # [..., r]
    return torch.relu(low @ w_out.float().to(x.device).T)


def keep_top_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask ``[..., ffn]`` of the ``k`` largest ``scores`` per row: ties to the lower index, NaN lowest (the
    order of ``polar::mlp_route``)."""
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")) + 0.0  # -0.0 ties +0.0
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, best, True)


class TokenSample:
    """A bounded sample of one layer's tokens: ``x [N, hidden]`` (model dtype), ``active [N, ffn]`` bool and the
    window each came from ``[N]``; appends beyond ``capacity`` tokens are dropped."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.count = capacity, 0
        self.x: list[Tensor] = []
        self.active: list[Tensor] = []
        self.windows: list[Tensor] = []

    def append(self, x: Tensor, active: Tensor, windows: Tensor) -> None:
        """Keep copies of the first tokens of ``x``, ``active`` and ``windows`` that still fit in the sample."""
        # x: [n, hidden]   active: [n, ffn]   windows: [n]
        room = self.capacity - self.count
        if room <= 0 or not len(x):
            return
        self.x.append(x[:room].detach().clone())
        self.active.append(active[:room].detach().clone())
        self.windows.append(windows[:room].detach().cpu().clone())
        self.count += len(self.x[-1])

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``x [N, hidden]``, ``active [N, ffn]``, ``windows [N]``."""
        return torch.cat(self.x), torch.cat(self.active), torch.cat(self.windows)


class MlpGate:
    """An MLP hook applying ``mlp`` per token: neurons outside the token's router top-k (k of the table row for
    :attr:`batch_size`; None: dense) are zeroed in ``h``. With :attr:`samples` set (a dict), it also keeps
    ``per_window`` evenly spaced tokens of each row, up to ``capacity`` per layer, with their active sets (of the
    ``h`` it was given) and window indices (:attr:`rows`, one per row of the batch)."""

    def __init__(self, mlp: MlpRouters) -> None:
        self.mlp = mlp
        self.batch_size: int | None = None
        self.rows = torch.zeros(0, dtype=torch.long)
        self.samples: dict[int, TokenSample] | None = None
        self.capacity, self.per_window = 0, 1

    def __call__(self, info: MlpInfo, x: Tensor, h: Tensor) -> Tensor:
        # x: [B, T, hidden]   h: [B, T, ffn]
        if info.layer not in self.mlp.w_in:
            return h
        if self.samples is not None:
            length = x.shape[1]
            keep = min(length, self.per_window)
            positions = ((torch.arange(keep) + 0.5) * length / keep).long().to(x.device)
            sample = self.samples.setdefault(info.layer, TokenSample(self.capacity))
            sample.append(x[:, positions].flatten(0, 1), (h[:, positions] != 0).flatten(0, 1),
                          self.rows.repeat_interleave(keep))
        k = None if self.batch_size is None else self.mlp.k_for(info.layer, self.batch_size)
        if k is None:
            return h
        keep_mask = keep_top_k(neuron_scores(x, self.mlp.w_in[info.layer], self.mlp.w_out[info.layer]), k)
        return h * keep_mask.to(h.dtype)
