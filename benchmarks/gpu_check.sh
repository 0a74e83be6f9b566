#!/usr/bin/env bash
# The GPU check: one call on a lent GPU that ends within 540 s whatever happens and leaves its
# evidence in $OUT (at most 8 small files, each written as its step goes); work data goes to a
# folder under /tmp that is deleted at the end. The steps are benchmarks/gpu_check.py's (its
# docstring says what each measures); this wrapper adds the hard stop and the clean-up.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine; OUT defaults to out/gpu_check
#   bash benchmarks/gpu_check.sh --dry-run   # the same script on a CPU at small sizes, < 4 minutes
#
# PYTHON picks the interpreter (default python3); it must have torch, triton and numpy. Modules it
# lacks (nibabel and what it imports, tokenizers, pytest and its own) are unpacked offline from the
# wheels in .gpu_wheels/, filled beforehand on a machine with a network (pure-Python or abi3 wheels):
#   pip download nibabel packaging importlib_resources tokenizers pytest pluggy iniconfig pygments \
#       --no-deps -d .gpu_wheels
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# 520 s inside the script, a hard stop at 535 s for the script, 5 s more to kill what is left
timeout -k 5 535 "$PY" benchmarks/gpu_check.py --out "$OUT" --work "$WORK" --deadline 520 "$@"
status=$?
ls -l "$OUT"
exit $status
