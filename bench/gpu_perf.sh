#!/usr/bin/env bash
# The cold-machine performance plan (issue 11): every figure from one call of at most about 8 minutes on a
# machine with 2 GPUs (kind nvidia-h200-x2), nothing compiled before. Parts, in order, each with its own time
# budget; a part that would not fit is skipped with its reason written to skipped-<part>.txt:
#   0. decode (only when bench/decode_step.py exists): ms per decode step of the captured static decode against
#      the memory floor (methods $DECODE_METHODS, default "captured,complete"); PROFILE=1: then torch.profiler over a
#      few decode steps of the eager static step and of the captured one (kernels per step, time by category, top
#      kernels, GPU busy share: decode-profile-$SHAPE.json/.md)
#   a. time to first step and steady step, DyME's update eager vs regionally compiled (train.compile_update),
#      cold cache then warm cache, 256M shape (bench/compile_time.py), one process each with an empty
#      TORCHINDUCTOR_CACHE_DIR, so a process reuses only what train.compile_cache_dir ($COMPILE_CACHE) holds.
#      Rollouts decode as the project's default does (the captured step; STATIC_CACHE=on: HF's compiled static
#      step, whose compile then joins the first step and the cache):
#        compiled-cold       first process: compiles the layer into the empty cache dir;
#                            then the same process's update eager (steady); SAME_PROCESS=1: and a second trainer
#                            in the same process (warm: Dynamo's in-memory cache)
#        compiled-warm       second process, same cache dir
#        eager-cold          update eager, no cache dir
#        eager-warm          update eager, the cache dir
#   b. the update with 75% zero-weight groups (mix skip75) against TRL 1.16 GRPOTrainer given the same generation
#      settings ($TRL_KINDS, default trl-same-gen), DyME's update compiled from the cache dir part a filled
#      (bench/throughput.py: 2 warm-up + 3 timed rounds; DyME's first step is reported apart); DyME's rollouts
#      decode as $DYME_DECODE says (throughput.py --dyme-decode; default auto: HF's compiled static-cache step, as
#      trl-same-gen; captured or captured-compiled: the project's own decode, train.cuda_graph_decode and
#      train.compile_decode)
#   c. 2-GPU scaling: DyME alone on 1 GPU, then torchrun on 2 GPUs, same per-GPU batch: samples/s and efficiency
#      (update eager unless MULTI_COMPILE=on)
#   d. (only when PARTS names it) full DyME against mode switching alone: dyme-full (MEMORIZE memorises the online
#      rule refiner's traces, the rule checker scores thinking, format and thinking rewards from the text) against
#      dyme-switch (the raw hint, no checker, constant rewards), mixes memorize75 and mixed, the project's default
#      decode (captured step) and an eager update (bench/throughput.py --trl off: 2 warm-up steps, one per trainer,
#      + 3 timed rounds); x_full_vs_switch per mix, target <= 1.15
# Results: every process writes its JSON into $RES the moment it measures something; a background loop packs
# $RES into $OUT/perf-results.tgz every 10 s and after each part (a device call returns at most 8 files, and a
# call killed at its limit still returns the last pack), and $OUT/perf-summary.md is written at the end.
#
#   bash bench/gpu_perf.sh                    on the 2-GPU kind, .wheels carried (trl and friends install from it)
#   PARTS=b BUDGET=330 bash bench/gpu_perf.sh  one part alone (PARTS: any of 0 a b c d, default "0 a b c"; 0, b and d
#                                               fit the 1-GPU kind, e.g. PARTS="0 b d" PROFILE=1)
# CPU smoke of the script itself (tiny shapes, torchrun with 2 CPU processes):
#   SKIP_INSTALL=1 DEVICE=cpu SHAPE=tiny K=4 PROMPTS=4 NEW_TOKENS=16 PY=.venv/bin/python BUDGET=900 SAME_PROCESS=1 \
#     OUT=/tmp/perf-out RES=/tmp/perf-res bash bench/gpu_perf.sh
#   (parts 0 and d alone, with the profile: the same with PARTS="0 d" PROFILE=1 BUDGET=300)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/perf}
RES=${RES:-/tmp/dyme-perf-results}  # outside $OUT: only the pack and the summary come back
SITE=${SITE:-/tmp/dyme-site}
BUDGET=${BUDGET:-500}  # seconds for the whole plan (a 10-minute call keeps 100 s spare); hard timeouts per part
T0=$(date +%s)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-smolvlm-256m}
K=${K:-8} PROMPTS=${PROMPTS:-8} NEW_TOKENS=${NEW_TOKENS:-128}
COMPILE_CACHE=${COMPILE_CACHE:-/tmp/dyme-compile-cache}
TRL_KINDS=${TRL_KINDS:-trl-same-gen}
DYME_DECODE=${DYME_DECODE:-auto}
DECODE_METHODS=${DECODE_METHODS:-captured,complete}
MULTI_COMPILE=${MULTI_COMPILE:-off}
STATIC_CACHE=${STATIC_CACHE:-off}  # part a's rollouts: off = the default captured decode step, on = HF's compiled one
PARTS=${PARTS:-0 a b c}  # the parts to run, e.g. PARTS=b: the update against TRL alone (its compile then starts cold)
PROFILE=${PROFILE:-}  # 1: part 0 also profiles the decode step (bench/decode_step.py --profile)
export DYME_BENCH_WORK=${DYME_BENCH_WORK:-/tmp/dyme-bench-work}
mkdir -p "$OUT" "$RES"
# a cold plan: nothing compiled by an earlier run of it (KEEP_CACHE=1 keeps the cache dir)
if [[ -z "${KEEP_CACHE:-}" ]]; then rm -rf "$COMPILE_CACHE"; fi

