#!/usr/bin/env bash
# The decode-step plan (bench/decode_step.py): ms per decode step of HF generate (dynamic and static cache), the
# eager `generation.complete` and the captured static step (`train.cuda_graph_decode`), beside the memory floor.
#
#   bash bench/gpu_decode.sh     one GPU (H100/H200), SmolVLM-256M shape, 8 prompts x K=8 = 64 rows x 128 new
#                                tokens; about 2.5 minutes from a cold machine (budget 480 s, hard timeout 560 s)
#
# Needs torch, transformers, matplotlib and pillow (the GPU image has them) and tenacity (installed from .wheels/,
# carried; bench/gpu_wheels.sh, which also takes PIN_TRANSFORMERS=1); not trl. Results (decode-<label>.json and .md) go to $OUT (default bench/out/decode) and are rewritten
# after every method, so the hard timeout loses nothing measured. Measured from cold on an H200: 145 s.
# Local check of the script: DEVICE=cpu SHAPE=tiny EXTRA="--new-tokens 16 --repeats 1" \
#   PY=.venv/bin/python bash bench/gpu_decode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/decode}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-smolvlm-256m}
BUDGET=${BUDGET:-480}
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$OUT"
# dyme_core.llm imports tenacity, which the GPU image lacks: gpu_wheels.sh installs what is missing from the wheels
# carried in .wheels/ (PIN_TRANSFORMERS=1: and the transformers constraints.txt pins, from .wheels/pin/)
SITE=${SITE:-/tmp/dyme-site-decode}
source bench/gpu_wheels.sh
export DYME_BENCH_WORK=${DYME_BENCH_WORK:-/tmp/dyme-bench-work}
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; } | tee "$OUT/gpu.txt"
timeout -k 10 $(( BUDGET + 80 )) "$PY" bench/decode_step.py --device "$DEVICE" --shape "$SHAPE" --prompts 8 --k 8 \
  --new-tokens 128 --repeats 3 --budget-s "$BUDGET" --work "$DYME_BENCH_WORK" --out "$OUT" "${extra[@]}" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/decode.log" || echo "the decode plan failed (see decode.log)"
echo "plan finished in $(( $(date +%s) - T0 )) s"
