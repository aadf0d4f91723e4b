#!/usr/bin/env bash
# One GPU call of the method table (bench/method_table.py): run the named pieces in order.
#
#   bash bench/gpu_method_table.sh base runs-seed0          # call 1, about 8 min on one H100/H200
#   bash bench/gpu_method_table.sh runs-seed0 runs-seed1 aggregate   # call 2, about 5 min
#
# Earlier calls' result files are read from $RESULTS (default bench/out/method_table: copy each call's
# returned files there and carry that folder into the next call). New files go to $OUT when the GPU
# runner sets it (so only they come back: at most 7 per call), else to $RESULTS. A call that runs out
# of time stops cleanly before a run it could not finish (exit 3): carry its files and rerun the same
# command to resume. Env: SCALE (full), WORK (/tmp/dyme-method-table-$SCALE), DEADLINE_S (560, counted
# from this script's start), SET (extra `--set FIELD=VALUE ...` for bench/method_table.py), METHODS (comma list
# of the methods to train, default all), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 PIECE [PIECE ...]  (base | runs-seed<N> | aggregate)" >&2; exit 2; }

RESULTS=${RESULTS:-bench/out/method_table}
OUT_DIR=${OUT:-$RESULTS}
SCALE=${SCALE:-full}
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-560}
mkdir -p "$RESULTS" "$OUT_DIR"

# Packages the GPU image may lack, from the wheels carried in .wheels/ (only those not importable
# there, into a separate --target folder: nothing of the image is replaced). trl, datasets, mlflow, dvc,
# kfp and great_expectations are not needed (bench/method_table.py checks none got imported).
SITE=${SITE:-/tmp/dyme-site-method-table}
need=()
"$PYTHON" -c "import matplotlib" 2>/dev/null || need+=(matplotlib contourpy cycler fonttools kiwisolver pyparsing \
  python_dateutil six)
"$PYTHON" -c "import requests" 2>/dev/null || need+=(requests urllib3 charset_normalizer idna certifi)
"$PYTHON" -c "import yaml" 2>/dev/null || need+=(pyyaml)
if [ ${#need[@]} -gt 0 ]; then
  shopt -s nocaseglob
  files=()
  for name in $(printf '%s\n' "${need[@]}" | sort -u); do files+=(.wheels/"$name"-[0-9]*.whl); done
  shopt -u nocaseglob
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

"$PYTHON" - <<'EOF'
import importlib.util
import sys
need = ["torch", "transformers", "peft", "safetensors", "tokenizers", "yaml", "requests", "pyarrow",
        "matplotlib", "numpy", "PIL", "tqdm"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing} (carry their wheels in .wheels/)")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

LOG="$OUT_DIR/log-$(IFS=-; echo "$*").txt"
# shellcheck disable=SC2086  # SET is a list of FIELD=VALUE words
"$PYTHON" bench/method_table.py "$@" --scale "$SCALE" --out "$OUT_DIR" --from "$RESULTS" \
  --work "${WORK:-/tmp/dyme-method-table-$SCALE}" --deadline-s "$((DEADLINE_S - SECONDS))" \
  ${SET:+--set $SET} ${METHODS:+--methods $METHODS} 2>&1 | tee -a "$LOG"
