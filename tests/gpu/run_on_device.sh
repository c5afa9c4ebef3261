#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the device tool): tests/gpu, then the GPU
# benchmarks. Logs and JSON go to $OUT (the device tool's return folder) or .posttrain/gpu.
# That machine has CUDA PyTorch, transformers, peft and pytest but no pydantic: put the wheels in
# .whl/ (see ../.library/device/README.md) and carry it. Each step has its own time limit.
set -uo pipefail
out=${OUT:-.posttrain/gpu}
mkdir -p "$out" .posttrain/test  # pytest makes --basetemp but not its parents
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .posttrain/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.posttrain/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 POSTTRAIN_HOME=$PWD/.posttrain
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
timeout -k 5 ${GPU_TESTS_TIMEOUT:-200} python3 -m pytest tests/gpu -v -rA -p no:cacheprovider --timeout 150 \
  --basetemp=.posttrain/test/tmp-gpu 2>&1 | tee "$out/tests_gpu.log"
timeout -k 5 60 python3 benchmarks/chunked_ce.py > "$out/chunked_ce.json" 2> "$out/chunked_ce.err"
timeout -k 5 ${TRAIN_STEP_TIMEOUT:-240} python3 benchmarks/train_step.py > "$out/train_step.json" 2> "$out/train_step.err"
cat "$out"/*.json
