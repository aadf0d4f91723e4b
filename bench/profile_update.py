"""Where DyME's update phase spends its time: forward+backward against optimizer, per mode mix and variant.

Builds the same random Idefics3 model and synthetic charts as bench/throughput.py, runs DyME steps on the
controlled mixes and times, CUDA-synchronised, the two halves of the update separately:
`fwd_bwd_s` (DymeTrainer._backward over the kept rows) and `optim_s` (gradient norm, clipping, AdamW step).
For each variant in `--variants` the trainer is switched in place between steps:

  current      the trainer as configured (train.compile_update as given by --compile-update: the regional
               compile of one decoder layer; --compile-cache-dir reuses an earlier run's compiled code)
  eager        the update run without torch.compile (generation unchanged)
  eager-cudnn  eager, and PyTorch's default attention-kernel order (cuDNN first on Hopper)

and, with `--profile`, one skip75 update of the first and last variant under torch.profiler: the top
kernels and operators by GPU and CPU time, and the share of the update's wall time the GPU was busy
(low = launch/host bound).

Run (GPU):  python bench/profile_update.py --device cuda --shape smolvlm-256m --out $OUT --profile
Run (CPU):  python bench/profile_update.py --device cpu --shape tiny --new-tokens 16 --steps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import MixState, Work, dyme_trainer, prepare_work, sync  # noqa: E402


def update_once(tr: Any, mix: str) -> dict[str, float]:
    """One DyME step with the update halves timed apart (same work as DymeTrainer.train_step)."""
    MixState.mix = mix
    m: dict[str, float] = defaultdict(float)
    tr.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(tr.t.seed * 7919 + tr.step)
    batch = tr._prepare([tr.samples[i] for i in tr._batch_indices(tr.step, 0)])
    rows, norm = tr._rl_rows(batch, m)
    sync(tr.device)
    t0 = time.perf_counter()
    with tr._update_mode():
        tr._backward(batch, rows, norm, m)
    sync(tr.device)
    t1 = time.perf_counter()
    tr._optimizer_step()
    sync(tr.device)
    t2 = time.perf_counter()
    tr.step += 1
    return {"rows": len(rows), "fwd_bwd_s": t1 - t0, "optim_s": t2 - t1, "update_s": t2 - t0,
            "generation_s": m["time/generation_s"]}


def profile_update(tr: Any, mix: str, out: Path, name: str) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    MixState.mix = mix
    m: dict[str, float] = defaultdict(float)
    tr.optimizer.zero_grad(set_to_none=True)
    batch = tr._prepare([tr.samples[i] for i in tr._batch_indices(tr.step, 0)])
    rows, norm = tr._rl_rows(batch, m)
    sync(tr.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof, tr._update_mode():
        tr._backward(batch, rows, norm, m)
        tr._optimizer_step()
        sync(tr.device)
    wall = time.perf_counter() - t0
    tr.step += 1
    ka = prof.key_averages()
    gpu_busy = sum(e.self_device_time_total for e in ka) / 1e6 if tr.device.type == "cuda" else 0.0
    sort = "self_cuda_time_total" if tr.device.type == "cuda" else "self_cpu_time_total"
    text = [f"{name}: {mix}, {len(rows)} rows, wall {wall:.4f} s (profiled), GPU busy {gpu_busy:.4f} s",
            ka.table(sort_by=sort, row_limit=30), ka.table(sort_by="cpu_time_total", row_limit=30)]
    (out / f"profile-{name}.txt").write_text("\n\n".join(text))
    return {"profiled_wall_s": wall, "gpu_busy_s": gpu_busy, "rows": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="smolvlm-256m")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="Timed steps per (variant, mix).")
    ap.add_argument("--warmup", type=int, default=2, help="Untimed steps per variant (compilation included).")
    ap.add_argument("--mix", default="explore,skip75")
    ap.add_argument("--variants", default="current,eager")
    ap.add_argument("--compile-update", default="auto", choices=("auto", "on", "off"),
                    help="train.compile_update of the 'current' variant (auto: on for cuda).")
    ap.add_argument("--compile-cache-dir", default="",
                    help="train.compile_cache_dir: torch's compile artifacts kept across runs ('' = none).")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/profile")
    ap.add_argument("--work", default="/tmp/dyme-bench-work")
    args = ap.parse_args()
    args.micro_batch, args.static_cache = 0, "on" if args.device == "cuda" else "off"
    if args.compile_update == "auto":
        args.compile_update = "on" if args.device == "cuda" else "off"
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work: Work = prepare_work(args, device, 0)
    tr = dyme_trainer(args, work, device)
    compiled, backends = tr.update_model, tr.attention_backends
    records: list[dict[str, Any]] = []
    variants = args.variants.split(",")
    for v in variants:
        tr.update_model = compiled if v == "current" else None
        tr.attention_backends = None if v == "eager-cudnn" else backends
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            update_once(tr, "explore")
            print(f"{v}: warm-up step {time.perf_counter() - t0:.1f} s", flush=True)
        for mix in args.mix.split(","):
            recs = [update_once(tr, mix) for _ in range(args.steps)]
            row = {"variant": v, "mix": mix, **{k: statistics.median(r[k] for r in recs) for k in recs[0]}}
            print(json.dumps(row), flush=True)
            records.append(row)
        if args.profile:
            update_once(tr, "skip75")  # shapes of this mix compiled before profiling
            prof = profile_update(tr, "skip75", out, v)
            print(json.dumps({"variant": v, **prof}), flush=True)
            records.append({"variant": v, "mix": "skip75-profiled", **prof})
    (out / f"profile-update-{args.shape}.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
