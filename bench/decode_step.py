"""Decode step: ms per token step of four ways to sample K completions per prompt, beside the memory floor
(issue 11, item 1; BENCHMARKS.md section 1).

One process builds the random model of `--shape` (bench/common.py) and a synthetic chart set (the cache of
bench/throughput.py), encodes `--prompts` prompts with their images and samples `--k` completions each, exactly
`--new-tokens` tokens (eos suppressed), with the trainer's sampling settings (temperature 1, no top-k/top-p), by:

  hf-dynamic   HF `generate(num_return_sequences=K)`, dynamic KV cache (TRL's default generation);
  hf-static    HF `generate` with `cache_implementation="static"` (HF compiles its decode step on GPU; cache
               length rounded up to 128, as `train.static_cache` does);
  complete     `generation.complete`: one prefill per prompt, the eager decode loop (the CPU default);
  captured     `generation.complete_static`: static KV cache, rows in a bucket, the step replayed as a CUDA graph
               (`train.cuda_graph_decode`); on the CPU the same step runs uncaptured (`static-cpu`);
  captured-compiled  the same with the step's forward through torch.compile before the capture (`compile_step`:
               fused kernels; its one-time compile is in warmup_s); on the CPU compiled, uncaptured.

ms per decode step = (seconds for new-tokens tokens - seconds for 1 token) / (new-tokens - 1), medians of
`--repeats` runs each: the prefill (and the vision tower) cancels out. Warm-up calls (HF's compile, the graph's
capture) are timed apart as `warmup_s`; `capture_s` is what capturing the graphs took. The floor: the bytes a decode
step must read (text-decoder weights + LM head + the KV cache of every row at the mean length over the steps,
`bench.throughput.decode_floor`) at `--bandwidth-tbs`. `greedy_agree` is the fraction of greedy tokens the method
shares with `complete` (bf16 kernels may differ in rounding on the GPU; equal on the CPU).

Results (decode-<label>.json, decode-<label>.md) are rewritten after every measurement, so a run killed at its time
limit keeps what it measured; a method that fails is recorded with its error and the others still run.

--profile: after the timed methods, `PROFILE_STEPS` decode steps under torch.profiler (CUDA and CPU activities on a
GPU, CPU on the CPU) of (a) the eager static-cache step (`complete_static` uncaptured: the kernels the captured
graph replays), (b) the captured step (graph replay; GPU only) and (c) the captured compiled step (`compile_step`;
GPU only; torch.compile's fused kernels, `triton_*`, count as normalisation when they compute an rsqrt, else as
elementwise). Each token is a `decode_step` range (around
`generation.CapturedDecode.__call__`, added while profiling); a kernel belongs to the step whose range launched it.
Per part: kernels per decode step (on the CPU: aten ops), their time per step (CPU: self time) by category
(`CATEGORIES`), the top 15 kernels, and the share of the decode span the device is busy (GPU: union of the steps'
kernels over first kernel start .. last kernel end; CPU: op time over the steps' ranges). The eager part runs with
ranges around the model's forward and its norm layers, so that normalisation and sampling (the step outside the
forward) are told apart from other elementwise kernels; a graph replay has no such ranges, so its kernels take the
eager step's categories by position when the two steps have as many kernels, and categories from kernel names
otherwise. Where CUPTI reports no kernels inside the graph replay, the output says so. Results:
decode-profile-<label>.json and .md, rewritten after each part.

Run (CPU check):  python bench/decode_step.py --device cpu --shape tiny --new-tokens 16 --repeats 1 [--profile]
Run (GPU plan):   bash bench/gpu_decode.sh   (SmolVLM-256M shape, 8 prompts x K=8 = 64 rows x 128 tokens)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench` and `dyme_core`

from bench.common import SHAPES, count_params, decode_floor, median, prepare_work, sync  # noqa: E402
from dyme_core import generation  # noqa: E402
from dyme_core.config import ModelConfig, TrainConfig  # noqa: E402
from dyme_core.families import family_of  # noqa: E402
from dyme_core.models import GPU_ATTENTION, attention_kernels, load_model, load_processor, suppressed_token_ids  # noqa: E402

METHODS = ("complete", "captured", "captured-compiled", "hf-dynamic", "hf-static")
PROFILE_STEPS = 8  # decode steps profiled per part: a handful keeps the trace (about 1,300 kernels a step) small
CATEGORIES = ("matmul/GEMM", "attention", "normalisation", "elementwise/activation", "sampling", "copies/cache writes",
              "other")
# profiler ranges `labelled_ranges` adds: each token's step, the model's forward, each normalisation layer
STEP_RANGE, MODEL_RANGE, NORM_RANGE = "decode_step", "model_forward", "norm"
RANGES = (STEP_RANGE, MODEL_RANGE, NORM_RANGE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                    help="Device (cuda: bf16 weights, as the trainer loads them).")
    ap.add_argument("--shape", default="smolvlm-256m", choices=sorted(SHAPES), help="Model shape (bench/common.py).")
    ap.add_argument("--prompts", type=int, default=8, help="Prompts (each with its image).")
    ap.add_argument("--k", type=int, default=8, help="Completions per prompt: rows = prompts * k.")
    ap.add_argument("--new-tokens", type=int, default=128, help="Exactly this many tokens per completion (>= 2).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed runs per (method, length).")
    ap.add_argument("--methods", default=",".join(METHODS), help="Comma list from: " + ", ".join(METHODS))
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8,
                    help="Memory bandwidth (TB/s) for the floor (default: the H200's 4.8 TB/s spec).")
    ap.add_argument("--budget-s", type=float, default=0, help="Wall-clock budget; later methods are skipped (0: none).")
    ap.add_argument("--profile", action="store_true",
                    help=f"After the timed methods, profile {PROFILE_STEPS} decode steps of the eager static-cache "
                         "step and of the captured one (decode-profile-<label>.json/.md).")
    ap.add_argument("--samples", type=int, default=64, help="Synthetic samples built (the prompts are the first).")
    ap.add_argument("--seed", type=int, default=0, help="Seed for data, weights and sampling.")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: 1 on cpu, torch's on cuda).")
    ap.add_argument("--label", default="", help="Name of the result files (default: the shape).")
    ap.add_argument("--out", default="bench/out/decode", help="Where decode-<label>.json and .md go.")
    ap.add_argument("--work", default="/tmp/dyme-bench-work", help="Cache of models and data (shared with "
                                                                   "bench/throughput.py).")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (a decode step is the difference of a 1-token and an N-token run)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.label = args.label or args.shape
    return args


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def markdown(res: dict) -> str:
    meta, floor = res["meta"], res.get("floor")
    lines = [f"# Decode step: {meta['shape']}, {meta['rows']} rows x {meta['new_tokens']} new tokens",
             "", f"{meta['device_name']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}",
             "", "| method | ms / decode step | x floor | warm-up s | full generation s | 1-token s | greedy agree "
                 "| status |", "|---|---|---|---|---|---|---|---|"]
    for name, m in res["methods"].items():
        ms = m.get("ms_per_step")
        x = ms / floor["floor_ms"] if ms is not None and floor else None
        cells = [name, f"{ms:.3f}" if ms is not None else "-", f"{x:.1f}" if x is not None else "-",
                 " + ".join(f"{w:.1f}" for w in m.get("warmup_s", [])) or "-",
                 f"{m['full_s']:.3f}" if "full_s" in m else "-", f"{m['one_s']:.3f}" if "one_s" in m else "-",
                 f"{m['greedy_agree']:.3f}" if "greedy_agree" in m else "-", m["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    if floor:
        lines += ["", f"Floor: weights {floor['weight_bytes'] / 1e6:.0f} MB + KV cache "
                      f"{floor['kv_bytes_mean'] / 1e6:.0f} MB (mean length {floor['mean_cache_len']:.0f}) = "
                      f"{floor['floor_ms']:.3f} ms at {floor['bandwidth_tb_s']:.1f} TB/s."]
    if res.get("captured_graphs"):
        graphs = [f"{g['bucket']} rows x {g['capacity']} positions: {g['capture_s']:.2f} s"
                  for g in res["captured_graphs"]]
        lines.append(f"Captured graphs (capture seconds): {'; '.join(graphs)}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ profile
_GEMM = re.compile(r"gemm|gemv|aten::(?:mm|addmm|bmm|matmul|linear)\b|cutlass|nvjet|xmma|cublas|splitk", re.I)
_ATTENTION = re.compile(r"scaled_dot_product|attention|flash|fmha", re.I)
_COPY = re.compile(r"copy|memcpy|memset|index|aten::cat\b|catarray|clone|contiguous|(?<!masked_)fill|gather|scatter"
                   r"|embedding", re.I)
_SAMPLING = re.compile(r"softmax|exponential|distribution|argmax|multinomial|topk|sort|cumsum", re.I)
_ELEMENTWISE = re.compile(r"elementwise|reduce|aten::(?:add|sub|mul|div|neg|pow|rsqrt|sqrt|exp|silu|gelu|sigmoid|tanh"
                          r"|mean|sum|cos|sin|where|masked_fill|clamp|logical_and|logical_not|ne|eq|lt|gt|any|relu|isin)"
                          r"_?(?![a-z])", re.I)


def categorize(name: str, context: frozenset[str] | None) -> str:
    """The CATEGORIES entry of a kernel (GPU) or an aten op (CPU).

    name: the kernel's name after its launching op's name (e.g. "aten::mm sm90_xmma_gemm_..."), or the op's name.
    context: the labelled profiler ranges its launch ran in (STEP_RANGE, MODEL_RANGE, NORM_RANGE); None where unknown
    (the kernels of a graph replay, launched by one cudaGraphLaunch).
    """
    ranges = context or frozenset()
    if NORM_RANGE in ranges:
        return "normalisation"
    if _ATTENTION.search(name):  # before GEMM: fused attention kernels may be named after cutlass
        return "attention"
    if _GEMM.search(name):
        return "matmul/GEMM"
    if context is not None and MODEL_RANGE not in ranges:  # the step outside the forward: the draw and bookkeeping
        return "copies/cache writes" if _COPY.search(name) else "sampling"
    if MODEL_RANGE in ranges and "softmax" in name.lower():  # eager attention's softmax
        return "attention"
    if "triton_" in name:  # torch.compile's fused kernels: a norm when it takes a reciprocal square root
        return "normalisation" if "rsqrt" in name else "elementwise/activation"
    if _COPY.search(name):
        return "copies/cache writes"
    if context is None and _SAMPLING.search(name):
        return "sampling"
    if "norm" in name.lower():
        return "normalisation"
    if _ELEMENTWISE.search(name):
        return "elementwise/activation"
    return "other"


@contextmanager
def labelled_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Profiler ranges around each token's step (STEP_RANGE: `generation.CapturedDecode.__call__`, the eager step or
    the graph replay, wrapped while profiling so the library's decode loop carries no profiler code), the model's
    forward (MODEL_RANGE) and each normalisation layer's (NORM_RANGE): what tells normalisation (HF's RMSNorm is a
    few elementwise ops) and sampling apart from other kernels."""
    handles = []
    step_call = generation.CapturedDecode.__call__

    def ranged_step(self: generation.CapturedDecode) -> None:
        with torch.profiler.record_function(STEP_RANGE):
            step_call(self)

    def label(module: torch.nn.Module, name: str) -> None:
        open_ranges: list[Any] = []

        def enter(*_: Any) -> None:
            open_ranges.append(torch.profiler.record_function(name).__enter__())

        def leave(*_: Any) -> None:
            open_ranges.pop().__exit__(None, None, None)

        handles.extend([module.register_forward_pre_hook(enter), module.register_forward_hook(leave)])

    label(model, MODEL_RANGE)
    for module in model.modules():
        if type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            label(module, NORM_RANGE)
    generation.CapturedDecode.__call__ = ranged_step
    try:
        yield
    finally:
        generation.CapturedDecode.__call__ = step_call
        for h in handles:
            h.remove()


