"""The GEMMs of one DRAW training step, alone, at each batch a rank may hold: how fast
OpenBLAS runs the model's own shapes, and so how short a step could be were all the
rest free.

A step's GEMMs are, per glimpse, the forward's gate, posterior and decoder-head products
and the backward's input gradients, each with the rank's batch n as one dimension (small:
50 on two ranks at batch 100), and, once per step, the weight gradients over all T*n
columns (large). They are run here back to back on noise, on one BLAS thread as each MPI
rank runs them, and set against one core's peak (a 2048^3 float32 matmul).

    python bench/gemm_shapes.py                       # paper model, n = 25, 50, 64, 100
    python bench/gemm_shapes.py --per-rank 50 --per-rank 64 --json

Exit status: 0 done, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/gemm_shapes.py` puts bench/ first
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402

from bench import run as bench_run  # noqa: E402


def step_gemms(cfg, n: int) -> dict:
    """{"glimpse": [(m, k, n) ...], "weights": [...]}: C (m, n) = A (m, k) @ B (k, n) of
    the engine's GEMMs (npdraw/engine.py), per glimpse and once per step, for n examples.
    The read width R is cfg.read_dim (attention) or its varying half x_hat (without)."""
    He, Hd, Z, T = cfg.enc_dim, cfg.dec_dim, cfg.z_dim, cfg.T
    R = cfg.read_dim if cfg.attention else cfg.D
    heads = cfg.write_dim + (10 if cfg.attention else 0)
    glimpse = [(4 * He, Hd + R + He + 1, n), (2 * Z, He + 1, n), (4 * Hd, 1 + Z + Hd, n),
               (n, Hd, heads),                                          # the forward
               (Hd, heads, n), (Z + Hd, 4 * Hd, n), (He, 2 * Z, n), (Hd + R + He, 4 * He, n)]
    weights = [(Hd + R + He + 1, T * n, 4 * He), (1 + Z + Hd, T * n, 4 * Hd),
               (He + 1, T * n, 2 * Z), (Hd, T * n, heads)]
    return {"glimpse": glimpse, "weights": weights}


def _best_seconds(shapes, reps: int, rng) -> float:
    """Best over reps of running every (m, k, n) product once, on float32 noise."""
    calls = [(rng.standard_normal((m, k), dtype=np.float32),
              rng.standard_normal((k, n), dtype=np.float32),
              np.empty((m, n), np.float32)) for m, k, n in shapes]

    def run():
        for a, b, out in calls:
            np.matmul(a, b, out=out)
    return min(bench_run.gemm_times(run, reps))


def measure(cfg, per_rank: list, reps: int, peak_core: float, seed: int = 0) -> list:
    """One row per batch n: the per-glimpse and the weight-gradient GEMMs' rates, and the
    step's GEMM time (T glimpses plus the weight gradients) at one core's peak share."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in per_rank:
        shapes = step_gemms(cfg, n)
        flops = {part: sum(2 * m * k * q for m, k, q in s) for part, s in shapes.items()}
        secs = {part: _best_seconds(s, reps, rng) for part, s in shapes.items()}
        step_s = cfg.T * secs["glimpse"] + secs["weights"]
        step_flop = cfg.T * flops["glimpse"] + flops["weights"]
        rows.append({"per_rank": n,
                     "glimpse_gflops": flops["glimpse"] / secs["glimpse"] / 1e9,
                     "weights_gflops": flops["weights"] / secs["weights"] / 1e9,
                     "step_gemm_ms": 1e3 * step_s, "step_gemm_gflop": step_flop / 1e9,
                     "core_peak_fraction": step_flop / step_s / 1e9 / peak_core})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gemm_shapes.py", description=(
        "The GEMMs of one DRAW step, alone, at each per-rank batch, on one BLAS thread."))
    p.add_argument("--per-rank", type=int, action="append",
                   help="examples a rank holds (repeatable; default 25, 50, 64, 100)")
    p.add_argument("--attention", choices=["yes", "no"], default="yes",
                   help="the paper's model with or without attention (default: yes)")
    p.add_argument("--reps", type=int, default=20, help="timed runs of each set (best kept)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    per_rank = args.per_rank or [25, 50, 64, 100]
    if min(per_rank + [args.reps]) < 1:
        p.error("--per-rank and --reps must be at least 1")
    import npdraw
    cfg = npdraw.DrawConfig(attention=args.attention == "yes")
    restore = bench_run.set_threads(1, torch_too=False)     # as each MPI rank runs
    try:
        peak = bench_run.blas_peak(2048, 5)["single_core_best_gflops"]
        rows = measure(cfg, per_rank, args.reps, peak)
    finally:
        restore()
    if args.json:
        print(json.dumps({"blas": bench_run.blas_info(), "core_peak_gflops": peak,
                          "attention": cfg.attention, "rows": rows}, indent=2))
        return 0
    print(f"one core's GEMM peak {peak:.1f} GFLOP/s (2048^3 float32); "
          f"{'attention' if cfg.attention else 'no attention'}, T {cfg.T}")
    print(f"{'per rank':>8s} {'glimpse GFLOP/s':>16s} {'weights GFLOP/s':>16s} "
          f"{'step GEMMs ms':>14s} {'of peak':>8s}")
    for r in rows:
        print(f"{r['per_rank']:8d} {r['glimpse_gflops']:16.1f} {r['weights_gflops']:16.1f} "
              f"{r['step_gemm_ms']:14.1f} {100 * r['core_peak_fraction']:7.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
