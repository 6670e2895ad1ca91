"""The ``polar-compile`` command: a subcommand per job (``calibrate``, ``eval``, ``plot``, ``bench``, ``export``), each
small.

Add a subcommand by writing ``_add_<name>(subparsers)`` that registers its arguments and sets ``func``.

Errors: a user's mistake (an option value, a model path, a router bank or data that does not fit) is one line on
stderr, ``polar-compile <command>: error: <message>``, and exit status 2. Option values are checked while parsing
(argparse ``type`` functions); a model path or tokenizer that does not load becomes :class:`UsageError` where it is
loaded, and :class:`~polar_compile.routers.RouterBankError`, :class:`~polar_compile.data.DataError`,
:class:`~polar_compile.instrument.InstrumentError` (a model with no attention to route) and
:class:`~polar_compile.export.ExportError`, raised for such inputs only, are reported wherever they arise. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .data import DataError
from .export.errors import ExportError
from .instrument import InstrumentError
from .routers import RouterBankError, check_density

__all__ = ["UsageError", "main"]


class UsageError(Exception):
    """A mistake in the command line or in the files it names: reported as one line, exit status 2."""


# Exceptions that mean "the user's input is wrong", wherever they are raised; nothing else is caught.
USER_ERRORS = (UsageError, RouterBankError, DataError, InstrumentError, ExportError)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) with a pointer to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polar-compile`` console script; returns the exit status (2: a user's mistake)."""
    parser = _Parser(prog="polar-compile", description=plain_text(__doc__.splitlines()[0]))
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_calibrate, _add_eval, _add_plot, _add_bench, _add_export):
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split())  # one line, whatever the message's own line breaks
        print(f"polar-compile {args.command}: error: {message}", file=sys.stderr)
        return 2


def plain_text(docstring: str) -> str:
    """``docstring`` without reStructuredText markup, for ``--help``: ``x`` in double backticks and ``:role:`x```
    become ``x``; ``:role:`~a.b``` becomes ``b``."""
    text = re.sub(r":[\w:.-]+:`(~?)([^`]+)`",
                  lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), docstring)
    return re.sub(r"``([^`]+)``", r"\1", text)


