"""Tensor-parallel polar decode on the CPU: two processes, gloo (issue 15).

Each test spawns two ranks that build the same tiny model, shard it (``polar_compile.distributed.parallelize`` or
transformers' own TP) and decode several left-padded steps with ``backend="polar"``. The reference is written here,
independent of the package: the *unsharded* model, eager, with hooks that score each layer's units in float64 from
the query projection's input, take every rank's own top-k of its block of units, and zero the other heads before
the output projection.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import fx, nn
from transformers import StaticCache

import polar_compile
from polar_compile.backend import compile_graph
from polar_compile.config import PolarConfig
from polar_compile.distributed import MLP_SHARDED_REASON, parallelize
from polar_compile.passes.graph import PRIM_DTENSOR_NAMES, op_name
from polar_compile.routers import RouterBankError
from polar_compile.testing import random_routers

from .models import VOCAB, TinySpec, attention_modules, gated_attention, tiny_model

WORLD = 2
BATCH, PROMPT, STEPS = 3, 5, 3
PAD = (0, 2, 4)  # left padding per sequence


def _spawn(check: Callable[..., None], *args: object) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # CPU ranks (gloo) on any host: the ranks start with no GPU visible, or transformers' TP loading would place
    # the model on the accelerator
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        mp.spawn(_rank_main, args=(check, port, args), nprocs=WORLD, join=True)


def _rank_main(rank: int, check: Callable[..., None], port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        check(rank, *args)
    finally:
        dist.destroy_process_group()
    # the checks passed: leave without the interpreter's teardown, where a library thread still joinable once
    # aborted a rank ("terminate called without an active exception", 1 run in 5 on a loaded 2-core machine)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _mesh() -> object:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _decode(model: nn.Module, step: Callable[..., object]) -> list[torch.Tensor]:
    """Logits ``[B, vocab]`` of STEPS decode steps by ``step`` after an eager prefill of ``model`` (same random
    tokens on every rank and run), left-padded by PAD."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=generator)
    tokens = torch.randint(1, VOCAB, (BATCH, STEPS), generator=generator)
    mask = torch.ones(BATCH, PROMPT + STEPS, dtype=torch.long)
    for row, pad in enumerate(PAD):
        mask[row, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + STEPS)
    logits = []
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=mask[:, :PROMPT], past_key_values=cache,
              cache_position=torch.arange(PROMPT), position_ids=positions[:, :PROMPT])
        for t in range(PROMPT, PROMPT + STEPS):
            out = step(input_ids=tokens[:, t - PROMPT : t - PROMPT + 1], attention_mask=mask[:, : t + 1],
                       past_key_values=cache, cache_position=torch.tensor([t]), position_ids=positions[:, t : t + 1])
            logits.append(out.logits[:, -1])
    return logits


def as_torch_211_graph(gm: fx.GraphModule, example_inputs: list, prefix: str = "prim") -> fx.GraphModule:
    """``gm`` (a torch 2.13 Dynamo graph) with its DTensor calls recorded as torch 2.11 Dynamo records them: before
    the device mesh became an opaque graph input (pytorch#176661), ``DTensor.from_local(x, mesh, placements)``,
    ``dt.redistribute(...)`` and ``dt.to_local()`` were call_functions of closures holding everything but the
    tensor, named ``prim from_local`` / ``prim_redistribute`` / ``prim_to_local`` (torch/_dynamo/variables/torch.py
    and tensor.py). The H200 run (torch 2.11) kept every TP site dense on such graphs. Another ``prefix`` stands for
    a form no torch version records (the matcher cannot look through it)."""
    from torch.distributed.tensor import DTensor

    values = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs, strict=True))

    def constant(node: fx.Node) -> object:  # the mesh is a placeholder here; torch 2.11 baked it into the closure
        assert node in values, f"a DTensor call reads the computed value {node}"
        return values[node]

    converted = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is DTensor.from_local:
            name, call = f"{prefix} from_local", DTensor.from_local
        elif node.op == "call_method" and node.target in ("redistribute", "to_local"):
            name, call = f"{prefix}_{node.target}", getattr(DTensor, node.target)
        elif prefix != "prim" and getattr(node.target, "__name__", None) in PRIM_DTENSOR_NAMES:  # on torch 2.11
            name, call = prefix + node.target.__name__.removeprefix("prim"), node.target
        else:
            continue
        args, kwargs = fx.node.map_arg(node.args[1:], constant), fx.node.map_arg(node.kwargs, constant)

        def fn_with_prim_types(x, call=call, args=args, kwargs=kwargs):
            return call(x, *args, **kwargs)

        fn_with_prim_types.__name__ = name
        with gm.graph.inserting_before(node):
            prim = gm.graph.call_function(fn_with_prim_types, (node.args[0],))
        prim.meta = dict(node.meta)
        node.replace_all_uses_with(prim)
        gm.graph.erase_node(node)
        converted += 1
    # on torch 2.11 itself the graph already is in that form (nothing to convert)
    assert converted or any(op_name(node) == "dtensor" for node in gm.graph.nodes), "no DTensor call in the graph"
    gm.recompile()
    return gm


