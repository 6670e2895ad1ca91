"""MLP routers in the router bank: on disk, in memory, against models (polar_compile/mlp_routers.py)."""

import bisect
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from polar_compile import MlpRouters, RouterBank, RouterBankError
from polar_compile.mlp_routers import MLP_BATCH_SIZES, MLP_K_TILE, mlp_width
from polar_compile.routers import ModelShape
from polar_compile.testing import random_routers
from tests.budget import examples
from tests.models import TinySpec, tiny_model

SHAPE = ModelShape("llama", 3, 16, 4, 2)
RANK, FFN = 8, 64  # the bank every corruption starts from: MLP routers on layers 1 and 2


def small_mlp(topk: dict | None = None, **tensors) -> MlpRouters:
    generator = torch.Generator().manual_seed(0)
    w_in = {i: torch.randn(RANK, 16, generator=generator) for i in (1, 2)}
    w_out = {i: torch.randn(FFN, RANK, generator=generator) for i in (1, 2)}
    table = topk if topk is not None else {1: (None, 32, 64), 16: (None, 64, None)}
    return MlpRouters(RANK, {**w_in, **tensors.get("w_in", {})}, {**w_out, **tensors.get("w_out", {})}, table)


def small_bank(attention: bool = True) -> RouterBank:
    layers = (1, 2) if attention else ()
    return RouterBank(SHAPE, {i: torch.zeros(2, 16) for i in layers}, {i: torch.zeros(2) for i in layers},
                      mlp=small_mlp())


def edit_config(directory: Path, edit) -> None:
    """Apply ``edit`` to the parsed polar_config.json of the bank at ``directory`` and write it back."""
    file = directory / "polar_config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def edit_tensors(directory: Path, **changes) -> None:
    """Replace (or, with None, remove) tensors of the bank's routers.safetensors; keys use '_' for '.'."""
    file = directory / "routers.safetensors"
    tensors = load_file(str(file))
    for key, tensor in changes.items():
        name = key.replace("_", ".")
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(file))


# ---- round trip ---------------------------------------------------------------------------------------------------

@settings(max_examples=examples(25))
@given(layers=st.integers(1, 5), hidden=st.integers(1, 24), rank=st.integers(1, 6), ffn=st.integers(1, 40),
       seed=st.integers(0, 999), data=st.data())
def test_random_mlp_banks_round_trip_exactly(tmp_path_factory, layers, hidden, rank, ffn, seed, data):
    shape = ModelShape("opt", layers, hidden, 2, 2)
    routed = sorted(data.draw(st.sets(st.integers(0, layers - 1), min_size=1)))
    attention = data.draw(st.sets(st.integers(0, layers - 1)))  # often none: a bank of MLP routers only
    entry = st.one_of(st.none(), st.integers(1, ffn))
    topk = data.draw(st.dictionaries(
        st.integers(1, 512),
        st.tuples(*[entry if i in routed else st.none() for i in range(layers)]), max_size=4))
    generator = torch.Generator().manual_seed(seed)
    mlp = MlpRouters(rank, {i: torch.randn(rank, hidden, generator=generator) for i in routed},
                     {i: torch.randn(ffn, rank, generator=generator) for i in routed}, topk)
    bank = RouterBank(shape, {i: torch.randn(2, hidden, generator=generator) for i in attention},
                      {i: torch.randn(2, generator=generator) for i in attention}, mlp=mlp)
    loaded = RouterBank.load(bank.save(tmp_path_factory.mktemp("bank")))
    assert loaded.layers == sorted(attention) and loaded.mlp.layers == routed
    assert loaded.mlp.rank == rank and loaded.mlp.ffn_size == ffn and loaded.mlp.topk == topk
    for i in routed:
        assert torch.equal(loaded.mlp.w_in[i], mlp.w_in[i]) and torch.equal(loaded.mlp.w_out[i], mlp.w_out[i])
    for i in attention:
        assert torch.equal(loaded.weights[i], bank.weights[i]) and torch.equal(loaded.biases[i], bank.biases[i])


def test_the_files_hold_exactly_the_issue_format(tmp_path):
    directory = small_bank(attention=False).save(tmp_path / "bank")
    config = json.loads((directory / "polar_config.json").read_text())
    assert config["mlp"] == {"rank": RANK, "topk": {"1": [None, 32, 64], "16": [None, 64, None]}}
    tensors = load_file(str(directory / "routers.safetensors"))
    assert {name: list(t.shape) for name, t in tensors.items()} == {
        "layers.1.mlp.in.weight": [RANK, 16], "layers.1.mlp.out.weight": [FFN, RANK],
        "layers.2.mlp.in.weight": [RANK, 16], "layers.2.mlp.out.weight": [FFN, RANK]}
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_half_precision_routers_are_saved_as_fp32():
    mlp = small_mlp()
    half = MlpRouters(RANK, {i: t.half() for i, t in mlp.w_in.items()}, {i: t.half() for i, t in mlp.w_out.items()},
                      mlp.topk)
    bank = RouterBank(SHAPE, {}, {}, mlp=half)
    assert bank.layers == [] and bank.mlp.layers == [1, 2]