def _ranges_above(event: Any) -> tuple[Any, frozenset[str]]:
    """The decode_step range a CPU event ran in (None if none) and the labelled ranges around it."""
    step, labels, node = None, set(), event
    while node is not None:
        if node.name in RANGES:
            labels.add(node.name)
            step = node if node.name == STEP_RANGE else step
        node = node.cpu_parent
    return step, frozenset(labels)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_summary(events: list, on_gpu: bool, reference: list[str] | None = None) -> tuple[dict, list[str]]:
    """Per decode step of a profiled generation: kernels (GPU) or aten ops (CPU), their time by category, the top 15
    and the device's busy share; and the categories of one step's kernels in launch order.

    GPU: a kernel belongs to the step whose range holds the CUDA call that launched it (same correlation id); its time
    is its duration. CPU: every aten op inside a step's range, its self time. reference: the categories of an eager
    step in launch order; the kernels of a graph replay (no ranges inside) take them by position when each replayed
    step has as many kernels, else categories from their names.
    """
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    steps = sorted((e for e in cpu if e.name == STEP_RANGE), key=lambda e: e.time_range.start)
    if not steps:
        return {"status": "error: no decode_step range in the trace"}, []
    index = {id(e): i for i, e in enumerate(steps)}
    units = []  # (step, name, name matched, context, start us, end us, time us)
    if on_gpu:
        launches = {e.id: e for e in cpu if e.name.startswith("cu")}  # CUDA runtime and driver calls, by correlation
        device = [e for e in events if e.device_type != DeviceType.CPU and e.name not in RANGES]  # not the GPU rows
        for k in device:
            launch = launches.get(k.id)
            step, context = _ranges_above(launch) if launch is not None else (None, frozenset())
            if step is None:
                continue
            op = launch.cpu_parent
            match = k.name if op is None or op.name == STEP_RANGE else f"{op.name} {k.name}"
            units.append((index[id(step)], k.name, match, None if "GraphLaunch" in launch.name else context,
                          k.time_range.start, k.time_range.end, k.time_range.elapsed_us()))
    else:
        for e in cpu:
            step, context = _ranges_above(e)
            if step is not None and e.name not in RANGES:
                units.append((index[id(step)], e.name, e.name, context, e.time_range.start, e.time_range.end,
                              e.self_cpu_time_total))
    n = len(steps)
    out: dict[str, Any] = {"status": "ok", "steps": n, "unit": "kernels" if on_gpu else "aten ops",
                           "host_ms_per_step": sum(e.time_range.elapsed_us() for e in steps) / n / 1e3}
    if not units:
        seen = sum(e.device_type != DeviceType.CPU and e.name not in RANGES for e in events)
        out["note"] = (f"CUPTI reported no kernels launched inside the {n} decode steps ({seen} device events in the "
                       "whole trace, none from a decode_step range): nothing to break down")
        out["kernels_per_step"] = 0
        return out, []
    per_step: dict[int, list] = defaultdict(list)
    for u in units:
        per_step[u[0]].append(u)
    for us in per_step.values():
        us.sort(key=lambda u: u[4])
    by_position = reference is not None and all(len(us) == len(reference) for us in per_step.values())
    categories: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    top: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for us in per_step.values():
        for pos, (_, name, match, context, _, _, t) in enumerate(us):
            cat = reference[pos] if by_position and context is None else categorize(match, context)
            categories[cat] += t
            top[(name, cat)][0] += t
            top[(name, cat)][1] += 1
    total = sum(u[6] for u in units)
    if on_gpu:  # the steps' kernels, first start to last end
        span = max(u[5] for u in units) - min(u[4] for u in units)
        busy = _union_us([(u[4], u[5]) for u in units])
    else:
        span = steps[-1].time_range.end - steps[0].time_range.start
        busy = total
    out.update(kernels_per_step=len(units) / n, time_ms_per_step=total / n / 1e3, span_ms_per_step=span / n / 1e3,
               busy_share=busy / span if span > 0 else None,
               categories_ms={c: t / n / 1e3 for c, t in categories.items()},
               categories_from="kernel names and the ranges they ran in" if reference is None
               else "the eager step's kernels, by position" if by_position else "kernel names")
    out["top"] = [{"name": name, "category": cat, "ms_per_step": t / n / 1e3, "calls_per_step": c / n,
                   "share": t / total} for (name, cat), (t, c) in sorted(top.items(), key=lambda kv: -kv[1][0])[:15]]
    if reference is not None and not by_position:
        out["note"] = (f"the replayed steps have {sorted({len(us) for us in per_step.values()})} kernels, the eager "
                       f"step {len(reference)}: categories from kernel names (normalisation and sampling counted as "
                       "elementwise)")
    last = per_step[max(per_step)]
    sequence = [categorize(match, context) for _, _, match, context, _, _, _ in last]
    return out, sequence


