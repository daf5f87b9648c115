#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with CuPy and a CUDA GPU:
# NumPy-versus-CuPy agreement first, then the benchmark at batch 100 (with the
# PyTorch CUDA peer when torch has CUDA) and at larger batches (npdraw alone),
# then the README's table rows. Results go to $OUT (default: bench-gpu/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-gpu}"
mkdir -p "$out"
python -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
python bench/run.py --device gpu --json > "$out/gpu-b0100.json"
for batch in 250 500 1000 2000; do
    python bench/run.py --device gpu --no-torch --model attention --batch "$batch" \
        --steps 5 --json > "$out/gpu-b$(printf %04d "$batch").json"
done
python bench/table.py "$out"/gpu-b*.json | tee "$out/table.md"
# seconds per binarized-MNIST epoch (50,000 images) at each batch, from its examples/s
python - "$out" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/gpu-b*.json")):
    run = json.load(open(path))
    for model, figures in run["models"].items():
        rate = figures["npdraw"]["examples_per_s"]
        print(f"batch {run['settings']['batch']:5d} {model:13s} {rate:9.0f} ex/s "
              f"{50000 / rate:7.1f} s per epoch")
PY