def test_a_bank_without_mlp_routers_writes_no_mlp_section(tmp_path):
    bank = RouterBank(SHAPE, {1: torch.zeros(2, 16)}, {1: torch.zeros(2)})
    directory = bank.save(tmp_path / "bank")
    assert "mlp" not in json.loads((directory / "polar_config.json").read_text())
    assert RouterBank.load(directory).mlp is None


# ---- k_for --------------------------------------------------------------------------------------------------------

def reference_k(topk: dict, routed: set, layer: int, batch_size: int):
    """The k table read by hand: the row of the first tabulated size at or above ``batch_size``."""
    sizes = sorted(topk)
    at = bisect.bisect_left(sizes, batch_size)
    if at == len(sizes) or layer not in routed:
        return None
    return topk[sizes[at]][layer]


@settings(max_examples=examples(60))
@given(layers=st.integers(1, 4), data=st.data())
def test_k_for_reads_the_row_of_the_nearest_larger_batch_size(layers, data):
    routed = data.draw(st.sets(st.integers(0, layers - 1), min_size=1))
    row = st.tuples(*[st.one_of(st.none(), st.integers(1, 8)) if i in routed else st.none() for i in range(layers)])
    topk = data.draw(st.dictionaries(st.sampled_from(MLP_BATCH_SIZES) | st.integers(1, 300), row, max_size=5))
    mlp = MlpRouters(2, {i: torch.zeros(2, 4) for i in routed}, {i: torch.zeros(8, 2) for i in routed}, topk)
    mlp.check(layers, 4)
    for layer in range(-1, layers + 1):
        for batch_size in [*range(1, 20), *MLP_BATCH_SIZES, 255, 257, 301, 1000]:
            assert mlp.k_for(layer, batch_size) == reference_k(topk, routed, layer, batch_size)
    for size, entries in topk.items():  # a tabulated size reads its own row
        assert [mlp.k_for(i, size) for i in sorted(routed)] == [entries[i] for i in sorted(routed)]


def test_k_for_examples():
    mlp = small_mlp({4: (None, 64, 128 - 64), 64: (None, None, 64)})
    assert mlp.k_for(1, 1) == 64 and mlp.k_for(1, 4) == 64 and mlp.k_for(2, 3) == 64
    assert mlp.k_for(1, 5) is None  # dense at 5..64 sequences
    assert mlp.k_for(2, 64) == 64 and mlp.k_for(2, 65) is None  # no row that large
    assert mlp.k_for(0, 1) is None  # no router
    assert MLP_K_TILE == 64
    assert tuple(2**i for i in range(9)) == MLP_BATCH_SIZES


# ---- malformed files ------------------------------------------------------------------------------------------------

def set_mlp(path: str, value):
    """An edit that sets (or, with ..., deletes) ``config["mlp"]`` + ``path`` (a sequence of keys)."""
    def edit(config):
        *parents, name = ["mlp", *path]
        section = config
        for key in parents:
            section = section[key]
        if value is ...:
            del section[name]
        else:
            section[name] = value
    return edit