def profile_markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [f"# Decode step profile: {meta['shape']}, {meta['rows']} rows, {res['profile_steps']} decode steps a part",
             "", f"{meta['device_name']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}"]
    titles = {"eager": "Eager static-cache step (the kernels the captured graph replays)",
              "captured": "Captured step (CUDA graph replay)",
              "compiled": "Captured compiled step (compile_step: CUDA graph replay of the compiled forward)"}
    for part, p in res["parts"].items():
        lines += ["", f"## {titles[part]}", ""]
        if "busy_share_estimate" in p:
            lines += [f"GPU busy share estimated without the profiler: the eager step's kernel time over the timed "
                      f"captured step = {p['busy_share_estimate']:.0%}.", ""]
        if "categories_ms" not in p:
            lines.append(f"Status: {p['status']}." + (f" {p['note']}." if "note" in p else ""))
            continue
        where = "GPU" if p["unit"] == "kernels" else "CPU"
        busy = f"{p['busy_share']:.0%}" if p["busy_share"] is not None else "-"
        lines += [f"{p['kernels_per_step']:.0f} {p['unit']} per decode step, {p['time_ms_per_step']:.3f} ms of {where} "
                  f"time a step; the {where} is busy {busy} of the decode span ({p['span_ms_per_step']:.3f} ms a "
                  f"step); the host spends {p['host_ms_per_step']:.3f} ms a step in decode_step (profiler overhead "
                  f"included). Categories from {p['categories_from']}." + (f" Note: {p['note']}." if "note" in p
                                                                           else ""),
                  "", "| category | ms / step | share |", "|---|---|---|"]
        total = p["time_ms_per_step"]
        lines += [f"| {c} | {ms:.4f} | {ms / total:.1%} |" for c, ms in p["categories_ms"].items()]
        lines += ["", "| top kernels by time | category | ms / step | calls / step | share |", "|---|---|---|---|---|"]
        lines += [f"| `{k['name'][:120]}` | {k['category']} | {k['ms_per_step']:.4f} | {k['calls_per_step']:.1f} | "
                  f"{k['share']:.1%} |" for k in p["top"]]
    return "\n".join(lines) + "\n"


