#!/usr/bin/env bash
# The GPU check, in one call of at most ~6 minutes on one CUDA GPU with no network: the kernels'
# own checks on the GPU (forward and both gradients at d = 768 against float64), the test suite
# (kernels through the interpreter, the rest on CPU), kernels/bench.py (each size checked against the
# reference, then timed), a short `python train.py` on CUDA and 30 steps of the paper preset
# (volumes/s, MFU, peak memory; synthetic data at 256 x 256 x 128). Tables and logs go to $OUT
# (default: out/gpu_check). Commit the bench table ($OUT/kernel_bench.md, which names the card,
# versions and date) as benchmarks/kernels_<card>.md, against the targets of SPEC section 9.
#
#   bash benchmarks/gpu_check.sh
#
# The machine's Python must already have torch, triton, numpy, tokenizers and pytest. nibabel is
# pure Python: if it is missing, put its wheel in .gpu_wheels/ beforehand
# (pip download nibabel --no-deps -d .gpu_wheels) and it is installed from there, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

python3 -c "import nibabel" 2>/dev/null || "$PY" -m pip install --quiet --no-index --no-deps .gpu_wheels/*.whl
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

status=0
step() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}
step kernel_bank_attention 45 env TRITON_INTERPRET=0 "$PY" -m kernels.bank_attention
step kernel_similarity 45 env TRITON_INTERPRET=0 "$PY" -m kernels.similarity
step bench 200 env TRITON_INTERPRET=0 "$PY" -m kernels.bench --out "$OUT/kernel_bench" --repeats 10
step train_cuda 60 env TRITON_INTERPRET=0 "$PY" train.py --device=cuda --synth_n=300 \
  --max_iters=100 --eval_interval=0 --synth_dir="$OUT/synth" --out_dir="$OUT/train"
step train_paper 90 env TRITON_INTERPRET=0 "$PY" train.py --device=cuda --preset=paper --synth_n=100 \
  --max_iters=30 --log_interval=5 --eval_interval=0 --synth_dir="$OUT/synth" --out_dir="$OUT/paper"
step pytest 120 "$PY" -m pytest -q -x tests
grep "^step" "$OUT/train_paper.log" | tail -3 > "$OUT/paper_preset_speed.txt"  # vol/s, MFU, peak GiB
rm -rf "$OUT/synth" "$OUT"/train/*.pt "$OUT"/paper/*.pt
exit $status