def _recording(records: list, inductor: bool = False, torch_211: bool | str = False, **options: object) -> Callable:
    def backend(gm, example_inputs):
        if torch_211:
            gm = as_torch_211_graph(gm, example_inputs, *(() if torch_211 is True else (torch_211,)))
        return compile_graph(gm, example_inputs, PolarConfig(inductor=inductor, **options), records=records)

    return backend


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m, step=step: f"{what}, decode step {step}: {m}")


def _check_tp(model: nn.Module, reference: nn.Module, bank, *, inductor: bool = False, torch_211: bool = False
              ) -> None:
    """The TP ``model`` (sharded, routers not attached) against the unsharded ``reference``: polar 0.5 attached and
    from options equal the per-rank reference; polar 1.0 equals dense TP; which sites were rewritten. With
    ``torch_211``, every graph is first turned into the form torch 2.11's Dynamo records (:func:`as_torch_211_graph`).
    """
    shape = bank.shape
    with gated_attention(attention_modules(reference), bank, 0.5, shape.num_heads, shape.num_kv_heads, WORLD):
        expected = _decode(reference, reference)
    dense = _decode(model, model)

    records: list = []
    polar_compile.attach(model, bank, density=0.5)
    step = torch.compile(model.forward, backend=_recording(records, inductor, torch_211), fullgraph=True)
    _assert_close(_decode(model, step), expected, "TP polar 0.5 (attached) vs the per-rank reference")
    _assert_routed(records, bank, 0.5)

    torch._dynamo.reset()
    polar_compile.attach(model, bank, density=1.0, min_saved_mib=0)
    records = []
    step = torch.compile(model.forward, backend=_recording(records, torch_211=torch_211), fullgraph=True)
    _assert_close(_decode(model, step), dense, "TP polar 1.0 vs dense TP")
    _assert_routed(records, bank, 1.0)

    torch._dynamo.reset()
    polar_compile.detach(model)
    records = []
    if torch_211:  # the options bank: each rank's router rows from the projection's weight, through prim_to_local
        step = torch.compile(model.forward, fullgraph=True, backend=_recording(
            records, torch_211=True, routers=bank, density=0.5))
    else:
        step = torch.compile(model.forward, backend="polar", fullgraph=True,
                             options={"routers": bank, "density": 0.5, "inductor": False})
    _assert_close(_decode(model, step), expected, "TP polar 0.5 (options bank) vs the per-rank reference")
    if records:
        _assert_routed(records, bank, 0.5)


def _assert_routed(records: list, bank, density: float) -> None:
    """Every graph's attention pass rewrote exactly the bank's layers with this rank's units and its own k; layer 0
    (no router) reads the un-repeated cache (GQA pass) where it has repeat_kv; sharded MLPs are dense, saying why."""
    shape = bank.shape
    units = shape.num_kv_heads // WORLD
    k_local = max(1, round(density * units))
    for graph in records:
        passes = {record.name: record for record in graph}
        rewritten = [(s.layer, s.units, s.kept) for s in passes["attention"].sites if s.rewritten]
        assert rewritten == [(layer, units, k_local) for layer in bank.layers], passes["attention"].sites
        if shape.num_kv_heads < shape.num_heads:
            assert [s.layer for s in passes["gqa"].sites if s.rewritten] == [0], passes["gqa"].sites
        if bank.mlp is not None:  # ReLU MLPs with routers, sharded: dense, saying why
            reasons = {(s.layer, s.reason) for s in passes["mlp"].sites}
            expected = {(layer, MLP_SHARDED_REASON.format(size=WORLD)) for layer in range(shape.num_layers)}
            assert reasons == expected, reasons


def _llama_plain(rank: int, torch_211: bool = False) -> None:
    model = tiny_model(TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=3))
    bank = random_routers(model)
    reference = copy.deepcopy(model)
    _check_tp(parallelize(model, _mesh()), reference, bank, inductor=not torch_211, torch_211=torch_211)


def _even_vocab(model: nn.Module) -> nn.Module:
    """``model`` with one more vocabulary row (a copy of row 0): transformers 5.17's TP plan shards the LM head
    column-wise and needs its rows divisible by the TP size (VOCAB is odd)."""
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.weight = nn.Parameter(torch.cat([module.weight, module.weight[:1]]))
            if isinstance(module, nn.Embedding):
                module.num_embeddings += 1
            else:
                module.out_features += 1
    model.config.vocab_size += 1
    return model


def _llama_transformers(rank: int, folder: str, torch_211: bool = False) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    reference = _even_vocab(tiny_model(TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=3)))
    if rank == 0:
        reference.save_pretrained(folder)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=WORLD),
                                                 attn_implementation="sdpa").eval()
    _check_tp(model, reference, random_routers(reference), torch_211=torch_211)


