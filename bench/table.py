"""Turn `python bench/run.py --json` outputs into the README's results table (Markdown).

    python bench/run.py --json > cpu.json
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py --json > cpu-skx.json
    python bench/run.py --peers eager,compiled --batches 100,500 --json > sweep.json
    python bench/table.py cpu.json cpu-skx.json sweep.json

One row per model and run, at the run's first batch size (its ``models``):

* "npdraw processes": its MPI ranks, with ", Numba kernels" when the run had
  NPDRAW_KERNELS=numba (``settings["kernels"]``);

* "PyTorch eager ms/step", "speed-up vs eager": the eager peer's median step and
  npdraw's examples/s over its (``ratio_npdraw_over_torch``);
* "torch.compile ms/step", "speed-up vs torch.compile": the same for the peer under
  torch.compile (``--peers ...,compiled``; ``torch_compiled``,
  ``ratio_npdraw_over_torch_compiled``);
* "best batch ex/s (batch): npdraw / eager / compiled": with ``--batches``, each side's
  best examples/s over the batch sizes and the batch where it was reached
  (``best_batch``), e.g. "346 (500) / 242 (500) / 313 (500)"; a side not timed is "-";
* "speed-up at best batches: vs eager / vs compiled": npdraw's best examples/s over
  each peer's best, each side at its own best batch.

A column the run has no figure for (no peer, a peer that disagreed, one batch size,
a JSON from before the column) is "-".
"""
from __future__ import annotations

import json
import sys

HEADER = ("| date | device | BLAS kernel | npdraw processes | model | npdraw ms/step | "
          "npdraw ex/s | PyTorch eager ms/step | speed-up vs eager | torch.compile ms/step | "
          "speed-up vs torch.compile | GFLOP/s | fraction of GEMM peak | "
          "best batch ex/s (batch): npdraw / eager / compiled | "
          "speed-up at best batches: vs eager / vs compiled |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

SIDES = ("npdraw", "torch", "torch_compiled")     # npdraw, eager, compiled: the JSON's keys


def _blas_kernel(result: dict) -> str:
    if result["device"].get("kind") == "gpu":
        return f"CuPy {result['device'].get('cupy', '?')}"
    for lib in result.get("blas") or []:
        if lib.get("user_api") == "blas":
            return f"{lib.get('internal_api')} {lib.get('architecture')}"
    return "?"


def _ms(figures) -> str:
    return f"{figures['ms_per_step']:.0f}" if figures else "-"


def _ratio(ratio) -> str:
    return f"{ratio:.2f}x" if ratio else "-"


def _best(best) -> tuple:
    """The two best-batch cells of one model ("-" each without ``best_batch``)."""
    if not best:
        return "-", "-"
    sides = " / ".join(f"{best[side]['examples_per_s']:.0f} ({best[side]['batch']})"
                       if side in best else "-" for side in SIDES)
    ratios = " / ".join(_ratio(best.get(f"ratio_npdraw_over_{side}")) for side in SIDES[1:])
    return sides, ratios


def _processes(settings: dict) -> str:
    """npdraw's processes, and its kernels when they were Numba's (NPDRAW_KERNELS=numba);
    results of earlier versions name their worker processes "workers"."""
    count = str(settings.get("ranks", settings.get("workers", 1)))
    return count + (", Numba kernels" if settings.get("kernels") == "numba" else "")


def rows(result: dict) -> list[str]:
    """One Markdown row per model in one run's JSON."""
    device = result["device"]
    if device.get("kind") == "gpu":
        where = device.get("gpu", "GPU")
    else:
        where = f"{device.get('cpu', 'CPU')}, {device.get('cores', '?')} cores"
    lines = []
    for model, figures in result["models"].items():
        ours = figures["npdraw"]
        best_sides, best_ratios = _best((result.get("best_batch") or {}).get(model))
        lines.append("| " + " | ".join([
            result["date"][:10], where, _blas_kernel(result),
            _processes(result["settings"]), model,
            f"{ours['ms_per_step']:.0f}", f"{ours['examples_per_s']:.0f}",
            _ms(figures.get("torch")), _ratio(figures.get("ratio_npdraw_over_torch")),
            _ms(figures.get("torch_compiled")),
            _ratio(figures.get("ratio_npdraw_over_torch_compiled")),
            f"{ours['gflops']:.0f}", f"{100 * ours['peak_fraction']:.0f}%",
            best_sides, best_ratios,
        ]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(HEADER)
    for path in paths:
        with open(path) as handle:
            for line in rows(json.load(handle)):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
