#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels benchmarks/gpu_wheels.txt pins, for the GPU machine's CPython 3.12
# on manylinux x86-64, into benchmarks/gpu_wheels/ (git-ignored; the device tool carries it). A pin that PyPI has
# as a source distribution only (pure Python) is built into a py3-none-any wheel here.
#   bash benchmarks/fetch_gpu_wheels.sh [PYTHON]        # PYTHON: any python with pip (default python3)
set -euo pipefail
cd "$(dirname "$0")"
PY=${1:-${PYTHON:-python3}}
DEST=gpu_wheels
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
grep -v '^\s*#' gpu_wheels.txt | sed 's/#.*//' | awk 'NF {print $1}' | while read -r pin; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$DEST" "$pin" 2>/dev/null; then
    echo "$pin: no wheel on PyPI, building one from its source distribution (must be pure Python)"
    "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "$pin"
  fi
done
for wheel in "$DEST"/*.whl; do
  case "$wheel" in
    *-none-any.whl|*cp312*manylinux*x86_64*.whl|*-py312-none-any.whl) ;;
    *) echo "not for CPython 3.12 on x86-64 Linux: $wheel" >&2; exit 1 ;;
  esac
done
count=$(ls "$DEST"/*.whl | wc -l)
pins=$(grep -v '^\s*#' gpu_wheels.txt | awk 'NF' | wc -l)
[ "$count" -eq "$pins" ] || { echo "$count wheels for $pins pins" >&2; exit 1; }
du -ch "$DEST"/*.whl | tail -1 | sed "s|total|in $count wheels, benchmarks/$DEST|"
