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

Run (CPU check):  python bench/decode_step.py --device cpu --shape tiny --new-tokens 16 --repeats 1
Run (GPU plan):   bash bench/gpu_decode.sh   (SmolVLM-256M shape, 8 prompts x K=8 = 64 rows x 128 tokens)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench` and `dyme_core`

from bench.common import SHAPES, count_params  # noqa: E402
from bench.throughput import decode_floor, prepare_work, sync  # noqa: E402
from dyme_core import generation  # noqa: E402
from dyme_core.config import ModelConfig, TrainConfig  # noqa: E402
from dyme_core.families import family_of  # noqa: E402
from dyme_core.models import GPU_ATTENTION, attention_kernels, load_model, load_processor, suppressed_token_ids  # noqa: E402

METHODS = ("complete", "captured", "captured-compiled", "hf-dynamic", "hf-static")


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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


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
    work = prepare_work(argparse.Namespace(work=args.work, shape=args.shape, samples=args.samples, seed=args.seed),
                        device, rank=0)
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
    greedy_ref: torch.Tensor | None = None
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
                    greedy = run(method, args.new_tokens, do_sample=False)
                    if greedy_ref is None and method == "complete":
                        greedy_ref = greedy
                    if greedy_ref is not None:
                        rec["greedy_agree"] = float((greedy == greedy_ref).float().mean())
                except Exception as e:
                    rec["greedy_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        except Exception as e:  # recorded, and the other methods still run
            rec["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc()
        print(f"{name}: {json.dumps(rec)}", flush=True)
        write()
    write()
    print((out / f"decode-{args.label}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
