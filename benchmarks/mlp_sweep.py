"""Launch-configuration sweep of the sparse-MLP gather-GEMMs on one GPU: for each case, the heuristic's
configuration and a grid around it, each timed as ``benchmarks/mlp.py`` times (CUDA-graph replay over rotating fresh
inputs, medians), to tune ``gather_up_config`` / ``gather_down_config``.

    python benchmarks/mlp_sweep.py [--models opt-6.7b,opt-66b] [--batches 1,16] [--density 0.1] [--out sweep.md]
                                   [--ops up,gated-up,down,down-partials] [--grid small-batch|large-batch|few-rows] [--all]

``--grid large-batch`` also sweeps the rows per program and the warps, which the small-batch grid keeps at the
heuristic's (a decode batch of up to 32 rows is one row block of 16 or 32 rows there). ``--grid few-rows`` runs
row blocks of one row (B=1), which multiply-add in fp32 instead of padding a ``tl.dot`` tile to 16 rows.
"""

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import mlp

from polar_compile.kernels.gather_gemm import (
    GatherConfig,
    gather_down_config,
    gather_down_partials_triton,
    gather_down_triton,
    gather_up_config,
    gather_up_triton,
    split_length,
)

# per op: block_c, block_r, splits, num_stages (sweeps 01-02 found num_warps flat; sweep 03 swept num_stages; sweep 04
# adds one split (no finish launch) with narrower tiles)
SMALL_BATCH_GRID = {
    "up": {"block_c": (16, 32), "block_r": (128, 256), "splits": (1, 2, 4, 8), "num_stages": (3, 4, 5)},
    "down": {"block_c": (32, 64, 128), "block_r": (64, 128), "splits": (1, 2, 4), "num_stages": (3, 4, 5)},
    "down-partials": {"block_c": (32, 64, 128), "block_r": (64, 128, 256), "splits": (1, 2, 4, 8), "num_stages": (2, 3)},
}
_LARGE = {"block_n": (32, 64), "block_c": (32, 64), "block_r": (64, 128), "splits": (1, 2, 4, 8), "num_warps": (4, 8)}
LARGE_BATCH_GRID = {"up": _LARGE, "down": _LARGE, "down-partials": _LARGE}
# row blocks of fewer than 16 rows multiply-add in fp32 instead of padding a tl.dot tile to 16 (run 33: gather_up
# at B=1 1.08-1.26x, gather_down no gain); block_n is the batch's next power of two
_FEW_UP = {"block_c": (1, 2, 4, 8), "block_r": (256, 512, 1024, 2048), "splits": (1,), "num_warps": (4, 8)}
FEW_ROWS_GRID = {"up": _FEW_UP, "gated-up": _FEW_UP,
                 "down-partials": {"block_c": (64, 128), "block_r": (64, 128), "splits": (4, 8), "num_warps": (4,)}}
GRIDS = {"small-batch": SMALL_BATCH_GRID, "large-batch": LARGE_BATCH_GRID, "few-rows": FEW_ROWS_GRID}


def candidates(op: str, heuristic: GatherConfig, grid: dict, batch: int) -> list[GatherConfig]:
    """The heuristic's configuration first, then the op's grid (the heuristic's values where it has none; for the
    few-rows grid, row blocks of the batch's next power of two)."""
    fixed = {"block_n": triton.next_power_of_2(batch)} if grid is FEW_ROWS_GRID else {}
    grid = [heuristic._replace(**fixed, **dict(zip(grid.get(op, {}), values, strict=True)))
            for values in itertools.product(*grid.get(op, {}).values())]
    return [heuristic, *[config for config in grid if config != heuristic]]


def timed(call, config: GatherConfig, sets: list) -> float:
    """Microseconds per call with ``config``; infinity when the configuration does not launch (shared memory)."""
    try:
        return mlp.time_us(lambda s: call(s, config), sets)
    except Exception as error:  # a configuration the GPU cannot run: recorded, not fatal
        print(f"  {tuple(config)}: {type(error).__name__}", flush=True)
        return float("inf")


def sweep(model: str, batch: int, density: float, op_names: list[str], grid: dict, log, every=None) -> None:
    """Times each op's candidates for one case; ``log`` gets the table row, ``every`` (if given) all times."""
    d, ffn = mlp.MODELS[model]
    k = round(density * ffn)
    sets = mlp.make_sets(d, ffn, torch.bfloat16, min(16, max(2, mlp.ROTATE_BYTES // (2 * k * d * 2))))
    for s in sets:
        s["x"] = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
        s["idx"] = torch.randperm(ffn, device="cuda")[:k].sort().values
        s["h"] = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
    ops = {
        "up": (gather_up_config(batch, d, k, False, torch.bfloat16, sets[0]["x"].device),
               lambda s, c: gather_up_triton(s["x"], s["w1"], s["b1"], s["idx"], config=c)),
        # gate and up rows from two weights of one shape (w2t is [ffn, d] too)
        "gated-up": (gather_up_config(batch, d, k, True, torch.bfloat16, sets[0]["x"].device),
                     lambda s, c: gather_up_triton(s["x"], s["w1"], s["b1"], s["idx"], s["w2t"], s["b1"], config=c)),
        "down": (gather_down_config(batch, k, d, torch.bfloat16, sets[0]["x"].device),
                 lambda s, c: gather_down_triton(s["h"], s["w2t"], s["b2"], s["idx"], config=c)),
        # the backend's form (passes/finish.py): the partials alone, their sum fused into the residual add
        "down-partials": (gather_down_config(batch, k, d, torch.bfloat16, sets[0]["x"].device),
                          lambda s, c: gather_down_partials_triton(s["h"], s["w2t"], s["idx"],
                                                                   split_length(k, c)[1], config=c)),
    }
    for name, (heuristic, call) in ops.items():
        if name not in op_names:
            continue
        times = [(timed(call, config, sets), config) for config in candidates(name, heuristic, grid, batch)]
        if every:
            every(f"{model} B={batch} density {density:g} {name}: " + ", ".join(
                f"{us:.1f} {tuple(config)}" for us, config in sorted(times)))
        best_us, best = min(times, key=lambda item: item[0])
        one = min((item for item in times if item[1].splits == 1), key=lambda item: item[0], default=None)
        one_text = "-" if one is None else f"{one[0]:.1f} {tuple(one[1])}"
        log(f"| {model} | {batch} | {density:g} | {name} | {times[0][0]:.1f} | {best_us:.1f} | "
            f"{times[0][0] / best_us:.2f}x | {tuple(best)} | {one_text} | {tuple(heuristic)} |")
    del sets
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="opt-6.7b,opt-66b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ops", default="up,down,down-partials")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small-batch")
    parser.add_argument("--all", action="store_true", help="also print every configuration's time, fastest first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mlp_sweep.py needs a CUDA GPU")
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; config = (block_n, block_c, block_r, "
        "splits, num_warps, num_stages)")
    log("| model | B | density | op | heuristic µs | best µs | gain | best config | best with one split (µs, config) "
        "| heuristic config |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for model, batch in itertools.product(args.models.split(","), map(int, args.batches.split(","))):
        sweep(model, batch, args.density, args.ops.split(","), GRIDS[args.grid], log,
              every=(lambda line: print(line, flush=True)) if args.all else None)
    if args.out:
        with open(args.out, "w") as file:
            file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
