#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with CuPy and a CUDA GPU:
#   1. tests/test_gpu.py (NumPy against CuPy, every fused kernel really compiled),
#   2. one training epoch of binarized MNIST at the paper's batch of 100,
#   3. the benchmark at batch 100 against the PyTorch CUDA peer (after checking that both
#      give the same loss), then npdraw alone at larger batches,
#   4. one epoch at a large batch, and the README's table rows.
# Each step has its own time limit, so one slow step cannot take the others' time. The
# data must be converted already (data/binarized_mnist.h5). Results go to $OUT (default:
# bench-gpu/). PYTHON picks the interpreter (default: python3, else python); EPOCH_BATCHES
# the batch sizes of the timed epochs (default: "100 2000").
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-gpu}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
runs="$(mktemp -d)"

step() {  # step SECONDS NAME COMMAND...: run one step under its own time limit
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s, $(date +%T))" >&2
    timeout "$limit" "$@"
    echo "== $name: exit $?" >&2
}

epoch() {  # epoch SECONDS BATCH: one training epoch on the GPU; its log line to $out
    local limit=$1 batch=$2
    step "$limit" "epoch at batch $batch" "$py" cli.py train --device gpu --epochs 1 \
        --batch-size "$batch" --no-progress --out "$runs" --name "b$batch"
    cp "$runs/b$batch/log.jsonl" "$out/epoch-b$(printf %04d "$batch").jsonl" 2>/dev/null
}

step 60 "versions" "$py" -c "import sys, numpy, cupy; print(sys.version.split()[0], 'numpy',
numpy.__version__, 'cupy', cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)['name'])"
step 150 "tests/test_gpu.py" "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    2>&1 | tee "$out/test_gpu.txt"
batches="${EPOCH_BATCHES:-100 2000}"
[[ " $batches " == *" 100 "* ]] && epoch 90 100
step 90 "benchmark, batch 100, with PyTorch" "$py" bench/run.py --device gpu --json \
    > "$out/gpu-b0100.json"
for batch in 500 2000; do
    step 40 "benchmark, batch $batch" "$py" bench/run.py --device gpu --no-torch \
        --model attention --batch "$batch" --steps 5 --json > "$out/gpu-b$(printf %04d "$batch").json"
done
for batch in $batches; do [ "$batch" != 100 ] && epoch 45 "$batch"; done
mapfile -t results < <(find "$out" -name 'gpu-b*.json' -size +0 | sort)
[ "${#results[@]}" -gt 0 ] && "$py" bench/table.py "${results[@]}" | tee "$out/table.md"
"$py" - "$out" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/gpu-b*.json")):
    try:
        run = json.load(open(path))
    except ValueError:
        continue
    for model, figures in run["models"].items():
        rate = figures["npdraw"]["examples_per_s"]
        print(f"benchmark batch {run['settings']['batch']:5d} {model:13s} {rate:9.0f} ex/s "
              f"= {50000 / rate:7.1f} s per 50,000 images")
for path in sorted(glob.glob(sys.argv[1] + "/epoch-b*.jsonl")):
    for line in open(path):
        r = json.loads(line)
        print(f"{path.rsplit('/', 1)[-1]}: epoch {r['epoch']} train {r['train_bound']:.2f} "
              f"valid {r['valid_bound']:.2f}  {r['train_time_s']:.1f} s training, "
              f"{r['wall_s']:.1f} s with evaluation, {r['examples_per_s']:.0f} ex/s")
PY
