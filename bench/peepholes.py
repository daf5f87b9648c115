"""The cost of peephole LSTMs: one training step (loss, gradients, Adam) of the paper's
model with and without them, alternating in one process, so that both see the same
machine load. Prints each side's median seconds and the median of the pair ratios.

    python bench/peepholes.py                 # T=64, read 2, write 5, 256/256/100, batch 100
    python bench/peepholes.py --T 8 --pairs 3 # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/peepholes.py` puts bench/ first, not the root
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402

import npdraw  # noqa: E402
from npdraw import backend, optim  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=7, help="timed steps of each, alternating")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args(argv)
    backend.retain_freed_memory()                    # as train runs
    plain = npdraw.DrawConfig(T=args.T)
    peep = dataclasses.replace(plain, peepholes=True)
    rng = np.random.default_rng(0)
    x = (rng.random((args.batch, plain.D)) < 0.2).astype(args.dtype)
    eps = rng.standard_normal((args.T, args.batch, plain.z_dim)).astype(args.dtype)
    sides = {}
    for name, cfg in (("plain", plain), ("peepholes", peep)):
        params = npdraw.init_params(cfg, 0, dtype=args.dtype)
        sides[name] = [cfg, params, optim.adam_init(params), []]

    def step(side):
        cfg, params, state, times = side
        start = time.perf_counter()
        _, grads, _ = npdraw.loss_and_grads(params, cfg, x, eps)
        side[1], side[2], _ = optim.adam_step(params, grads, state, 1e-3)
        times.append(time.perf_counter() - start)

    for _ in range(args.warmup):
        for side in sides.values():
            step(side)
            side[3].clear()
    for _ in range(args.pairs):                      # plain, peepholes, plain, ...
        for side in sides.values():
            step(side)
    a, b = sides["plain"][3], sides["peepholes"][3]
    ratios = [q / p for p, q in zip(a, b)]
    print(f"T={args.T} batch {args.batch} {args.dtype}, {args.pairs} pairs")
    print(f"plain      median {statistics.median(a):.3f} s  (min {min(a):.3f}, max {max(a):.3f})")
    print(f"peepholes  median {statistics.median(b):.3f} s  (min {min(b):.3f}, max {max(b):.3f})")
    print(f"peepholes / plain, pair by pair: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
