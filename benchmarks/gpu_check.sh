#!/usr/bin/env bash
# The checks that need a GPU, in one file, for a machine with CUDA:
#   1. the environment (nvidia-smi, torch's CUDA build, GPUs, bfloat16 support);
#   2. the CUDA tests: `pytest -m gpu` (device="auto" trains on CUDA, pinned batches, bf16 on
#      the GPU, two GPUs over NCCL against one process when there are two) and the layer
#      conformance suite on the GPU (`--device cuda`);
#   3. the GPU part of the scaling benchmark (rows/s of fit: fp32 and bf16 on one GPU,
#      DDP and the flat all-reduce on two GPUs when there are two).
# Results land in benchmarks/results/: gpu-env.txt, gpu-tests.txt, gpu-conformance.txt and
# scaling-gpu.{json,md} (the benchmark's own report, with the command that made it).
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh
# Python: $PYTHON if set, else .venv/bin/python (created with `make install-dev` if missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    [ -x .venv/bin/python ] || make install-dev
    PYTHON=.venv/bin/python
fi
export OMP_NUM_THREADS=1
status=0

{
    date -u
    nvidia-smi || echo "nvidia-smi not found"
    "$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("GPUs", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
print("nccl", torch.distributed.is_available() and torch.distributed.is_nccl_available())
PY
} > "$OUT/gpu-env.txt" 2>&1
cat "$OUT/gpu-env.txt"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "CUDA is not available here: nothing to check" | tee -a "$OUT/gpu-env.txt"
    exit 1
fi

"$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PYTHON" -m pytest --device cuda -q -p no:cacheprovider tests/transforms \
    tests/test_distributions.py 2>&1 | tee "$OUT/gpu-conformance.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PYTHON" -m benchmarks.scaling --part gpu 2>&1 | tee "$OUT/scaling-gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
