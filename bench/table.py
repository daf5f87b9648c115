"""Turn `python bench/run.py --json` outputs into the README's results table (Markdown).

    python bench/run.py --json > cpu.json
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py --json > cpu-skx.json
    python bench/table.py cpu.json cpu-skx.json
"""
from __future__ import annotations

import json
import sys

HEADER = ("| date | device | BLAS kernel | npdraw processes | model | npdraw ms/step | "
          "npdraw ex/s | PyTorch ms/step | speed-up vs PyTorch | GFLOP/s | fraction of GEMM peak |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _blas_kernel(result: dict) -> str:
    if result["device"].get("kind") == "gpu":
        return f"CuPy {result['device'].get('cupy', '?')}"
    for lib in result.get("blas") or []:
        if lib.get("user_api") == "blas":
            return f"{lib.get('internal_api')} {lib.get('architecture')}"
    return "?"


def rows(result: dict) -> list[str]:
    """One Markdown row per model in one run's JSON."""
    device = result["device"]
    if device.get("kind") == "gpu":
        where = device.get("gpu", "GPU")
    else:
        where = f"{device.get('cpu', 'CPU')}, {device.get('cores', '?')} cores"
    lines = []
    for model, figures in result["models"].items():
        ours, peer = figures["npdraw"], figures.get("torch")
        ratio = figures.get("ratio_npdraw_over_torch")
        lines.append("| " + " | ".join([
            result["date"][:10], where, _blas_kernel(result),
            # results of earlier versions name their worker processes "workers"
            str(result["settings"].get("ranks", result["settings"].get("workers", 1))), model,
            f"{ours['ms_per_step']:.0f}", f"{ours['examples_per_s']:.0f}",
            f"{peer['ms_per_step']:.0f}" if peer else "-",
            f"{ratio:.2f}x" if ratio else "-",
            f"{ours['gflops']:.0f}", f"{100 * ours['peak_fraction']:.0f}%",
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