CONFIG_CORRUPTIONS = [
    ((), [8], r"mlp must be a JSON object with fields \['rank', 'topk'\], got list \[8\]"),
    (("topk",), ..., r"mlp is missing field\(s\) \['topk'\]; the fields are \['rank', 'topk'\]"),
    (("rank",), ..., r"mlp is missing field\(s\) \['rank'\]"),
    (("density",), 0.5, r"mlp has unknown field\(s\) \['density'\]; the fields are \['rank', 'topk'\]"),
    (("rank",), "8", r"mlp\.rank must be a positive int, got str '8'"),
    (("rank",), 0, r"mlp\.rank must be a positive int, got int 0"),
    (("rank",), True, r"mlp\.rank must be a positive int, got bool True"),
    (("rank",), 4, r"mlp\.rank is 4, but the MLP routers in routers\.safetensors have rank 8 "
                   r"\(layers\.1\.mlp\.in\.weight has shape \[8, 16\]\)"),
    (("topk",), [[None, 8, 8]], r"mlp\.topk must be a JSON object mapping batch sizes .* got list"),
    (("topk", "16"), [None, 8], r"mlp\.topk\['16'\] has 2 entries, expected 3 \(model\.num_layers\)"),
    (("topk", "16"), [None, 8, 8, 8], r"mlp\.topk\['16'\] has 4 entries, expected 3 \(model\.num_layers\)"),
    (("topk", "16"), {"1": 8}, r"mlp\.topk\['16'\] must be a list of k \(a positive int\) or null per layer, got dict"),
    (("topk", "16", 1), 0, r"mlp\.topk\['16'\]\[1\] must be null \(dense\) or a positive int, got int 0"),
    (("topk", "16", 1), -3, r"mlp\.topk\['16'\]\[1\] must be null \(dense\) or a positive int, got int -3"),
    (("topk", "16", 1), 8.0, r"mlp\.topk\['16'\]\[1\] must be null \(dense\) or a positive int, got float 8\.0"),
    (("topk", "16", 1), "8", r"mlp\.topk\['16'\]\[1\] must be null \(dense\) or a positive int, got str '8'"),
    (("topk", "16", 1), FFN + 1, rf"MLP router table mlp\.topk\[16\]\[1\] must be None/null \(dense\) or an int in "
                                 rf"1\.\.{FFN} \(ffn\), got int {FFN + 1}"),
    (("topk", "16", 0), 8, r"MLP router table mlp\.topk\[16\]\[0\] is 8, but layer 0 has no MLP router; expected "
                           r"None \(dense\)"),
    (("topk", "big"), [None, 8, 8], r"mlp\.topk key 'big' is not a batch size: expected a positive int without "
                                    r"leading zeros, e\.g\. \"16\""),
    (("topk", "016"), [None, 8, 8], r"mlp\.topk key '016' is not a batch size"),
    (("topk", "0"), [None, 8, 8], r"mlp\.topk key '0' is not a batch size"),
    (("topk", "-1"), [None, 8, 8], r"mlp\.topk key '-1' is not a batch size"),
]


@pytest.mark.parametrize(("path", "value", "message"), CONFIG_CORRUPTIONS,
                         ids=[f"mlp.{'.'.join(map(str, p))}={v if v is not ... else 'deleted'}"
                              for p, v, _ in CONFIG_CORRUPTIONS])
def test_each_malformed_mlp_section_is_named(tmp_path, path, value, message):
    directory = small_bank().save(tmp_path / "bank")
    edit_config(directory, set_mlp(path, value))
    with pytest.raises(RouterBankError, match=rf"^router bank {re.escape(str(directory))}: polar_config\.json: {message}"):
        RouterBank.load(directory)


TENSOR_CORRUPTIONS = [
    ({"layers_2_mlp_out_weight": torch.zeros(32, RANK)},
     rf"layer 2: MLP router out\.weight has shape \[32, {RANK}\], expected \[{FFN}, {RANK}\] \(ffn x rank, with the "
     r"ffn of layer 1's out\.weight\)"),
    ({"layers_1_mlp_in_weight": torch.zeros(RANK, 12), "layers_2_mlp_in_weight": torch.zeros(RANK, 12)},
     rf"layer 1: MLP router in\.weight has shape \[{RANK}, 12\], expected \[{RANK}, 16\] \(rank x hidden_size\)"),
    ({"layers_2_mlp_in_weight": torch.zeros(4, 16)},
     rf"layer 2: MLP router in\.weight has shape \[4, 16\], expected \[{RANK}, 16\] \(rank x hidden_size\)"),
    ({"layers_1_mlp_in_weight": torch.zeros(4, 16)},  # the odd one out is named, whatever its layer
     rf"layer 1: MLP router in\.weight has shape \[4, 16\], expected \[{RANK}, 16\] \(rank x hidden_size\)"),
    ({"layers_2_mlp_out_weight": torch.zeros(FFN, 4)},
     rf"layer 2: MLP router out\.weight has shape \[{FFN}, 4\], expected \[{FFN}, {RANK}\]"),
    ({"layers_2_mlp_in_weight": torch.zeros(RANK)}, r"layer 2: MLP router in\.weight must be 2-D, got shape \[8\]"),
    ({"layers_2_mlp_out_weight": None},
     r"MLP router in-weights \(w_in\) cover layers \[1, 2\] but out-weights \(w_out\) cover \[1\]"),
    ({"layers_1_mlp_in_weight": torch.full((RANK, 16), float("nan"))},
     rf"layer 1: MLP router in\.weight has {RANK * 16} NaN value\(s\); router weights must be finite"),
    ({"layers_2_mlp_out_weight": torch.zeros(FFN, RANK).index_fill_(0, torch.tensor([3]), float("inf"))},
     rf"layer 2: MLP router out\.weight has {RANK} inf value\(s\); router weights must be finite"),
    ({"layers_5_mlp_in_weight": torch.zeros(RANK, 16), "layers_5_mlp_out_weight": torch.zeros(FFN, RANK)},
     r"MLP router for layer 5, but the model has 3 layers"),
]