# -- option values, checked while parsing -----------------------------------------------------------------------


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` running ``parse``, whose ``ValueError`` becomes argparse's one-line error as is."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _number(text: str, what: str, kind: type = float) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, what, int)
        if value < low:
            raise ValueError(f"{what} must be at least {low}, got {value}")
        return value

    return _checked(parse)


def _density(text: str) -> float:
    return check_density(_number(text, "density"))


def _densities(text: str) -> list[float]:
    values = [_density(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(f"no densities in {text!r}; expected e.g. 1,0.5")
    return values


def _layers(text: str) -> list[int]:
    layers = [_number(part, "layer", int) for part in text.split(",") if part.strip()]
    if any(layer < 0 for layer in layers):
        raise ValueError(f"layers must be >= 0, got {text!r}")
    return layers


def _share(text: str) -> float:
    value = _number(text, "share")
    if not 0.0 < value < 1.0:
        raise ValueError(f"must be a share strictly between 0 and 1, got {value:g}")
    return value


def _mlp_rank(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    value = _number(text, "MLP router rank", int)
    if value < 0:
        raise ValueError(f"MLP router rank must be 'auto', 0 (no MLP routers) or a positive int, got {value}")
    return value


def _positive(text: str) -> float:
    value = _number(text, "value")
    if not value > 0:
        raise ValueError(f"must be > 0, got {value:g}")
    return value


def _device(text: str) -> Any:
    """A ``torch.device`` that this machine has: a tensor can be made on it."""
    import torch

    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # a malformed name, or no such device here
        raise ValueError(f"device {text!r} is not usable here ({' '.join(str(error).split())})") from None
    return device


def _output_file(text: str) -> Path:
    """A file path whose folder exists, so a long run does not fail at its last step."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text} is a folder; expected a file path")
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist")
    return path


def _output_folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text} exists and is not a folder")
    return path


def _existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"folder {text} does not exist")
    return path


# -- model loading -------------------------------------------------------------------------------------------------


def _load_model(name: str, dtype: str, device: Any, seq_len: int | None = None) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` (SDPA attention, eval mode) and ``AutoTokenizer`` from a folder or hub id.

    Raises :class:`UsageError` for a path that is not a model folder, a model or tokenizer that does not load
    (transformers' ``OSError`` / ``ValueError``) and windows longer than the model's positions.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.is_file():
        raise UsageError(f"--model {name}: a file, not a model folder or hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"--model {name}: not a model folder (it has no config.json)")
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise UsageError(f"--model {name}: no such folder")  # a hub id is NAME or OWNER/NAME
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {name}: cannot load the model: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {name}: cannot load its tokenizer: {error}") from error
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if seq_len is not None and isinstance(positions, int) and seq_len > positions:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's {positions} positions")
    return model.to(device).eval(), tokenizer


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights' dtype (default float32)")
    parser.add_argument("--device", default="cpu", type=_checked(_device), help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seq-len", type=_at_least(1, "--seq-len"), default=512,
                        help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=_at_least(1, "--batch-size"), default=8,
                        help="windows per forward pass (default 8)")


def _add_calibrate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="train per-layer head routers and save a router bank",
        description="Train one router per layer (a Linear on the layer's post-norm hidden state that ranks its heads "
        "or KV groups) on a model's own activations, and save the bank (routers.safetensors + polar_config.json) "
        "to --out. Layer 0 stays dense unless --dense-layers says otherwise.")
    _model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="text file, or Hugging Face dataset name[:config] (needs the datasets package)")
    parser.add_argument("--out", required=True, type=_checked(_output_folder),
                        help="folder for routers.safetensors + polar_config.json (created if missing)")
    parser.add_argument("--density", type=_checked(_density), default=0.5,
                        help="fraction of units kept, in (0, 1] (default 0.5)")
    parser.add_argument("--tokens", type=_at_least(1, "--tokens"), default=400_000,
                        help="max tokens run through the model (default 400000)")
    parser.add_argument("--samples", type=_at_least(1, "--samples"), default=400_000,
                        help="max positions stored per layer (default 400000)")
    parser.add_argument("--heldout", type=_checked(_share), default=0.1,
                        help="share of windows held out, in (0, 1) (default 0.1)")
    parser.add_argument("--dense-layers", type=_checked(_layers), default="0",
                        help="comma-separated layers kept dense (default 0)")
    parser.add_argument("--target-loss-increase", type=_checked(_positive), default=None,
                        help="pick per-layer densities for this mean NLL increase (nats/token) on held-out text")
    parser.add_argument("--cache-dir", type=_checked(_existing_folder), default=None,
                        help="existing folder where collected features are memory-mapped (default: a temporary one)")
    parser.add_argument("--mlp-rank", type=_checked(_mlp_rank), default="auto",
                        help="MLP router rank: N, auto (default: routers for ReLU MLPs, their weights about 3%% of "
                        "the MLP's) or 0 (no MLP routers)")
    parser.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    model, tokenizer = _load_model(args.model, args.dtype, args.device, args.seq_len)
    start = time.perf_counter()
    bank = calibrate(
        model, args.data, tokenizer=tokenizer, density=args.density, tokens=args.tokens, samples=args.samples,
        batch_size=args.batch_size, seq_len=args.seq_len, heldout=args.heldout, dense_layers=args.dense_layers,
        target_loss_increase=args.target_loss_increase, cache_dir=args.cache_dir, mlp_rank=args.mlp_rank,
    )
    bank.provenance["model"] = args.model
    bank.provenance["seconds"] = round(time.perf_counter() - start, 1)
    bank.save(args.out)
    print("| layer | density | held-out recall | train loss |\n|---|---|---|---|")
    for report in bank.provenance["layers"]:
        layer = report["layer"]
        print(f"| {layer} | {bank.densities[layer]:g} | {report['recall']:.3f} | {report['loss']:.4f} |")
    _print_mlp_table(bank)
    print(f"saved {args.out} ({bank.provenance['seconds']} s)")
    return 0


def _print_mlp_table(bank: Any) -> None:
    """The MLP routers' k per layer and batch size (held-out union recall in brackets), or why there are none."""
    mlp = bank.provenance.get("mlp", {})
    if bank.mlp is None:
        print(f"\nno MLP routers: {mlp.get('off', 'none calibrated')}")
        return
    sizes = sorted(bank.mlp.topk)
    print(f"\nMLP routers, rank {bank.mlp.rank}: neurons kept of {bank.mlp.ffn_size} by batch size (held-out union "
          f"recall; target {mlp.get('recall_target')})")
    print("| layer | " + " | ".join(f"B={size}" for size in sizes) + " |\n|---|" + "---|" * len(sizes))
    for report in mlp.get("layers", []):
        cells = [f"{'dense' if report['topk'].get(str(b)) is None else report['topk'][str(b)]} "
                 f"({report['recall'].get(str(b), float('nan')):.3f})" for b in sizes]
        print(f"| {report['layer']} | " + " | ".join(cells) + " |")