def run_profile(generate: Callable[[int, bool], Any], model: torch.nn.Module, device: torch.device, res: dict,
                write: Callable[[], None], captured_ms: float | None = None) -> None:
    """--profile: PROFILE_STEPS decode steps of the eager static step, then of the captured one and of the captured
    compiled one (GPU), each part written as soon as it is measured. generate(new_tokens, captured, compiled) runs
    `complete_static`; captured_ms: the timed
    ms per decode step of the captured method, for a busy share that needs no kernel of the replay (the same kernels
    as the eager step's, whose GPU time the profile has)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    reference = None
    for part, captured, compiled in (("eager", False, False), ("captured", True, False), ("compiled", True, True)):
        if captured and device.type != "cuda":
            res["parts"][part] = {"status": "skipped: a CUDA graph needs a CUDA device"}
            write()
            continue
        try:
            with attention_kernels(GPU_ATTENTION if device.type == "cuda" else None):
                torch.manual_seed(0)
                generate(1, captured, compiled)  # a graph is captured (or reused) before the profiler starts
                sync(device)
                with labelled_ranges(model), torch.profiler.profile(activities=activities) as prof:
                    generate(PROFILE_STEPS, captured, compiled)
                    sync(device)
            res["parts"][part], sequence = profile_summary(prof.events(), device.type == "cuda", reference)
            reference = reference or sequence or None  # the eager step's kernel order (a compiled one differs)
            eager_ms = res["parts"]["eager"].get("time_ms_per_step")
            if part == "captured" and captured_ms and eager_ms:
                res["parts"][part]["busy_share_estimate"] = eager_ms / captured_ms
        except Exception as e:  # recorded; the other part still runs
            message = str(e).splitlines()[0][:200] if str(e) else ""
            res["parts"][part] = {"status": f"error: {type(e).__name__}: {message}"}
            traceback.print_exc()
        write()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    args.work = str(Path(args.work))
    work = prepare_work(args.shape, args.work, args.samples, args.seed, device)
    model_cfg = ModelConfig(name_or_path=str(work.model_dir))
    model = load_model(model_cfg, device)
    model.eval()
    processor = load_processor(model_cfg)
    family = family_of(model.config)
    samples = work.dataset.split("train")[: args.prompts]
    if len(samples) < args.prompts:
        raise SystemExit(f"the synthetic set has {len(samples)} samples, fewer than --prompts {args.prompts}")
    batch = family.encode(processor, [s.question for s in samples], [work.dataset.load_image(s) for s in samples],
                          "reason")
    width = max(len(p) for p in batch.prompt_ids)
    pad = processor.tokenizer.pad_token_id
    eos = processor.tokenizer.eos_token_id
    ids = torch.full((args.prompts, width), pad, dtype=torch.long)
    attn = torch.zeros((args.prompts, width), dtype=torch.long)
    for i, p in enumerate(batch.prompt_ids):
        ids[i, width - len(p):] = p
        attn[i, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    vision = family.vision_inputs(batch, list(range(args.prompts)), device, model.dtype)
    # eos suppressed: every row decodes exactly the requested tokens
    suppress = sorted(set(suppressed_token_ids(model, processor)) | {eos})
    t = TrainConfig()
    sampling = {"temperature": t.temperature, "top_k": t.top_k, "top_p": t.top_p, "suppress_tokens": suppress,
                "eos_token_id": eos, "pad_token_id": pad}
    rows = args.prompts * args.k
    meta = {"shape": args.shape, "prompts": args.prompts, "k": args.k, "rows": rows, "new_tokens": args.new_tokens,
            "prompt_len": width, "repeats": args.repeats, "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "params_m": count_params(model)["total"] / 1e6,
            "bucket": generation.bucket_size(rows),
            "cache_capacity": generation.cache_capacity(width, args.new_tokens),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    static_len = -(-(width + args.new_tokens) // 128) * 128
    floor = decode_floor(model, rows, width, args.new_tokens, static_len, args.bandwidth_tbs * 1e12)
    res: dict[str, Any] = {"meta": meta, "floor": floor, "methods": {}}

    def write() -> None:
        res["meta"]["elapsed_s"] = time.perf_counter() - start
        if device.type == "cuda":
            res["captured_graphs"] = generation.captured_decodes(model)
            res["meta"]["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        (out / f"decode-{args.label}.json").write_text(json.dumps(res, indent=2))
        (out / f"decode-{args.label}.md").write_text(markdown(res))

    write()
    capture = device.type == "cuda"

    def run(method: str, n_new: int, do_sample: bool = True) -> torch.Tensor:
        common = {"max_new_tokens": n_new, "do_sample": do_sample, **sampling}
        if method == "complete":
            return generation.complete(model, ids, attn, k=args.k, **common, **vision)
        if method in ("captured", "captured-compiled"):
            # one cache capacity for the 1-token and the full runs: one graph (and one compile) per method
            return generation.complete_static(model, ids, attn, k=args.k, capture=capture,
                                              compile_step=method == "captured-compiled",
                                              capacity=meta["cache_capacity"], **common, **vision)
        extra = {"cache_implementation": "static", "max_cache_len": static_len} if method == "hf-static" else {}
        if not do_sample:  # generate's greedy search takes one sequence per input row: the prompts repeated K times
            extra.update(input_ids=ids.repeat_interleave(args.k, dim=0),
                         attention_mask=attn.repeat_interleave(args.k, dim=0),
                         **family.vision_inputs(batch, [r // args.k for r in range(rows)], device, model.dtype))
        else:
            extra.update(input_ids=ids, attention_mask=attn, num_return_sequences=args.k, **vision)
        with torch.no_grad():
            return model.generate(**common, **extra)[:, width:]

    # a rough cost of each method, to skip what would not fit the budget (seconds: cold warm-up + timed runs)
    cost = {"complete": 40, "captured": 40, "captured-compiled": 150, "hf-dynamic": 60, "hf-static": 120} \
        if device.type == "cuda" else {}
    greedy_of: dict[str, torch.Tensor] = {}  # each method's greedy tokens, compared with complete's once it has run
    for method in args.methods:
        name = method.replace("captured", "static-cpu") if not capture else method
        rec: dict[str, Any] = {"status": "running"}
        res["methods"][name] = rec
        left = args.budget_s - (time.perf_counter() - start) if args.budget_s else float("inf")
        if left < cost.get(method, 0):
            rec["status"] = f"skipped: {left:.0f} s left of the budget, about {cost[method]} s needed"
            write()
            continue
        try:
            with attention_kernels(GPU_ATTENTION if device.type == "cuda" else None):
                torch.manual_seed(args.seed)
                rec["warmup_s"] = [timed(lambda m=method: run(m, args.new_tokens), device),
                                   timed(lambda m=method: run(m, 1), device)]
                write()
                full, one = [], []
                for _ in range(args.repeats):
                    got: list[torch.Tensor] = []
                    full.append(timed(lambda m=method, g=got: g.append(run(m, args.new_tokens)), device))
                    one.append(timed(lambda m=method: run(m, 1), device))
                    if got[0].shape != (rows, args.new_tokens):
                        raise RuntimeError(f"{method} returned {tuple(got[0].shape)}, not {(rows, args.new_tokens)}")
                rec.update(full_s=median(full), one_s=median(one), full_runs_s=full, one_runs_s=one,
                           ms_per_step=(median(full) - median(one)) / (args.new_tokens - 1) * 1e3)
                rec["x_floor"] = rec["ms_per_step"] / floor["floor_ms"]
                rec["status"] = "ok"
                write()
                try:  # a side check: its failure leaves the timing standing
                    greedy_of[name] = run(method, args.new_tokens, do_sample=False)
                    if "complete" in greedy_of:  # this method, or every one before complete once it comes
                        for other, greedy in greedy_of.items():
                            res["methods"][other]["greedy_agree"] = float(
                                (greedy == greedy_of["complete"]).float().mean())
                except Exception as e:
                    rec["greedy_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        except Exception as e:  # recorded, and the other methods still run
            rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc()
        print(f"{name}: {json.dumps(rec)}", flush=True)
        write()
    write()
    print((out / f"decode-{args.label}.md").read_text())
    if args.profile:
        left = args.budget_s - (time.perf_counter() - start) if args.budget_s else float("inf")
        prof: dict[str, Any] = {"meta": meta, "profile_steps": PROFILE_STEPS, "parts": {}}

        def write_profile() -> None:
            (out / f"decode-profile-{args.label}.json").write_text(json.dumps(prof, indent=2))
            (out / f"decode-profile-{args.label}.md").write_text(profile_markdown(prof))

        def static(n_new: int, captured: bool, compiled: bool) -> torch.Tensor:
            return generation.complete_static(model, ids, attn, k=args.k, capture=captured, do_sample=True,
                                              compile_step=compiled,
                                              capacity=meta["cache_capacity"], max_new_tokens=n_new, **sampling,
                                              **vision)

        if left < (40 if device.type == "cuda" else 0):
            prof["parts"]["eager"] = {"status": f"skipped: {left:.0f} s left of the budget, about 40 s needed"}
            write_profile()
        else:
            captured_ms = res["methods"].get("captured", {}).get("ms_per_step")  # the timed captured step
            run_profile(static, model, device, prof, write_profile, captured_ms)
        print((out / f"decode-profile-{args.label}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
