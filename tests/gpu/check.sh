#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, CuPy, PyTorch with CUDA, transformers and peft
# (pip install ".[gpu,test,reference]"). Run from anywhere: bash tests/gpu/check.sh
#   1. the benchmark on the GPU: the training step on CuPy beside PyTorch CUDA eager (same run, as ratios),
#      inference, the matmul peak, the per-layer breakdown, how cost grows (scaling.json / scaling.png);
#   2. the same step on NumPy with 2 threads on 2 cores of this machine (the goal compares with it);
#   3. where the GPU step's time goes: host time against device time per part (profile_step.py);
#   4. CuPy against NumPy: gradient checks on the GPU, the model and every method, training, merge, files,
#      generation (tests/gpu/); then every fast function against its reference on the GPU (tests/test_fast.py);
#   5. the whole test suite with MINILORA_BACKEND=cupy.
# JSON, the scaling plot and the two pytest logs go to ${OUT:-gpu-check}/ (7 files); everything else is printed,
# the summary last. With a time limit for the whole check (seconds):
#   CHECK_SECONDS=400 bash tests/gpu/check.sh > $OUT/check.log 2>&1
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import cupy, numpy; print('CuPy', cupy.__version__, 'NumPy', numpy.__version__, 'on', cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())" \
    || { echo "no CuPy/GPU here"; exit 2; }
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"

echo "== 1. the benchmark on the GPU (CuPy and PyTorch CUDA eager)"
MINILORA_BACKEND=cupy timeout 150 $PY -m minilora.cli bench --json "$OUT/bench_cupy.json" --scaling "$OUT" 2>&1
echo "== 2. the NumPy step on 2 cores of this machine"
OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 timeout 100 taskset -c 0,1 \
    $PY -m minilora.cli bench --threads 2 --no-profile --json "$OUT/bench_numpy.json" 2>&1
echo "== 3. host time against device time"
timeout 90 $PY tests/gpu/profile_step.py "$OUT/profile_step.json" 2>&1
echo "== 4. CuPy parity tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rfE tests/gpu 2>&1 | tee "$OUT/parity.log" | tail -15
echo "== 4b. the fast path against the reference core, on the GPU"
MINILORA_BACKEND=cupy timeout 90 $PY -m pytest -q -p no:cacheprovider -rfE tests/test_fast.py 2>&1 | tail -15
echo "== 5. the whole suite on the CuPy backend"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
BUDGET=${CHECK_SECONDS:-560}                 # the suite gets what is left of the whole check's time
MINILORA_BACKEND=cupy OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 timeout $(( BUDGET - SECONDS > 60 ? BUDGET - SECONDS : 60 )) $PY -m pytest -q -p no:cacheprovider \
    $XDIST --tb=short -rfE -W ignore::DeprecationWarning --ignore=tests/test_notebooks.py --ignore=tests/gpu tests 2>&1 | tee "$OUT/suite_cupy.log" | tail -40
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
    gpu, cpu = json.load(open(f"{out}/bench_cupy.json")), json.load(open(f"{out}/bench_numpy.json"))
except OSError as exc:
    sys.exit(f"no summary: {exc}")
print(f"\nCuPy step {gpu['minilora_step_s'] * 1e3:.2f} ms; NumPy step on 2 cores {cpu['minilora_step_s'] * 1e3:.1f} ms: "
      f"{cpu['minilora_step_s'] / gpu['minilora_step_s']:.1f}x faster on the GPU (goal >= 10x)")
if gpu.get("ratio"):
    print(f"CuPy / PyTorch CUDA eager: {gpu['ratio']:.2f} (goal <= 1.5); LoRA: CuPy / PEFT {gpu['lora_torch_ratio']:.2f}; "
          f"LoRA / full on CuPy {gpu['lora_ratio']:.2f}")
try:
    prof = json.load(open(f"{out}/profile_step.json"))
    ours, lora, theirs = (prof[k]["step"]["gpu_ms"] for k in ("minilora_full", "minilora_lora", "torch"))
    print(f"measured apart (cupyx.profiler.benchmark, GPU time): minilora {ours:.2f} ms, LoRA {lora:.2f} ms, "
          f"PyTorch CUDA eager {theirs:.2f} ms: ratio {ours / theirs:.2f}, LoRA / full {lora / ours:.2f}")
except (OSError, KeyError) as exc:
    print(f"no profile_step.json: {exc}")
if cpu.get("ratio"):
    print(f"NumPy / PyTorch CPU eager, 2 threads on this machine: {cpu['ratio']:.2f}; LoRA / full {cpu['lora_ratio']:.2f}")
PY