# seconds left in the plan once `reserve` seconds are kept for later parts
left() { echo $(( BUDGET - ($(date +%s) - T0) - ${1:-0} )); }
want() { [[ " $PARTS " == *" $1 "* ]]; }
skip() { echo "$2" > "$RES/skipped-$1.txt"; echo "part $1 skipped: $2"; }
pack() { tar czf "$OUT/.perf-results.tgz.tmp" -C "$RES" . 2>/dev/null && mv -f "$OUT/.perf-results.tgz.tmp" \
  "$OUT/perf-results.tgz"; }
( while sleep 10; do pack || true; done ) &
PACKER=$!
finish() { kill "$PACKER" 2>/dev/null || true; pack || true; }
trap finish EXIT
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$RES/plan.log"; }

# --- packages missing on the GPU image, from the wheels in .wheels/
source bench/gpu_wheels.sh
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } \
  > "$RES/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$RES/gpu.txt"
NGPU=$( { nvidia-smi -L 2>/dev/null || true; } | grep -c "^GPU" || true)
size=(--shape "$SHAPE" --k "$K" --prompts "$PROMPTS" --new-tokens "$NEW_TOKENS" --work "$DYME_BENCH_WORK")
log "plan start: budget $BUDGET s, $NGPU GPUs, device $DEVICE"

# time kept for the parts after each one (what they need at least, on the 256M shape from cold)
# (part b: DyME's set-up and compile, then TRL's set-up and warm-up, about 75 s, before any timed round;
#  part d: DyME's set-up, 2 warm-up steps (the decode graph's capture), 2 mixes x 3 rounds x 2 trainers)
NEED_A=170 NEED_B=160 NEED_C=110 NEED_D=90
want a || NEED_A=0
want b || NEED_B=0
want c || NEED_C=0
want d || NEED_D=0

# --- part 0: the decode step (optional: the script may not be in this checkout)
if ! want 0; then skip 0-decode "not in PARTS ($PARTS)"
elif [[ -f bench/decode_step.py ]]; then
  profile=() cap0=60
  if [[ -n "$PROFILE" ]]; then profile=(--profile) cap0=100; fi  # the profile: about 40 s more
  cap0=${CAP0:-$cap0}  # e.g. more for captured-compiled (its compile, about 40 s, and its profile part)
  b=$(left $(( NEED_A + NEED_B + NEED_C + NEED_D )))
  (( b > cap0 )) && b=$cap0
  if (( b < 30 )); then skip 0-decode "needs about 30 s, $b s left before parts a-d"
  else
    log "part 0: decode ($DECODE_METHODS${PROFILE:+, profile}), budget $b s"
    timeout -k 5 "$b" "$PY" bench/decode_step.py --device "$DEVICE" "${size[@]}" --methods "$DECODE_METHODS" \
      --repeats 2 --budget-s $(( b - 10 )) --label "$SHAPE" --out "$RES" "${profile[@]}" > "$RES/decode.log" 2>&1 \
      || log "part 0 ended with rc $? (see decode.log)"
  fi
