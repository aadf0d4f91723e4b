#!/usr/bin/env bash
# The chart base's GPU call (bench/chart_base.py all: data, pretraining, gate) in one call of <= 9.5 min.
#
#   bash bench/gpu_base.sh                          # PRESET=full (13M params) on the first visible GPU
#   PRESETS="full small" bash bench/gpu_base.sh     # two presets at once, one per GPU (a 2-GPU machine)
#
# Each preset runs in its own work folder $WORK/<preset> (data/ = the miniature's dataset, base/ = the
# model) and writes progress.json (rewritten as it trains) and gate.json to $OUT (one preset) or
# $OUT/<preset>/ (two). When the Python processes end (finished, stopped at their deadline, or killed
# by the safety timeout), every base/ that exists is packed into one tar, split into parts of at most
# $PART_MB MB: $OUT/base.tar.part-NN (a GPU call returns at most 8 files: parts + 2 JSON per preset +
# log.txt). bench/gpu_method_table.sh takes that folder as BASE (the first preset in name order, so
# `full` before `small`). Unpack here: cat OUT/base.tar.part-* | tar -xf - -C WORK  (-> WORK/<preset>/base/)
#
# Env: PRESET or PRESETS (full), SCALE (full), WORK (/tmp/dyme-chart-base), DEADLINE_S (560, counted from
# this script's start), WORKERS (chart-drawing workers per preset; default cores / presets - 2), GPUS
# (the GPU index per preset, default the visible ones in order; CUDA_VISIBLE_DEVICES is honoured),
# PART_MB (15), PYTHON (python3), LOW_TRACES (conversational | refined | consistent: the low-quality traces' form),
# MIXTURE (the pretraining kinds' shares, chart_base.py --mixture; default the second base's), TEXT_STEPS and
# TEXT_BATCH (a language-model stage first, chart_base.py --text-steps/--text-batch; default 0 = none), PROBE_N
# (val questions bench/trace_probe.py probes each saved base on, on its GPU; its summary goes to log.txt, the
# file with examples to $WORK/<preset>/probe.json, since a call returns at most 8 files; default 0 = no probe;
# PROBE_S, default 45, is the time kept for it), INIT_FROM (a folder holding <preset>/base from an earlier call's
# unpacked parts: each preset continues from its base, chart_base.py --init-from), STEPS and LR (chart_base.py
# --steps/--lr; default the scale's).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-bench/out/chart_base}
SCALE=${SCALE:-full}
read -r -a presets <<< "${PRESETS:-${PRESET:-full}}"
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-560}
WORK=${WORK:-/tmp/dyme-chart-base}
PART_MB=${PART_MB:-15}
LOW_TRACES=${LOW_TRACES:-conversational}  # or refined, consistent: chart_base.py --low-traces
MIXTURE=${MIXTURE:-transcribe=0.35,answer=0.35,skill=0.15,low_trace=0.15}  # chart_base.py --mixture
TEXT_STEPS=${TEXT_STEPS:-0} TEXT_BATCH=${TEXT_BATCH:-256}  # chart_base.py --text-steps/--text-batch
PROBE_N=${PROBE_N:-0}
INIT_FROM=${INIT_FROM:-}
STEPS=${STEPS:-0} LR=${LR:-0}
PROBE_S=${PROBE_S:-45}
[ "$PROBE_N" -gt 0 ] || PROBE_S=0
n=${#presets[@]}
WORKERS=${WORKERS:-$(( $(nproc) / n - 2 ))}
[ "$WORKERS" -ge 0 ] || WORKERS=0
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/log.txt"

# Packages the GPU image lacks (dyme_core.llm imports tenacity), from the wheels carried in .wheels/,
# into a separate --target folder: nothing of the image is replaced. trl, datasets, mlflow, dvc, kfp and
# great_expectations are not needed (chart_base.py reports any that got imported).
SITE=${SITE:-/tmp/dyme-site-chart-base}
need=()
for m in tenacity; do "$PYTHON" -c "import $m" 2>/dev/null || need+=("$m"); done
"$PYTHON" -c "import matplotlib" 2>/dev/null || need+=(matplotlib contourpy cycler fonttools kiwisolver pyparsing \
  python_dateutil six)
"$PYTHON" -c "import yaml" 2>/dev/null || need+=(pyyaml)
if [ ${#need[@]} -gt 0 ]; then
  shopt -s nocaseglob
  files=()
  for name in "${need[@]}"; do files+=(.wheels/"$name"-[0-9]*.whl); done
  shopt -u nocaseglob
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}" || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PYTHON" - <<'EOF' || exit 1
import importlib.util
import sys
need = ["torch", "transformers", "peft", "safetensors", "tokenizers", "yaml", "httpx", "tenacity", "pyarrow",
        "matplotlib", "numpy", "PIL", "tqdm"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing} (carry their wheels in .wheels/)")
EOF
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"

# GPU i of the visible ones for preset i
if [ -n "${GPUS:-}" ]; then
  read -r -a gpus <<< "$GPUS"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
fi
if [ ${#gpus[@]} -eq 0 ] && [ "$n" -eq 1 ]; then
  gpus=("")  # no GPU: one preset on the CPU (the smoke check of this script)
  echo "no GPU visible: running ${presets[0]} on the CPU" | tee -a "$LOG"
fi
[ ${#gpus[@]} -ge "$n" ] || { echo "need $n GPUs for presets ${presets[*]}, see ${#gpus[@]}" | tee -a "$LOG"; exit 2; }

# Python stops its pretraining in time for the gate; the timeout is the safety net before packing.
left=$(( DEADLINE_S - SECONDS - 20 - PROBE_S ))
pids=()
for i in "${!presets[@]}"; do
  p=${presets[$i]}
  out=$OUT_DIR
  [ "$n" -eq 1 ] || out=$OUT_DIR/$p
  init=()
  [ -z "$INIT_FROM" ] || init=(--init-from "$INIT_FROM/$p/base")
  (CUDA_VISIBLE_DEVICES=${gpus[$i]} timeout -s TERM -k 10 "$left" "$PYTHON" bench/chart_base.py all \
    --scale "$SCALE" --preset "$p" --out "$out" --work "$WORK/$p" --workers "$WORKERS" --low-traces "$LOW_TRACES" \
    --mixture "$MIXTURE" --text-steps "$TEXT_STEPS" --text-batch "$TEXT_BATCH" --steps "$STEPS" --lr "$LR" "${init[@]}" \
    --deadline-s "$(( left - 15 ))" 2>&1 | sed -u "s/^/[$p] /" | tee -a "$LOG"
   if [ "$PROBE_N" -gt 0 ] && [ -f "$WORK/$p/base/model.safetensors" ]; then
     CUDA_VISIBLE_DEVICES=${gpus[$i]} timeout -s TERM -k 5 "$PROBE_S" "$PYTHON" bench/trace_probe.py \
       --model "$WORK/$p/base" --data "$WORK/$p/data" --n "$PROBE_N" --out "$WORK/$p/probe.json" 2>&1 \
       | sed -u "s/^/[$p probe] /" | tee -a "$LOG"
   fi) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

find "$OUT_DIR" -name '*.tmp' -delete  # a JSON file caught mid-write by the timeout (its last version is kept)
# Pack whatever bases exist (also after a failure or the timeout: the last save is complete on disk).
have=()
for p in "${presets[@]}"; do [ -f "$WORK/$p/base/model.safetensors" ] && have+=("$p/base"); done
rm -f "$OUT_DIR"/base.tar.part-*
if [ ${#have[@]} -gt 0 ]; then
  tar -cf - -C "$WORK" "${have[@]}" | split -b "${PART_MB}M" -d -a 2 - "$OUT_DIR/base.tar.part-"
  ls -l "$OUT_DIR"/base.tar.part-* | tee -a "$LOG"
fi
echo "gpu_base: presets ${presets[*]}, packed ${have[*]:-nothing}, ${SECONDS}s, status $status" | tee -a "$LOG"
exit $status