@pytest.mark.parametrize(("changes", "message"), TENSOR_CORRUPTIONS)
def test_each_malformed_mlp_tensor_is_named(tmp_path, changes, message):
    directory = small_bank().save(tmp_path / "bank")
    edit_tensors(directory, **changes)
    with pytest.raises(RouterBankError, match=rf"^router bank .*: routers\.safetensors: {message}"):
        RouterBank.load(directory)


def test_integer_mlp_tensor_is_refused(tmp_path):
    directory = small_bank().save(tmp_path / "bank")
    edit_tensors(directory, layers_1_mlp_in_weight=torch.zeros(RANK, 16, dtype=torch.int32))
    with pytest.raises(RouterBankError, match=r"routers\.safetensors: tensor 'layers\.1\.mlp\.in\.weight' must have a "
                                              r"floating dtype, got torch\.int32"):
        RouterBank.load(directory)


def test_mlp_tensors_without_a_section_and_a_section_without_tensors(tmp_path):
    directory = small_bank().save(tmp_path / "bank")
    edit_config(directory, lambda config: config.pop("mlp"))
    with pytest.raises(RouterBankError, match=r"routers\.safetensors holds MLP router tensors \(layers \[1, 2\]\) but "
                                              r"polar_config\.json has no mlp section; expected \"mlp\": \{\"rank\""):
        RouterBank.load(directory)
    directory = small_bank().save(tmp_path / "bank2")
    edit_tensors(directory, **{f"layers_{i}_mlp_{kind}_weight": None for i in (1, 2) for kind in ("in", "out")})
    with pytest.raises(RouterBankError, match=r"polar_config\.json has an mlp section \(rank 8\) but "
                                              r"routers\.safetensors holds no MLP router tensors"):
        RouterBank.load(directory)


# ---- malformed in memory ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mlp", "message"), [
    (lambda: MlpRouters(0, {}, {}, {}), r"MLP router rank \(mlp\.rank\) must be a positive int, got int 0"),
    (lambda: MlpRouters(RANK, {}, {}, {}), r"MLP routers cover no layer; a bank without MLP routers has mlp=None"),
    (lambda: small_mlp({1: [None, 8, 8]}), r"MLP router table mlp\.topk\[1\] must be a tuple of k per layer, got list"),
    (lambda: small_mlp({1: (None, 8)}), r"MLP router table mlp\.topk\[1\] has 2 entries, expected 3 \(num_layers\)"),
    (lambda: small_mlp({"1": (None, 8, 8)}), r"mlp\.topk key must be a positive int batch size, got str '1'"),
    (lambda: small_mlp({0: (None, 8, 8)}), r"mlp\.topk key must be a positive int batch size, got int 0"),
    (lambda: small_mlp({1: (None, 0, 8)}), rf"mlp\.topk\[1\]\[1\] must be None/null \(dense\) or an int in 1\.\.{FFN}"),
    (lambda: small_mlp({1: (None, True, 8)}), r"mlp\.topk\[1\]\[1\] must be .*, got bool True"),
    (lambda: small_mlp({1: (4, 8, 8)}), r"mlp\.topk\[1\]\[0\] is 4, but layer 0 has no MLP router"),
    (lambda: small_mlp(w_in={1: torch.zeros(RANK, 16, dtype=torch.long)}),
     r"layer 1: MLP router in\.weight must have a floating dtype, got torch\.int64"),
    (lambda: small_mlp(w_in={"1": torch.zeros(RANK, 16)}), r"MLP router w_in keys must be int layer indices, got str"),
    (lambda: small_mlp(w_out={1: [[0.0]]}), r"layer 1: MLP router out\.weight must be a torch\.Tensor, got list"),
    (lambda: small_mlp(w_out={1: torch.zeros(0, RANK)}), r"layer 1: MLP router out\.weight has 0 rows"),
    (lambda: "mlp", r"RouterBank\.mlp must be MlpRouters or None, got str 'mlp'"),
])
def test_malformed_mlp_routers_are_refused_by_the_bank(mlp, message):
    with pytest.raises(RouterBankError, match=message):
        RouterBank(SHAPE, {}, {}, mlp=mlp())