else
  skip 0-decode "bench/decode_step.py is not in this checkout"
fi
pack || true

# --- part a: time to first step, eager vs regional compile, cold vs warm cache (one process each)
# run_a LABEL NEED CAP ARGS...: one compile_time.py process with an empty inductor cache, if NEED s are left
run_a() {
  local label=$1 need=$2 cap=$3; shift 3
  local b; b=$(left $(( NEED_B + NEED_C + NEED_D )))
  if (( b < need )); then skip "a-$label" "needs about $need s; $b s left for part a"; return 0; fi
  (( cap > b )) && cap=$b
  log "part a: $label (cap $cap s)"
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor-XXXXXX) timeout -k 5 "$cap" "$PY" bench/compile_time.py \
    --device "$DEVICE" "${size[@]}" --label "$label" --out "$RES" --steps 3 --budget-s $(( cap - 10 )) \
    --static-cache "$STATIC_CACHE" "$@" \
    > "$RES/compile-$label.log" 2>&1 || log "part a: $label ended with rc $? (see compile-$label.log)"
  pack || true
}
same=()
if [[ -n "${SAME_PROCESS:-}" ]]; then same=(--same-process); fi
if want a; then
run_a compiled-cold 60 150 --update compiled --cache-dir "$COMPILE_CACHE" "${same[@]}"
# a warm run measures reuse of what compiled-cold stored: unless that run reached its first step, it would time a
# cold compile
cold_done() { grep -q '"time_to_first_step_s"' "$RES/compile-compiled-cold.json" 2>/dev/null; }
if cold_done; then
  run_a compiled-warm 30 60 --update compiled --cache-dir "$COMPILE_CACHE"
else skip a-compiled-warm "compiled-cold did not reach its first step, so the cache dir holds nothing to reuse"
fi
run_a eager-cold 40 60 --update eager
if cold_done; then
  run_a eager-warm 30 50 --update eager --cache-dir "$COMPILE_CACHE"
else skip a-eager-warm "compiled-cold did not reach its first step, so the cache dir holds nothing to reuse"
fi
"$PY" bench/compile_time.py --summarize "$RES" > /dev/null 2>&1 || true
else skip a "not in PARTS ($PARTS)"
fi

# --- part b: the skip75 update against TRL, DyME's update compiled (from the cache part a filled)
b=$(left $(( NEED_C + NEED_D )))
if ! want b; then skip b-update "not in PARTS ($PARTS)"
elif (( b < NEED_B - 20 )); then skip b-update "needs about $(( NEED_B - 20 )) s; $b s left before parts c-d"
else
  log "part b: skip75 update vs $TRL_KINDS (DyME's decode: $DYME_DECODE), budget $b s"
  timeout -k 10 $(( b + 20 )) "$PY" bench/throughput.py --device "$DEVICE" "${size[@]}" --out "$RES" \
    --label update-skip75 --trainers "$TRL_KINDS,dyme" --mix skip75 --compile-update on --dyme-decode "$DYME_DECODE" \
    --compile-cache-dir "$COMPILE_CACHE" --warmup 2 --steps 3 --peak off --budget-s "$b" \
    > "$RES/update-skip75.log" 2>&1 || log "part b ended with rc $? (see update-skip75.log)"
fi
pack || true

