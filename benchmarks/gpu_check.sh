#!/usr/bin/env bash
# The one script to run when a session is lent a GPU: correctness at large sizes first,
# then the benchmark (fused, chunked, reference and the installed peers), then one
# global batch of 1,048,576 pairs in bf16. Results land in $OUT (default
# benchmarks/results); commit them with the card's name, which the CSV rows carry.
#
#   PYTHONPATH=src bash benchmarks/gpu_check.sh            # on the GPU machine
#   PYTHONPATH=src SMOKE=1 bash benchmarks/gpu_check.sh    # tiny sizes, any machine
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }

if [ -n "${SMOKE:-}" ]; then
    VERIFY=(--batch 300 --dim 40)
    BENCH=(--quick --no-plot)
    MILLION=(--batch-sizes 4096 --dims 64)
    LAUNCH=("$PY" -m palmtree verify --nproc 1)
else
    VERIFY=(--batch 20011 --dim 512)
    BENCH=(--device cuda --batch-sizes 8192 32768 65536 131072 --dims 512)
    MILLION=(--device cuda --batch-sizes 1048576 --dims 512)
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m palmtree verify)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

step "correctness: every backend and precision against float64"
"${LAUNCH[@]}" "${VERIFY[@]}" | tee "$OUT/verify.txt" || status=1

if "$PY" -c "import pytest" 2>/dev/null; then
    step "fused kernels at large sizes (tests marked gpu)"
    "$PY" -m pytest -q -m gpu tests/test_fused.py || status=1
fi

step "benchmark"
"$PY" -m palmtree bench "${BENCH[@]}" --out "$OUT" || status=1

step "one global batch of 1,048,576 pairs, bf16 operands"
"$PY" -m palmtree bench "${MILLION[@]}" --backends fused --precisions bf16 \
    --peers --no-check --repeats 1 --warmup 1 --no-plot --out "$OUT" --name million || status=1

exit $status