def test_ffn_size_needs_layers_that_agree():
    assert small_mlp().ffn_size == FFN
    with pytest.raises(RouterBankError, match=r"MLP routers cover no layer"):
        _ = MlpRouters(RANK, {}, {}, {}).ffn_size
    with pytest.raises(RouterBankError, match=r"disagree on the MLP width \(ffn\): out\.weight rows per layer "
                                              r"\{1: 64, 2: 32\}"):
        _ = small_mlp(w_out={2: torch.zeros(32, RANK)}).ffn_size


# ---- against models -----------------------------------------------------------------------------------------------

def llama(intermediate: int) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=intermediate,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_check_model_compares_the_mlp_width():
    bank = small_bank()
    bank.check_model(llama(FFN))
    with pytest.raises(RouterBankError, match=rf"router bank does not fit this model: MLP width \(ffn\) is {FFN} in "
                                              r"the bank, 48 in the model"):
        bank.check_model(llama(48))
    RouterBank(SHAPE, {}, {}).check_model(llama(48))  # no MLP routers, nothing to compare


@pytest.mark.parametrize(("config", "width"), [
    (transformers.LlamaConfig(intermediate_size=40), 40),
    (transformers.GPTNeoXConfig(intermediate_size=44), 44),
    (transformers.OPTConfig(ffn_dim=48), 48),
    (transformers.BartConfig(decoder_ffn_dim=52, encoder_ffn_dim=12), 52),
    (transformers.T5Config(d_ff=56), 56),
    (transformers.GPT2Config(n_embd=16, n_inner=60), 60),
    (transformers.GPT2Config(n_embd=16, n_inner=None), 64),
    (transformers.FalconConfig(hidden_size=16, num_attention_heads=4), 64),
])
def test_mlp_width_reads_each_family_s_field(config, width):
    assert mlp_width(SimpleNamespace(config=config)) == width


def test_mlp_width_is_none_when_the_config_names_none():
    assert mlp_width(SimpleNamespace(config=SimpleNamespace(hidden_size=16))) is None
    assert mlp_width(nn.Linear(2, 2)) is None
    with pytest.raises(RouterBankError, match=r"config\.intermediate_size \(the MLP width\) must be a positive int, "
                                              r"got str '8'"):
        mlp_width(SimpleNamespace(config=SimpleNamespace(intermediate_size="8")))


# ---- random_routers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_random_routers_with_mlp_routers_are_a_valid_bank(tmp_path, family):
    model = tiny_model(TinySpec(family, heads=4, kv_heads=2 if family == "llama" else 4, head_dim=4, layers=3))
    ffn = mlp_width(model)
    bank = random_routers(model, seed=3, mlp_rank=4, mlp_topk={1: 0.25, 8: 1.0, 64: [None, 2, None]})
    bank.check_model(model)
    assert bank.mlp.layers == [1, 2] and bank.mlp.ffn_size == ffn and bank.mlp.rank == 4
    k = max(1, round(0.25 * ffn))
    assert bank.mlp.topk == {1: (None, k, k), 8: (None, ffn, ffn), 64: (None, 2, None)}
    loaded = RouterBank.load(bank.save(tmp_path / "bank"))
    assert loaded.mlp.topk == bank.mlp.topk
    assert all(torch.equal(loaded.mlp.w_out[i], bank.mlp.w_out[i]) for i in (1, 2))
    default = random_routers(model, mlp_rank=2, first_layer=0)
    assert default.mlp.layers == [0, 1, 2] and default.mlp.topk == {1: (round(0.5 * ffn),) * 3}
    assert random_routers(model).mlp is None


def test_random_routers_refuses_bad_mlp_arguments():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=4, layers=3))
    with pytest.raises(RouterBankError, match=r"mlp_rank must be a positive int, got int 0"):
        random_routers(model, mlp_rank=0)
    with pytest.raises(RouterBankError, match=r"mlp_topk\[1\] must be a density in \(0, 1\] or a sequence"):
        random_routers(model, mlp_rank=2, mlp_topk={1: 1.5})
    with pytest.raises(RouterBankError, match=r"mlp\.topk\[1\] has 2 entries, expected 3"):
        random_routers(model, mlp_rank=2, mlp_topk={1: [None, 4]})
    fields = model.config.to_dict()
    del fields["intermediate_size"]
    model.config = SimpleNamespace(**fields)  # a config that names no MLP width
    with pytest.raises(ValueError, match=r"names no MLP width"):
        random_routers(model, mlp_rank=2)