# --- part c: 2-GPU scaling (DyME alone; same per-GPU batch)
if ! want c; then skip c-multi "not in PARTS ($PARTS)"
elif [[ "$DEVICE" == cuda && "$NGPU" -lt 2 ]]; then skip c-multi "needs 2 GPUs, this machine has $NGPU"
else
  b=$(left "$NEED_D")
  if (( b < 60 )); then skip c-multi "needs about 60 s; $b s left before part d"
  else
    b1=$(( b * 45 / 100 ))
    log "part c: 1 process, budget $b1 s"
    multi=(--device "$DEVICE" "${size[@]}" --out "$RES" --trl off --trainers dyme --mix explore --warmup 2 --steps 5
           --compile-update "$MULTI_COMPILE" --compile-cache-dir "$COMPILE_CACHE" --peak off)
    timeout -k 5 $(( b1 + 20 )) "$PY" bench/throughput.py "${multi[@]}" --label ddp1 --budget-s "$b1" \
      > "$RES/ddp1.log" 2>&1 || log "part c: 1 process ended with rc $? (see ddp1.log)"
    pack || true
    b2=$(( $(left "$NEED_D") - 15 ))
    if [[ ! -f "$RES/throughput-ddp1.json" ]]; then skip c-multi-2 "the 1-process baseline wrote nothing"
    elif (( b2 < 40 )); then skip c-multi-2 "needs about 40 s; $b2 s left"
    else
      log "part c: torchrun 2 processes, budget $b2 s"
      timeout -k 5 $(( b2 + 10 )) "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 bench/throughput.py \
        "${multi[@]}" --label ddp2 --ddp-baseline "$RES/throughput-ddp1.json" --budget-s "$b2" \
        > "$RES/ddp2.log" 2>&1 || log "part c: 2 processes ended with rc $? (see ddp2.log)"
    fi
  fi
fi

pack || true

# --- part d: full DyME (refiner, checker, text rewards) against mode switching alone
if ! want d; then skip d-full-vs-switch "not in PARTS ($PARTS)"
else
  b=$(left 0)
  if (( b < NEED_D - 20 )); then skip d-full-vs-switch "needs about $(( NEED_D - 20 )) s; $b s left"
  else
    log "part d: dyme-full vs dyme-switch, budget $b s"
    timeout -k 10 $(( b + 20 )) "$PY" bench/throughput.py --device "$DEVICE" "${size[@]}" --out "$RES" \
      --label full-vs-switch --trl off --trainers dyme-full,dyme-switch --mix memorize75,mixed --warmup 2 --steps 3 \
      --static-cache off --compile-update off --peak off --budget-s "$b" \
      > "$RES/full-vs-switch.log" 2>&1 || log "part d ended with rc $? (see full-vs-switch.log)"
  fi
fi

# --- summary: what each part measured, beside the plan's wall time
{
  echo "# bench/gpu_perf.sh: $(tr '\n' ' ' < "$RES/gpu.txt")"
  echo
  echo "Plan wall time: $(( $(date +%s) - T0 )) s (budget $BUDGET s). Skipped parts:"
  for f in "$RES"/skipped-*.txt; do [[ -f "$f" ]] && echo "- $(basename "$f" .txt | sed 's/^skipped-//'): $(cat "$f")"; done
  echo
  [[ -f "$RES/decode-$SHAPE.md" ]] && { echo "## 0. Decode step"; cat "$RES/decode-$SHAPE.md"; echo; }
  [[ -f "$RES/decode-profile-$SHAPE.md" ]] && { echo "## 0. Decode step profile"; cat "$RES/decode-profile-$SHAPE.md"
    echo; }
  echo "## a. Time to first step (compile)"
  "$PY" bench/compile_time.py --summarize "$RES" 2>/dev/null || echo "(no result)"
  echo
  [[ -f "$RES/throughput-update-skip75.md" ]] && { echo "## b. Update, skip75, vs TRL"; cat "$RES/throughput-update-skip75.md"; echo; }
  [[ -f "$RES/throughput-ddp2.md" ]] && { echo "## c. 2-GPU scaling"; cat "$RES/throughput-ddp2.md"; echo; }
  [[ -f "$RES/throughput-full-vs-switch.md" ]] && { echo "## d. Full DyME vs mode switching alone"
    cat "$RES/throughput-full-vs-switch.md"; echo; }
  true
} > "$OUT/perf-summary.md" 2>&1
cp "$OUT/perf-summary.md" "$RES/"
log "plan finished in $(( $(date +%s) - T0 )) s"
cat "$OUT/perf-summary.md"
