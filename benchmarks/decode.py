"""Steady-state batched decode, side by side in one process: eager HF, dense Inductor, dense Inductor with
GQA-native SDPA, and polar at densities 1.0 and 0.5 (all ``mode="reduce-overhead"``, CUDA graphs).

    python benchmarks/decode.py --models llama2-7b,llama3-8b,opt-6.7b --batch 1,16,64,128 \
        --context 1024,4096,8192 --out out/

A thin wrapper kept so the commands in RESULTS.md stay valid: it runs ``polar-compile bench`` with the same
arguments (same options, same defaults); the harness lives in ``polar_compile/bench/``.
"""

from __future__ import annotations

import sys

from polar_compile.bench import SHAPES, DecodeStep
from polar_compile.cli import main

__all__ = ["SHAPES", "DecodeStep"]  # still importable from here

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
