"""Empirical NTK of the MLP 64-512-512-512-10: structured vs jacobian vs torch.func recipes.

Usage: python benchmarks/bench_empirical.py [--sizes 64 256 1024] [--json out.json]
(the same suite as ``python -m torch_ntk bench``; each method runs in its own process).
"""
import sys

from torch_ntk.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
