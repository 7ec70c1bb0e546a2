#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and CuPy (pip install ".[gpu,test,reference]"):
#   1. CuPy against NumPy: every layer's gradient check on the GPU, the model and every method, training,
#      LoRA merge, files and generation (tests/gpu/);
#   2. the whole test suite with MINILORA_BACKEND=cupy (tests that compare with NumPy arrays directly are
#      expected to need to_numpy; the summary says how many pass);
#   3. the benchmark on the GPU: the training step on CuPy beside NumPy (2 threads) and PyTorch CUDA eager.
# Writes its logs and the benchmark JSON to ${OUT:-gpu-check}/.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
python -c "import cupy; print('CuPy', cupy.__version__, 'on', cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())" \
    || { echo "no CuPy/GPU here"; exit 2; }
echo "== 1. CuPy parity tests"
python -m pytest -q tests/gpu 2>&1 | tee "$OUT/parity.log" | tail -5
echo "== 2. the whole suite on the CuPy backend"
MINILORA_BACKEND=cupy python -m pytest -q -p no:cacheprovider --ignore=tests/test_notebooks.py tests 2>&1 \
    | tee "$OUT/suite_cupy.log" | tail -3
echo "== 3. the benchmark"
MINILORA_BACKEND=cupy python -m minilora.cli bench --no-profile --json "$OUT/bench_cupy.json" 2>&1 | tee "$OUT/bench_cupy.log"
python -m minilora.cli bench --no-profile --no-torch --json "$OUT/bench_numpy.json" 2>&1 | tail -8 | tee "$OUT/bench_numpy.log"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
gpu, cpu = json.load(open(f"{out}/bench_cupy.json")), json.load(open(f"{out}/bench_numpy.json"))
print(f"CuPy step {gpu['minilora_step_s'] * 1e3:.2f} ms; NumPy step {cpu['minilora_step_s'] * 1e3:.1f} ms: "
      f"{cpu['minilora_step_s'] / gpu['minilora_step_s']:.1f}x faster on the GPU (goal >= 10x)")
if gpu.get("ratio"):
    print(f"CuPy / PyTorch CUDA eager: {gpu['ratio']:.2f} (goal <= 1.5)")
PY
