"""The ``polar-compile`` command: a subcommand per job (``calibrate``, ``eval``, ``plot``, ``bench``), each small.

Add a subcommand by writing ``_add_<name>(subparsers)`` that registers its arguments and sets ``func``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polar-compile`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="polar-compile", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_calibrate, _add_eval, _add_plot, _add_bench):
        add(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def _load_model(name: str, dtype: str, device: str) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` (SDPA attention, eval mode) and ``AutoTokenizer`` from a folder or hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")


def _add_calibrate(subparsers: Any) -> None:
    parser = subparsers.add_parser("calibrate", help="train per-layer head routers and save a router bank")
    _model_arguments(parser)
    parser.add_argument("--data", required=True, help="text file, or HF dataset name[:config] (needs `datasets`)")
    parser.add_argument("--out", required=True, help="directory for routers.safetensors + polar_config.json")
    parser.add_argument("--density", type=float, default=0.5, help="fraction of units kept (default 0.5)")
    parser.add_argument("--tokens", type=int, default=400_000, help="max tokens run through the model")
    parser.add_argument("--samples", type=int, default=400_000, help="max positions stored per layer")
    parser.add_argument("--heldout", type=float, default=0.1, help="share of windows held out")
    parser.add_argument("--dense-layers", default="0", help="comma-separated layers kept dense (default 0)")
    parser.add_argument("--target-loss-increase", type=float, default=None,
                        help="pick per-layer densities for this mean NLL increase (nats/token) on held-out text")
    parser.add_argument("--cache-dir", default=None, help="where collected features are memory-mapped")
    parser.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    model, tokenizer = _load_model(args.model, args.dtype, args.device)
    start = time.perf_counter()
    bank = calibrate(
        model, args.data, tokenizer=tokenizer, density=args.density, tokens=args.tokens, samples=args.samples,
        batch_size=args.batch_size, seq_len=args.seq_len, heldout=args.heldout,
        dense_layers=[int(x) for x in args.dense_layers.split(",") if x.strip()],
        target_loss_increase=args.target_loss_increase, cache_dir=args.cache_dir,
    )
    bank.provenance["model"] = args.model
    bank.provenance["seconds"] = round(time.perf_counter() - start, 1)
    bank.save(args.out)
    print("| layer | density | held-out recall | train loss |\n|---|---|---|---|")
    for report in bank.provenance["layers"]:
        layer = report["layer"]
        print(f"| {layer} | {bank.densities[layer]:g} | {report['recall']:.3f} | {report['loss']:.4f} |")
    print(f"saved {args.out} ({bank.provenance['seconds']} s)")
    return 0


def _add_eval(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="perplexity vs density: dense, oracle top-k, learned routers")
    _model_arguments(parser)
    parser.add_argument("--routers", default=None, help="router bank directory (omit for dense + oracle only)")
    parser.add_argument("--data", required=True, help="text file, or HF dataset name[:config]")
    parser.add_argument("--densities", default="1,0.75,0.5,0.25", help="comma-separated densities")
    parser.add_argument("--tokens", type=int, default=None, help="max tokens evaluated (default: all)")
    parser.add_argument("--prompts", type=int, default=8, help="greedy-generation prompts (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--plot", default=None, help="write a PNG of perplexity vs density here")
    parser.add_argument("--json", default=None, help="write the numbers as JSON here")
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from .data import as_windows
    from .evaluate import evaluate, format_report, plot_report
    from .routers import RouterBank

    model, tokenizer = _load_model(args.model, args.dtype, args.device)
    bank = RouterBank.load(args.routers) if args.routers else None
    windows = as_windows(args.data, tokenizer, args.seq_len, max_tokens=args.tokens)
    densities = [float(d) for d in args.densities.split(",")]
    report = evaluate(model, windows, densities, bank, batch_size=args.batch_size, prompts=args.prompts,
                      new_tokens=args.new_tokens)
    print(format_report(report))
    if args.plot:
        print(f"plot: {plot_report({args.model: report}, args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **report.to_json()}, indent=2) + "\n")
    return 0


def _add_plot(subparsers: Any) -> None:
    parser = subparsers.add_parser("plot", help="one PNG of perplexity vs density from several `eval --json` files")
    parser.add_argument("reports", nargs="+", help="JSON files written by `polar-compile eval --json`")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from .evaluate import EvalReport, plot_report

    reports = {}
    for path in args.reports:
        data = json.loads(Path(path).read_text())
        reports[Path(data["model"]).name] = EvalReport.from_json(data)
    print(f"plot: {plot_report(reports, args.out)}")
    return 0


def _bench_option(parse: Any) -> Any:
    """An argparse ``type`` that runs a ``polar_compile.bench`` parser and reports its ``ValueError`` as is."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _add_bench(subparsers: Any) -> None:
    from . import bench

    parser = subparsers.add_parser(
        "bench", help="decode-throughput benchmark on a CUDA GPU: eager, dense Inductor, polar 1.0 and 0.5",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama2-7b,llama3-8b,opt-6.7b", type=_bench_option(bench.parse_models),
                        help=f"comma-separated model shapes, of: {', '.join(bench.SHAPES)} (default %(default)s)")
    parser.add_argument("--batch", default="1,16,64,128",
                        type=_bench_option(lambda text: bench.parse_sizes(text, "batch")),
                        help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--context", default="1024,4096,8192",
                        type=_bench_option(lambda text: bench.parse_sizes(text, "context")),
                        help="comma-separated context (cache) lengths (default %(default)s)")
    parser.add_argument("--layers", type=_bench_option(lambda text: bench.parse_positive(text, "layers")),
                        default=None, help="at most this many decoder layers per model (default: all of them); "
                        "fewer where the weights and cache would not fit in GPU memory")
    parser.add_argument("--repeats", type=_bench_option(lambda text: bench.parse_positive(text, "repeats")),
                        default=30, help="timed steps per variant, after 3 warm-up steps (default 30)")
    parser.add_argument("--cases", type=_bench_option(bench.parse_cases),
                        help="MODEL:BATCH:CONTEXT,... instead of the models x batch x context grid")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="directory for decode.json, decode.md, decode.png (default out)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="measure nothing: merge these decode.json files of earlier runs into one table and plot")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.report:
        try:
            rows = bench.merge_results(args.report)
        except (OSError, ValueError) as error:
            print(f"polar-compile bench: error: {error}", file=sys.stderr)
            return 1
        bench.report(rows, args.out)
        return 0
    cases = args.cases or bench.grid(args.models, args.batch, args.context)
    try:
        bench.require_cuda()
    except bench.CudaUnavailableError as error:
        print(f"polar-compile bench: error: {error}", file=sys.stderr)
        return 1
    bench.run_benchmark(cases, repeats=args.repeats, out=args.out, max_layers=args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
