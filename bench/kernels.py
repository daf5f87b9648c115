"""npdraw's training step on NumPy's kernels and on the Numba ones, side by side in one run.

The step is bench/run.py's (``NpdrawRunner``: loss_and_grads, the all-reduce under ranks,
clipping and Adam) on the same batch, noise and parameters. The kernels take turns
(NumPy, Numba, then Numba, NumPy, ...), each turn an untimed step then a timed one, with
every rank switching together, so that a slow stretch of a shared machine falls on both;
the report gives each side's median and best step, the ratio of the medians and the
median of the per-turn ratios (each pair ran back to back). Before timing, both kernels
take one step from the same state and must give the same loss to float32 rounding.

    python bench/kernels.py                           # paper model, batch 100, one rank per core
    python bench/kernels.py --rounds 40 --ranks 2 --json

Exit status: 0 done, 1 the two kernels disagreed, 2 bad usage (or numba missing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/kernels.py` puts bench/ first
    sys.path.insert(0, str(_REPO_ROOT))

from bench import run as bench_run  # noqa: E402

KINDS = ("numpy", "numba")
# The two kernels differ in the filters' row sums' order only: float32 rounding, carried
# through T glimpses, moves the loss by far less than this.
LOSS_RTOL = 1e-4


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python bench/kernels.py", description=(
        "npdraw's training step on NumPy's and on Numba's kernels, alternating in one run."))
    p.add_argument("--batch", type=int, default=100, help="examples per step (default 100)")
    p.add_argument("--glimpses", "--T", dest="T", type=int, default=64, help="glimpses T")
    p.add_argument("--model", choices=["attention", "no-attention"], default="attention")
    p.add_argument("--rounds", type=int, default=20, help="timed steps of each kernel")
    p.add_argument("--ranks", type=int, default=0,
                   help="MPI ranks sharing each batch, as in train (0: one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch, noise, parameters")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if min(args.batch, args.T, args.rounds) < 1 or args.ranks < 0:
        p.error("--batch, --glimpses and --rounds must be at least 1, --ranks not negative")
    args.dtype, args.batches = "float32", [args.batch]
    return args


def _runner(args, comm):
    import npdraw
    from npdraw import backend
    backend.retain_freed_memory()                        # as train does
    (_name, cfg, params, x, eps), = bench_run._models(args, npdraw)
    return bench_run.NpdrawRunner(npdraw, cfg, params, x, eps, "cpu", comm)


def compare(runner, rounds: int) -> dict:
    """Every rank runs this in step: the agreement check, then the alternating turns."""
    from npdraw import engine_layers
    start = {name: value.copy() for name, value in runner.params.items()}
    state = runner.state
    losses = {}
    for kind in KINDS:
        runner.params, runner.state = dict(start), state
        engine_layers.set_kernels(kind)
        losses[kind] = runner._step()
    seconds = {kind: [] for kind in KINDS}
    for turn in range(rounds):
        for kind in (KINDS if turn % 2 == 0 else KINDS[::-1]):
            engine_layers.set_kernels(kind)
            runner._step()
            runner.comm.sum([0.0])                       # the ranks start the timed step together
            begin = time.perf_counter()
            runner._step()
            seconds[kind].append(time.perf_counter() - begin)
    engine_layers.set_kernels("numpy")
    ms = {kind: [1e3 * s for s in seconds[kind]] for kind in KINDS}
    rel = abs(losses["numba"] - losses["numpy"]) / max(abs(losses["numpy"]), 1e-300)
    return {"loss": losses, "loss_rel_diff": rel, "agree": rel < LOSS_RTOL, "ms": ms,
            "median_ms": {k: statistics.median(v) for k, v in ms.items()},
            "best_ms": {k: min(v) for k, v in ms.items()},
            "ratio_medians": statistics.median(ms["numpy"]) / statistics.median(ms["numba"]),
            "ratio_paired_median": statistics.median(a / b for a, b in zip(ms["numpy"],
                                                                           ms["numba"]))}


def main(argv=None, launch: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from npdraw import engine_layers
    try:
        engine_layers.set_kernels("numba")
        engine_layers.set_kernels("numpy")
    except ValueError as exc:                            # numba not installed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    comm = bench_run.start_ranks(args.ranks, "cpu", args.batch, __file__, argv, launch)
    if comm is None:
        return 2
    r = compare(_runner(args, comm), args.rounds)
    if not comm.is_root:
        return 0
    r.update({"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": bench_run.device_description("cpu"), "blas": bench_run.blas_info(),
              "settings": {"batch": args.batch, "T": args.T, "model": args.model,
                           "rounds": args.rounds, "ranks": comm.size, "seed": args.seed}})
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"npdraw's step on NumPy's and Numba's kernels, {r['date']}: {args.model}, "
              f"batch {args.batch}, T {args.T}, {comm.describe()}, {args.rounds} turns each")
        for kind in KINDS:
            print(f"  {kind:6s} median {r['median_ms'][kind]:8.1f} ms   best "
                  f"{r['best_ms'][kind]:8.1f} ms   loss {r['loss'][kind]:.6f}")
        print(f"  NumPy / Numba: {r['ratio_medians']:.3f} (medians), "
              f"{r['ratio_paired_median']:.3f} (median of the turns' ratios)")
        if not r["agree"]:
            print(f"  DISAGREE: the losses differ by {r['loss_rel_diff']:.2e} (relative)")
    return 0 if r["agree"] else 1


if __name__ == "__main__":
    sys.exit(main(launch=True))