def _add_eval(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity vs density: dense, oracle top-k, learned routers",
        description="Perplexity of --data at each density for dense, the oracle top-k and (with --routers) the "
        "learned routers, with the backend's sparse semantics applied to whole sequences, plus how often greedy "
        "continuations agree with dense. A bank with MLP routers adds MLP sparsity (per token, the batch-size-1 "
        "row of its k table; alone and with the attention routers) and the MLP union recall by batch size.")
    _model_arguments(parser)
    parser.add_argument("--routers", default=None, help="router bank folder (omit for dense + oracle only)")
    parser.add_argument("--data", required=True,
                        help="text file, or Hugging Face dataset name[:config] (needs the datasets package)")
    parser.add_argument("--densities", type=_checked(_densities), default="1,0.75,0.5,0.25",
                        help="comma-separated densities, each in (0, 1] (default 1,0.75,0.5,0.25)")
    parser.add_argument("--tokens", type=_at_least(1, "--tokens"), default=None,
                        help="max tokens evaluated (default: all)")
    parser.add_argument("--prompts", type=_at_least(0, "--prompts"), default=8,
                        help="greedy-generation prompts (0: skip; default 8)")
    parser.add_argument("--new-tokens", type=_at_least(1, "--new-tokens"), default=32,
                        help="tokens generated per prompt (default 32)")
    parser.add_argument("--plot", type=_checked(_output_file), default=None,
                        help="write a PNG of perplexity vs density here")
    parser.add_argument("--json", type=_checked(_output_file), default=None, help="write the numbers as JSON here")
    parser.add_argument("--tp", type=_at_least(1, "--tp"), default=1,
                        help="also rows 'oracle tp=N' and 'routers tp=N': N tensor-parallel ranks, each keeping its "
                        "own top-k of its 1/N of the units, simulated on one device (default 1: none)")
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from .data import as_windows
    from .evaluate import evaluate, format_report, plot_report
    from .routers import ModelShape, RouterBank

    bank = RouterBank.load(args.routers) if args.routers else None  # before the model: a bad path fails at once
    model, tokenizer = _load_model(args.model, args.dtype, args.device, args.seq_len)
    if bank is not None:
        bank.check_model(model)
    units = ModelShape.of(model).num_kv_heads
    if units % args.tp:
        raise UsageError(f"--tp {args.tp}: the model's {units} units per layer (KV groups, or heads for MHA) are not "
                         f"divisible by it")
    windows = as_windows(args.data, tokenizer, args.seq_len, max_tokens=args.tokens)
    report = evaluate(model, windows, args.densities, bank, batch_size=args.batch_size, prompts=args.prompts,
                      new_tokens=args.new_tokens, tp=args.tp)
    print(format_report(report))
    if args.plot:
        print(f"plot: {plot_report({args.model: report}, args.plot)}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, **report.to_json()}, indent=2) + "\n")
    return 0


def _add_plot(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plot", help="one PNG of perplexity vs density from several eval --json files",
        description="One PNG of perplexity vs density, a panel per report written by polar-compile eval --json.")
    parser.add_argument("reports", nargs="+", help="JSON files written by polar-compile eval --json")
    parser.add_argument("--out", required=True, type=_checked(_output_file), help="PNG path")
    parser.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from .evaluate import plot_report

    reports = dict(_read_report(path) for path in args.reports)
    print(f"plot: {plot_report(reports, args.out)}")
    return 0


def _read_report(path: str) -> tuple[str, Any]:
    """(model name, EvalReport) of a file written by ``eval --json``; :class:`UsageError` for any other file."""
    from .evaluate import EvalReport

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"report {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"report {path} is not a readable JSON file ({error})") from None
    try:
        return Path(data["model"]).name, EvalReport.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UsageError(f"report {path} was not written by polar-compile eval --json "
                         f"({type(error).__name__}: {error})") from None


def _add_bench(subparsers: Any) -> None:
    from . import bench

    parser = subparsers.add_parser(
        "bench", help="decode-throughput benchmark on a CUDA GPU: eager, dense Inductor, polar attention and MLP",
        description=plain_text(bench.__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama2-7b,llama3-8b,opt-6.7b", type=_checked(bench.parse_models),
                        help=f"comma-separated model shapes, of: {', '.join(bench.SHAPES)} (default %(default)s)")
    parser.add_argument("--batch", default="1,16,64,128",
                        type=_checked(lambda text: bench.parse_sizes(text, "batch")),
                        help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--context", default="1024,4096,8192",
                        type=_checked(lambda text: bench.parse_sizes(text, "context")),
                        help="comma-separated context (cache) lengths (default %(default)s)")
    parser.add_argument("--layers", type=_checked(lambda text: bench.parse_positive(text, "layers")),
                        default=None, help="at most this many decoder layers per model (default: all of them); "
                        "fewer where the weights and cache would not fit in GPU memory")
    parser.add_argument("--repeats", type=_checked(lambda text: bench.parse_positive(text, "repeats")),
                        default=30, help="timed steps per variant, after 3 warm-up steps (default 30)")
    parser.add_argument("--cases", type=_checked(bench.parse_cases),
                        help="MODEL:BATCH:CONTEXT,... instead of the models x batch x context grid")
    parser.add_argument("--variants", type=_checked(bench.parse_variants), default=None,
                        help=f"comma-separated variants to run, of: {', '.join(bench.VARIANTS + bench.MLP_VARIANTS)}; "
                        f"must include {bench.BASELINE}, the baseline (default: all of each shape's; the MLP ones "
                        "only for shapes with ReLU MLPs)")
    parser.add_argument("--attn-density", type=_checked(lambda text: bench.parse_density(text, "attn-density")),
                        default=None, help="attention density of polar-attn and polar-both (default per shape: "
                        + ", ".join(f"{name} {bench.attention_density(name):g}" for name in bench.MLP_UNION_DENSITIES)
                        + ")")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="directory for decode.json, decode.md, decode.png (default out)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="measure nothing: merge these decode.json files of earlier runs into one table and plot")
    parser.add_argument("--tp", type=_at_least(1, "--tp"), default=1,
                        help="tensor-parallel size: under torchrun --nproc-per-node N, time dense TP Inductor, polar 1.0 "
                        "and polar 0.5 on N GPUs (writes decode-tp.json/.md; see polar_compile/bench/tp.py)")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.report:
        try:
            rows = bench.merge_results(args.report)
        except (OSError, ValueError) as error:
            print(f"polar-compile bench: error: {error}", file=sys.stderr)
            return 2
        bench.report(rows, args.out)
        return 0
    cases = args.cases or bench.grid(args.models, args.batch, args.context)
    try:
        bench.require_cuda()
    except bench.CudaUnavailableError as error:
        print(f"polar-compile bench: error: {error}", file=sys.stderr)
        return 2
    if args.tp > 1:
        from .bench.tp import run_tp_benchmark

        run_tp_benchmark(cases, args.tp, repeats=args.repeats, out=args.out, max_layers=args.layers)
        return 0
    bench.run_benchmark(cases, repeats=args.repeats, out=args.out, max_layers=args.layers, variants=args.variants,
                        attn_density=args.attn_density)
    return 0


def _add_export(subparsers: Any) -> None:
    from .export import FORMATS

    parser = subparsers.add_parser(
        "export", help="export the polar decode step and a dense prefill for deployment (pt2, aoti, onnx, tensorrt)",
        description="Export the model's decode step, rewritten by the polar passes with --routers, and its dense "
        "prefill, at a static batch size and cache length, into the folder --out (polar_export.json + the two "
        "programs). pt2 and aoti run with polar_compile.export.load; onnx with onnxruntime; tensorrt is untested.")
    parser.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    parser.add_argument("--routers", default=None, help="router bank folder (from polar-compile calibrate)")
    parser.add_argument("--format", default="pt2", choices=FORMATS, help="artifact format (default pt2)")
    parser.add_argument("--out", required=True, type=_checked(_output_folder),
                        help="folder for the artifact (created if missing)")
    parser.add_argument("--batch-size", required=True, type=_at_least(1, "--batch-size"),
                        help="sequences per step (static)")
    parser.add_argument("--max-cache-len", required=True, type=_at_least(2, "--max-cache-len"),
                        help="KV cache length in tokens (static)")
    parser.add_argument("--prefill-len", type=_at_least(1, "--prefill-len"), default=None,
                        help="prompt length of the prefill program (default: half the cache)")
    parser.add_argument("--density", type=_checked(_density), default=None,
                        help="fraction of units kept, in (0, 1] (default: the bank's per-layer densities)")
    parser.add_argument("--no-mlp", action="store_true", help="keep every MLP dense")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights' dtype (default float32)")
    parser.add_argument("--device", default="cpu", type=_checked(_device),
                        help="torch device the programs run on, e.g. cpu or cuda")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from .export import export
    from .export.artifact import MANIFEST
    from .routers import RouterBank

    bank = RouterBank.load(args.routers) if args.routers else None  # before the model: a bad path fails at once
    model, _ = _load_model(args.model, args.dtype, args.device)
    start = time.perf_counter()
    out = export(model, routers=bank, batch_size=args.batch_size, max_cache_len=args.max_cache_len,
                 prefill_len=args.prefill_len, format=args.format, path=args.out, density=args.density,
                 mlp=not args.no_mlp)
    manifest = json.loads((out / MANIFEST).read_text())
    print("\n".join(manifest["sites"]))
    print(f"exported {args.format} to {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
