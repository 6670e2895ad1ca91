"""MLP routers of a router bank: per layer a low-rank pair ``in [rank, hidden]``, ``out [ffn, rank]`` and the
per-batch-size table of how many neurons to keep.

A layer's neuron scores are ``relu(x @ in.T @ out.T)`` (DESIGN.md §4); ``topk[B][layer]`` is the k calibrated for
batches of up to ``B`` sequences, ``None`` where the layer stays dense at that batch size. On disk (``routers.py``):
tensors ``layers.{i}.mlp.in.weight`` / ``layers.{i}.mlp.out.weight`` and ``polar_config.json["mlp"] =
{"rank": r, "topk": {"<B>": [k or null per layer]}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .bank_format import RouterBankError, check_finite, describe, is_int

__all__ = ["MLP_BATCH_SIZES", "MLP_K_TILE", "MlpRouters", "mlp_width", "table_k"]

MLP_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the batch sizes calibration tabulates
MLP_K_TILE: int = 64  # k in calibrated tables is a multiple of this (or ffn itself): the gather kernels' tile

# Config fields naming the MLP width, first match wins; the last two mean 4 * hidden when set to None. ffn_dim
# before decoder_ffn_dim: BART's decoder view (get_text_config(decoder=True)) maps ffn_dim to the decoder's width
# and keeps decoder_ffn_dim at its default
_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "decoder_ffn_dim", "d_ff")
_WIDTH_FIELDS_4H = ("ffn_hidden_size", "n_inner")  # Falcon, GPT-2 / GPT-BigCode


@dataclass(eq=False)
class MlpRouters:
    """Low-rank MLP routers (in [rank, hidden], out [ffn, rank] per layer) and the per-batch-size k table.

    ``w_in[i]`` / ``w_out[i]`` are floating and finite; ``topk[B]`` is a tuple with one entry per model layer: an int
    k in ``1..ffn``, or ``None`` (dense at batch size ``B``, and always for layers without a router). Compares by
    identity like :class:`~polar_compile.routers.RouterBank`, which checks it (:meth:`check`) on construction.
    """

    rank: int
    w_in: dict[int, Tensor]  # layer -> [rank, hidden]
    w_out: dict[int, Tensor]  # layer -> [ffn, rank]
    topk: dict[int, tuple[int | None, ...]]  # batch size -> k per layer (len == num_layers); None: dense

    @property
    def ffn_size(self) -> int:
        """The MLP width: the rows of every ``w_out``; :class:`RouterBankError` if none or they disagree."""
        widths = {layer: tensor.shape[0] for layer, tensor in sorted(self.w_out.items())}
        if not widths:
            raise RouterBankError("MLP routers cover no layer, so they have no MLP width (ffn)")
        if len(set(widths.values())) > 1:
            raise RouterBankError(f"MLP routers disagree on the MLP width (ffn): out.weight rows per layer {widths}")
        return next(iter(widths.values()))

    @property
    def layers(self) -> list[int]:
        """The layers with MLP routers, ascending."""
        return sorted(self.w_in)

    def k_for(self, layer: int, batch_size: int) -> int | None:
        """k of `layer` at `batch_size`: the row of the smallest tabulated batch size >= batch_size; None when
        no row is that large, the layer has no router, or the entry is null (dense)."""
        if layer not in self.w_in:
            return None
        return table_k(tuple((size, self.topk[size][layer]) for size in sorted(self.topk)), batch_size)

    def check(self, num_layers: int, hidden_size: int) -> None:
        """Raise RouterBankError naming the layer / batch size, the expected and the actual: rank positive int;
        w_in/w_out keys are the same set of layer indices in range; shapes [rank, hidden] / [ffn, rank] with one
        ffn for all layers; floating and finite; topk keys positive ints, each row a
        tuple of length num_layers of None or int in [1, ffn]; a non-null k only for layers with routers."""
        if not is_int(self.rank) or self.rank < 1:
            raise RouterBankError(f"MLP router rank (mlp.rank) must be a positive int, got {describe(self.rank)}")
        for name in ("w_in", "w_out"):
            _check_tensor_dict(getattr(self, name), name, num_layers)
        if set(self.w_in) != set(self.w_out):
            raise RouterBankError(
                f"MLP router in-weights (w_in) cover layers {sorted(self.w_in)} but out-weights (w_out) cover "
                f"{sorted(self.w_out)}"
            )
        if not self.w_in:
            raise RouterBankError("MLP routers cover no layer; a bank without MLP routers has mlp=None")
        ffn, ffn_layer = self.w_out[self.layers[0]].shape[0], self.layers[0]
        if ffn < 1:
            raise RouterBankError(f"layer {ffn_layer}: MLP router out.weight has 0 rows, expected ffn >= 1 rows")
        for layer in self.layers:
            w_in, w_out = self.w_in[layer], self.w_out[layer]
            if tuple(w_in.shape) != (self.rank, hidden_size):
                raise RouterBankError(
                    f"layer {layer}: MLP router in.weight has shape {list(w_in.shape)}, expected "
                    f"[{self.rank}, {hidden_size}] (rank x hidden_size)"
                )
            if tuple(w_out.shape) != (ffn, self.rank):
                raise RouterBankError(
                    f"layer {layer}: MLP router out.weight has shape {list(w_out.shape)}, expected "
                    f"[{ffn}, {self.rank}] (ffn x rank, with the ffn of layer {ffn_layer}'s out.weight)"
                )
            check_finite(f"layer {layer}: MLP router", (("in.weight", w_in), ("out.weight", w_out)))
        self._check_topk(num_layers, ffn)

    def _check_topk(self, num_layers: int, ffn: int) -> None:
        if not isinstance(self.topk, Mapping):
            raise RouterBankError(
                f"MLP router table mlp.topk must be a dict of batch size -> tuple of k per layer, got {describe(self.topk)}"
            )
        for size, row in self.topk.items():
            if not is_int(size) or size < 1:
                raise RouterBankError(f"MLP router table mlp.topk key must be a positive int batch size, got {describe(size)}")
            if not isinstance(row, tuple):
                raise RouterBankError(
                    f"MLP router table mlp.topk[{size}] must be a tuple of k per layer, got {describe(row)}"
                )
            if len(row) != num_layers:
                raise RouterBankError(
                    f"MLP router table mlp.topk[{size}] has {len(row)} entries, expected {num_layers} (num_layers)"
                )
            for layer, k in enumerate(row):
                if k is None:
                    continue
                if not is_int(k) or not 1 <= k <= ffn:
                    raise RouterBankError(
                        f"MLP router table mlp.topk[{size}][{layer}] must be None/null (dense) or an int in 1..{ffn} "
                        f"(ffn), got {describe(k)}"
                    )
                if layer not in self.w_in:
                    raise RouterBankError(
                        f"MLP router table mlp.topk[{size}][{layer}] is {k}, but layer {layer} has no MLP router; "
                        f"expected None (dense)"
                    )


def table_k(table: Sequence[tuple[int, int | None]], batch_size: int) -> int | None:
    """The k of a layer's ``(batch size, k)`` table rows (ascending batch sizes) at ``batch_size``: the row of the
    smallest tabulated batch size >= ``batch_size``; None when no row is that large or its k is None (dense)."""
    return next((k for batch, k in table if batch >= batch_size), None)


def _check_tensor_dict(tensors: Any, name: str, num_layers: int) -> None:
    """Raise :class:`RouterBankError` unless ``tensors`` maps layer indices in range to floating 2-D tensors."""
    kind = "in.weight" if name == "w_in" else "out.weight"
    if not isinstance(tensors, Mapping):
        raise RouterBankError(f"MLP router {name} must be a dict of layer index -> Tensor, got {describe(tensors)}")
    for layer, tensor in tensors.items():
        if not is_int(layer):
            raise RouterBankError(f"MLP router {name} keys must be int layer indices, got {describe(layer)}")
        if not 0 <= layer < num_layers:
            raise RouterBankError(f"MLP router for layer {layer}, but the model has {num_layers} layers")
        if not isinstance(tensor, Tensor):
            raise RouterBankError(f"layer {layer}: MLP router {kind} must be a torch.Tensor, got {describe(tensor)}")
        if not tensor.is_floating_point():
            raise RouterBankError(f"layer {layer}: MLP router {kind} must have a floating dtype, got {tensor.dtype}")
        if tensor.dim() != 2:
            raise RouterBankError(f"layer {layer}: MLP router {kind} must be 2-D, got shape {list(tensor.shape)}")


def mlp_width(model: nn.Module) -> int | None:
    """The MLP width (ffn) of an HF model's (text decoder's) config, or ``None`` when the config names none.

    Reads ``intermediate_size`` (Llama, GPT-NeoX, ...), ``ffn_dim`` (OPT), ``decoder_ffn_dim`` (BART family),
    ``d_ff`` (T5), ``ffn_hidden_size`` (Falcon) or ``n_inner`` (GPT-2; ``None`` there means 4 * hidden).
    """
    from .routers import _decoder_config  # routers imports this module

    config = getattr(model, "config", None)
    if config is None:
        return None
    section = _decoder_config(config, model)
    for name in (*_WIDTH_FIELDS, *_WIDTH_FIELDS_4H):
        if not hasattr(section, name):
            continue
        value = getattr(section, name)
        if value is None and name in _WIDTH_FIELDS_4H:
            value = 4 * section.hidden_size
        if value is None:
            continue
        if not is_int(value) or value < 1:
            raise RouterBankError(
                f"{type(model).__name__}: config.{name} (the MLP width) must be a positive int, got {describe(value)}"
            )
        return int(value)
    return None
