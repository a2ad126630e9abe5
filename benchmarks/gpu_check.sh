#!/usr/bin/env bash
# The GPU check of issue 22 in one command: on a machine with CUDA, Python 3.12, torch and transformers but no
# lm-eval and no network, install the carried wheels (benchmarks/gpu_wheels/, see fetch_gpu_wheels.sh) into a
# folder of their own, then run benchmarks/gpu_check.py within a time budget. Report: gpu_check.txt,
# gpu_check.json and gpu_check.log in ${OUT:-./gpu_check_out}; exit status 1 when a hard check failed.
#   bash benchmarks/gpu_check.sh [--cpu] [gpu_check.py options]   # --cpu, or no CUDA: tiny models on the CPU
# PYTHON (default python3) picks the interpreter, WHEELS (benchmarks/gpu_wheels) the wheels, BUDGET (360 s) the
# time after which later sections are skipped; the whole run is stopped at BUDGET + 90 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/gpu_wheels}
BUDGET=${BUDGET:-360}
OUT_DIR=${OUT:-./gpu_check_out}
mkdir -p "$OUT_DIR"
started=$(date +%s)
if ! "$PY" -c "import lm_eval, datasets" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "lm-eval is missing and $WHEELS holds no wheels: run bash benchmarks/fetch_gpu_wheels.sh" \
      "where PyPI is reachable, and carry benchmarks/gpu_wheels" >&2
    exit 2
  fi
  SITE=${TMPDIR:-/tmp}/gpu_check_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE in $(( $(date +%s) - started )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lm_eval_taskvec, not an installed one
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
timeout -k 10 $(( BUDGET + 90 )) "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" --budget "$BUDGET" "$@" \
  2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_check.py stopped after $(( BUDGET + 90 )) s; partial report in $OUT_DIR" >&2
exit "$status"