def _opt_plain(rank: int, torch_211: bool = False) -> None:
    model = tiny_model(TinySpec("opt", heads=8, kv_heads=8, head_dim=8, layers=3, bias=True))
    bank = random_routers(model, mlp_rank=16, mlp_topk={BATCH: 0.5})
    reference = copy.deepcopy(model)
    _check_tp(parallelize(model, _mesh()), reference, bank, torch_211=torch_211)


def test_llama_gqa_parallelize_module() -> None:
    """Tiny GQA Llama (8 heads, 4 KV heads: 2 KV groups per rank) sharded by a plain parallelize_module plan, with
    Inductor for the attached 0.5 run (DTensor graph -> AOTAutograd -> local tensors + collectives)."""
    _spawn(_llama_plain)


def test_llama_gqa_transformers_tp(tmp_path: Path) -> None:
    """The same model sharded by transformers' own TP (``distributed_config=DistributedConfig(tp_size=2)``)."""
    _spawn(_llama_transformers, str(tmp_path / "tiny-llama"))


def test_opt_parallelize_module() -> None:
    """Tiny OPT (8 heads: 4 per rank) with MLP routers: attention routed per rank, the sharded MLP dense."""
    _spawn(_opt_plain)


# The graphs torch 2.11's Dynamo records (as_torch_211_graph): on the H200 (torch 2.11) the matcher did not look
# through their DTensor closures, so every TP site stayed dense, GQA pass included (polar 0.5 = polar 1.0 = 5.3x
# slower than dense TP; tp_generate agreed on 58.79% of tokens, dense TP's own agreement with the reference).
def test_llama_gqa_parallelize_module_torch_211_graphs() -> None:
    _spawn(_llama_plain, True)


def test_llama_gqa_transformers_tp_torch_211_graphs(tmp_path: Path) -> None:
    _spawn(_llama_transformers, str(tmp_path / "tiny-llama"), True)


def test_opt_parallelize_module_torch_211_graphs() -> None:
    _spawn(_opt_plain, True)


def _bad_configs(rank: int) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    odd = tiny_model(TinySpec("llama", heads=6, kv_heads=3, head_dim=8, layers=2))
    with pytest.raises(RouterBankError, match="3 KV heads are not divisible by the tensor-parallel size 2"):
        parallelize(odd, _mesh())
    bank = random_routers(odd)
    for layer in odd.model.layers:  # sharded anyway, as a hand-written plan might: KV heads split mid-head
        parallelize_module(layer.self_attn, _mesh(), {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                      "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
    with pytest.raises(RouterBankError, match=rf"tensor-parallel rank {rank} of 2: 3 units .* not divisible by the "
                       r"tensor-parallel size 2; .*\(expected a multiple of 2, got 3\)"):
        polar_compile.attach(odd, bank)

    model = parallelize(tiny_model(TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=3)), _mesh())
    other = random_routers(tiny_model(TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=4)))
    with pytest.raises(RouterBankError, match="num_layers is 4 in the bank, 3 in the model"):
        polar_compile.attach(model, other)
    step = torch.compile(model.forward, backend="polar", fullgraph=True, options={"routers": other, "inductor": False})
    with pytest.raises(Exception, match="the router bank is for a model of 4 layers"):
        _decode(model, step)


def test_bad_configs_fail_on_every_rank() -> None:
    """KV heads not divisible by the TP size, and a bank for another model, raise on both ranks with the layer or
    field, the expected and the actual."""
    _spawn(_bad_configs)


def _unknown_dtensor_form(rank: int) -> None:
    model = parallelize(tiny_model(TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=2)), _mesh())
    polar_compile.attach(model, random_routers(model, first_layer=0), density=0.5)
    records: list = []
    _decode(model, torch.compile(model.forward, backend=_recording(records, torch_211="opaque"), fullgraph=True))
    for pass_name in ("attention", "gqa"):
        sites = [site for record in records[0] if record.name == pass_name for site in record.sites]
        assert [site.layer for site in sites] == [0, 1], sites
        for site in sites:
            assert not site.rewritten
            assert (f"tensor parallel: model.layers.{site.layer}.self_attn takes or makes DTensors through "
                    "'opaque from_local', which the matcher does not look through") in site.reason, site.reason


def test_tp_site_dense_says_why() -> None:
    """A TP graph whose DTensor calls the matcher cannot look through (a form no torch records yet): every site
    stays dense, and its reason (what explain prints) names tensor parallelism and the op."""
    _spawn(_unknown_dtensor_form)


def _bench_sites(rank: int) -> None:
    from polar_compile.bench.step import DecodeStep
    from polar_compile.bench.tp import tp_sites

    model = parallelize(tiny_model(TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=3)), _mesh())
    step = DecodeStep(model, 2, 16, "cpu")
    polar_compile.attach(model, random_routers(model), density=0.5, min_saved_mib=0)
    assert tp_sites(step, model) == {"routed": 2, "sites": 3, "gqa": 1, "dense": {"no router for layer 0": [0]}}


def test_bench_tp_reports_routed_sites() -> None:
    """``bench --tp``'s site report on a sharded model's decode step (each rank: 2 of 3 layers routed, layer 0
    dense and GQA-native)."""
    _spawn(_bench_sites)
