#!/usr/bin/env bash
# The GPU throughput plan (bench/throughput.py), sized to finish in under 10 minutes on one machine.
#
#   bash bench/gpu_throughput.sh          one GPU (H100/H200), about 5 minutes from a cold machine (budget 520 s):
#     SmolVLM-256M shape, K=8, 8 prompts, 128 new tokens, mixes explore/skip75/memorize75:
#     trl-default, trl-same-gen, dyme, grpo (2 warm-up + 3 timed steps each); DyME's update eager
#     (train.compile_update off); ms per decode step beside the memory-bandwidth floor (4.8 TB/s)
#   bash bench/gpu_throughput.sh compile  one GPU, opt-in: the same table with DyME's update compiled. The compile
#     is regional now (one decoder layer, about 6 s on an H200 in bench/gpu_perf.sh; it was a whole-model compile
#     of about 200 s that did not fit a cold call); this variant has not been re-run since
#   bash bench/gpu_throughput.sh extra    one GPU, about 9 minutes, DyME's update eager:
#     1. the DyME sweep (256M, explore) over K (2,4,8,16), completion length (64,128,256) and prompts per
#        step (4,8,16); every new shape recompiles the decode step (about 35 s)
#     2. SmolVLM-500M shape, mix explore: trl-default, trl-same-gen, dyme (1 warm-up + 2 timed steps)
#   (the `profile` part and bench/profile_update.py, which timed the update's halves through the trainer's private
#   methods, are gone; their 2026-11-26 results stay in bench/results/gpu-profile/, bench/LOG.md section 1)
#   bash bench/gpu_throughput.sh multi    two GPUs of one host, about 3 minutes (update eager by default;
#     EXTRA="--compile-update on" compiles it in both runs):
#     DyME alone on 1 GPU, then the same per-GPU batch under torchrun on 2 GPUs: samples/s, efficiency
#
# Results (JSON, Markdown, PNG) go to $OUT (default bench/out/gpu). Each part gets a time budget and
# skips what would not fit, writing what it measured. The GPU image lacks trl, datasets and friends:
# they install from .wheels/ (downloaded on the dev machine; pass `.wheels` in the run's carry list).
# Local smoke test of the script itself: SKIP_INSTALL=1 DEVICE=cpu SHAPE_A=tiny SHAPE_B=tiny LABEL_B=tiny-b PY=.venv/bin/python \
#   EXTRA="--new-tokens 16 --k 4 --prompts 4" bash bench/gpu_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
SITE=${SITE:-/tmp/dyme-site}
BUDGET=${BUDGET:-520}  # seconds for the whole plan; with the per-part hard timeouts it ends before 600
T0=$(date +%s)
# seconds left for a part: the plan's remainder minus what later parts need (at least 30)
left() { local s=$(( BUDGET - ($(date +%s) - T0) - ${1:-0} )); echo $(( s < 30 ? 30 : s )); }
mkdir -p "$OUT"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE_A=${SHAPE_A:-smolvlm-256m}
SHAPE_B=${SHAPE_B:-smolvlm-500m}
read -r -a extra <<< "${EXTRA:-}"

# --- packages missing on the GPU image, from the wheels in .wheels/
source bench/gpu_wheels.sh
export DYME_BENCH_WORK=${DYME_BENCH_WORK:-/tmp/dyme-bench-work}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'trl', trl.__version__)" | tee -a "$OUT/gpu.txt"
common=(--device "$DEVICE" --k 8 --prompts 8 --new-tokens 128 --work "$DYME_BENCH_WORK" --out "$OUT" "${extra[@]}")

if [[ "${1:-single}" == "multi" ]]; then
  "$PY" bench/throughput.py "${common[@]}" --shape "$SHAPE_A" --trl off --trainers dyme --mix explore \
    --warmup 2 --steps 5 --label ddp1 --budget-s "$(left 150)" 2>&1 | tee "$OUT/ddp1.log"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 bench/throughput.py "${common[@]}" \
    --shape "$SHAPE_A" --trl off --trainers dyme --mix explore --warmup 2 --steps 5 --label ddp2 --peak off \
    --ddp-baseline "$OUT/throughput-ddp1.json" --budget-s "$(left 20)" 2>&1 | tee "$OUT/ddp2.log"
  exit 0
fi

if [[ "${1:-single}" == "extra" ]]; then
  # 1. the sweep (DyME alone, eager update); leaves about 190 s for part 2
  b=$(left 190)  # each part also gets a hard timeout a little past its budget
  timeout -k 10 $(( b + 30 )) "$PY" bench/throughput.py "${common[@]}" --shape "$SHAPE_A" --label "$SHAPE_A-sweep" \
    --trl off --trainers dyme --mix explore --warmup 1 --steps 2 --sweep --compile-update off --peak off \
    --budget-s "$b" 2>&1 | tee "$OUT/sweep.log" || echo "part 1 failed (see sweep.log)"
  # 2. SmolVLM-500M: explore only
  b=$(left 10)
  timeout -k 10 $(( b + 30 )) "$PY" bench/throughput.py "${common[@]}" --shape "$SHAPE_B" \
    --label "${LABEL_B:-$SHAPE_B}" --mix explore --trainers trl-default,trl-same-gen,dyme --compile-update off \
    --warmup 1 --steps 2 --budget-s "$b" 2>&1 | tee "$OUT/500m.log" || echo "part 2 failed (see 500m.log)"
else
  # SmolVLM-256M: the main table, update eager (default) or compiled (`compile`, opt-in: does not fit cold)
  cu=off label="$SHAPE_A"
  if [[ "${1:-single}" == "compile" ]]; then cu=on label="$SHAPE_A-compiled"; fi
  b=$(left 10)
  # throughput.py rewrites its result files after every timed round, so the hard timeout loses nothing measured
  timeout -k 10 $(( b + 40 )) "$PY" bench/throughput.py "${common[@]}" --shape "$SHAPE_A" --label "$label" \
    --compile-update "$cu" --mix explore,skip75,memorize75 --warmup 2 --steps 3 --budget-s "$b" 2>&1 \
    | tee "$OUT/256m.log" || echo "the 256M table failed (see 256m.log)"
fi
echo "plan finished in $(( $(date +%s) - T0 )) s"
# at most 8 files come back from a device call: keep the JSON and PNG results, pack the rest
( cd "$OUT" && tar czf reports.tgz --remove-files ./*.log ./*.md gpu.txt 2>/dev/null || true )
