"""Time to first step of DyME's trainer, update eager or regionally compiled, cold or from a compile cache
(issue 11, item 2; dyme_core/regional.py).

One process = one measurement of what a user waits for: build the trainer (`DymeTrainer.__init__`: model load,
the compile cache's hot load) and run its first step (generation with its decode-step compile, the update with
its layer compile), then `--steps` steady steps. Time to first step = trainer init + first step; the first
step's generation and update seconds, less the steady medians, say which compile cost what. With
`--update compiled`, the steady steps are then repeated by a second trainer of the same weights with the update
eager (train.compile_update off) in the same process (`steady_update_eager`), and with `--same-process` a new
trainer is built in the same process and timed to its first step (warm: Dynamo's in-memory cache). Whether the
process started cold is for the caller to arrange: bench/gpu_perf.sh gives every process an empty
TORCHINDUCTOR_CACHE_DIR, so the only compiled code a process can reuse is what `--cache-dir`
(train.compile_cache_dir) holds; `cache_file_at_start` records whether it held any.

The model and data are bench/throughput.py's (`--work` cache, same shapes and controlled rewards; mix explore:
every group mixed, all K*prompts rows in the update). Building them is timed apart (`build_s`): a user loads a
model, the bench has to make one first. The result file (compile-<label>.json) is rewritten after every
measurement, so a process killed at its limit keeps what it measured. `--summarize DIR` writes
compile-summary.md from every compile-*.json in DIR.

Run (CPU check):  python bench/compile_time.py --device cpu --shape tiny --k 4 --prompts 4 --new-tokens 16 \
                    --update compiled --cache-dir /tmp/cc --label tiny-compiled-cold --same-process
Run (GPU plan):   bash bench/gpu_perf.sh   (part a)
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before the heavy imports: they are part of what a new process pays

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench` and `dyme_core`

from bench.common import SHAPES, prepare_work, sync  # noqa: E402
from bench.throughput import dyme_trainer  # noqa: E402
from dyme_core.regional import CompileCache  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--shape", default="smolvlm-256m", choices=sorted(SHAPES), help="Model shape (bench/common.py).")
    ap.add_argument("--k", type=int, default=8, help="Completions per prompt (K).")
    ap.add_argument("--prompts", type=int, default=8, help="Prompts per step.")
    ap.add_argument("--new-tokens", type=int, default=128, help="Exactly this many tokens per completion.")
    ap.add_argument("--update", default="compiled", choices=("compiled", "eager"),
                    help="train.compile_update on (regional) or off.")
    ap.add_argument("--cache-dir", default="", help="train.compile_cache_dir ('' = none).")
    ap.add_argument("--steps", type=int, default=3, help="Steady steps after the first.")
    ap.add_argument("--same-process", action="store_true",
                    help="Then a second trainer in the same process: its time to first step (warm).")
    ap.add_argument("--static-cache", default="off", choices=("on", "off"),
                    help="train.static_cache: off (the project's default; on CUDA the captured decode step, "
                         "train.cuda_graph_decode) or on (HF generate's compiled static-cache step).")
    ap.add_argument("--budget-s", type=float, default=0, help="Skip later measurements past this many seconds.")
    ap.add_argument("--samples", type=int, default=64, help="Synthetic training samples (prompts cycle).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="Name of the result file (default: <shape>-<update>).")
    ap.add_argument("--out", default="bench/out/compile", help="Where compile-<label>.json goes.")
    ap.add_argument("--work", default="/tmp/dyme-bench-work", help="Cache of models and data (bench/throughput.py's).")
    ap.add_argument("--summarize", default="", metavar="DIR",
                    help="Only write DIR/compile-summary.md from DIR/compile-*.json, then exit.")
    args = ap.parse_args(argv)
    # the fields bench.throughput.dyme_trainer reads
    args.compile_update = "on" if args.update == "compiled" else "off"
    args.compile_cache_dir = args.cache_dir
    args.dyme_decode = "hf-static" if args.static_cache == "on" else "captured"
    args.micro_batch = 0
    args.label = args.label or f"{args.shape}-{args.update}"
    return args


def timed_step(tr: Any, device: torch.device) -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    m = tr.train_step()
    sync(device)
    return {"step_s": time.perf_counter() - t0, "generation_s": m["time/generation_s"],
            "update_s": m["time/update_s"]}


def first_step(args: argparse.Namespace, work: Any, device: torch.device) -> tuple[Any, dict[str, float]]:
    """A new trainer and its first step: (trainer, {init_s, first step's seconds, time_to_first_step_s})."""
    sync(device)
    t0 = time.perf_counter()
    tr, _ = dyme_trainer(args, work, device)  # scored by the controlled mix explore
    sync(device)
    init_s = time.perf_counter() - t0
    rec = timed_step(tr, device)
    return tr, {"init_s": init_s, **{f"first_{k}": v for k, v in rec.items()},
                "time_to_first_step_s": init_s + rec["step_s"]}


def steady(tr: Any, device: torch.device, n: int, deadline: float) -> dict[str, float]:
    recs: list[dict[str, float]] = []
    for _ in range(n):
        if recs and time.perf_counter() + 1.5 * recs[-1]["step_s"] > deadline:
            break
        recs.append(timed_step(tr, device))
    return {k: statistics.median(r[k] for r in recs) for k in recs[0]} | {"n": len(recs)} if recs else {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + args.budget_s if args.budget_s > 0 else float("inf")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # as bench/throughput.py on the CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    cache_file = CompileCache(args.cache_dir, device.type).path if args.cache_dir else None
    result: dict[str, Any] = {
        "label": args.label, "shape": args.shape, "update": args.update, "k": args.k, "prompts": args.prompts,
        "new_tokens": args.new_tokens, "static_cache": args.static_cache, "cache_dir": args.cache_dir,
        "cache_file_at_start": bool(cache_file and cache_file.is_file()),
        "cache_file_bytes_at_start": cache_file.stat().st_size if cache_file and cache_file.is_file() else 0,
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(torch's default)"),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "date": dt.date.today().isoformat(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "import_s": start - T_PROCESS,
    }
    path = out / f"compile-{args.label}.json"

    def write() -> None:
        path.write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    work = prepare_work(args.shape, args.work, args.samples, args.seed, device)
    result["build_s"] = time.perf_counter() - t0
    write()
    tr, first = first_step(args, work, device)
    result.update(first)
    result["cache_file_bytes_after_first_step"] = (cache_file.stat().st_size if cache_file and cache_file.is_file()
                                                   else 0)
    write()  # the figure this process is for is on disk before anything else runs
    result["steady"] = steady(tr, device, args.steps, deadline)
    if result["steady"]:
        s = result["steady"]
        result["first_step_extra_s"] = {"generation": result["first_generation_s"] - s["generation_s"],
                                        "update": result["first_update_s"] - s["update_s"]}
    write()
    if args.update == "compiled" and time.perf_counter() < deadline:
        # the same process, a second trainer of the same weights with the update eager (train.compile_update off)
        eager, _ = dyme_trainer(argparse.Namespace(**{**vars(args), "compile_update": "off"}), work, device)
        steady(eager, device, 1, deadline)  # its first step: the captured decode of a new model
        result["steady_update_eager"] = steady(eager, device, args.steps, deadline)
        del eager
        write()
    if args.same_process:
        if time.perf_counter() + 2 * result["steady"].get("step_s", 0) + 10 > deadline:
            result["same_process"] = {"skipped": "time budget"}
        else:
            del tr
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tr, warm = first_step(args, work, device)
            result["same_process"] = warm
        write()
    result["wall_s"] = time.perf_counter() - T_PROCESS
    write()
    return result


def fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))


def summarize(folder: Path) -> str:
    """One Markdown table of every compile-*.json in `folder`, in the order the processes ran."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("compile-*.json"), key=lambda p: p.stat().st_mtime)]
    lines = ["| run | update | cache file at start | init s | first step s (gen / update) | time to first step s "
             "| steady step s (gen / update) | steady update eager s | same process: time to first step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, e, w = r.get("steady", {}), r.get("steady_update_eager", {}), r.get("same_process", {})
        first = (f"{fmt(r.get('first_step_s'))} ({fmt(r.get('first_generation_s'))} / {fmt(r.get('first_update_s'))})"
                 if "first_step_s" in r else "not reached")
        lines.append(f"| {r['label']} | {r['update']} | {'yes' if r['cache_file_at_start'] else 'no'} "
                     f"| {fmt(r.get('init_s'))} | {first} | {fmt(r.get('time_to_first_step_s'))} "
                     f"| {fmt(s.get('step_s'))} ({fmt(s.get('generation_s'))} / {fmt(s.get('update_s'))}) "
                     f"| {fmt(e.get('update_s'))} | {w.get('skipped') or fmt(w.get('time_to_first_step_s'))} |")
    if runs:
        r0 = runs[0]
        lines += ["", f"{r0['device_name']}, torch {r0['torch']}, transformers {r0['transformers']}, {r0['date']}; "
                  f"shape {r0['shape']}, K={r0['k']}, {r0['prompts']} prompts, {r0['new_tokens']} new tokens, "
                  f"static cache {r0['static_cache']}. Time to first step = trainer init + first step (model and "
                  "data build, and Python imports, not included: see build_s and import_s in the JSON)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        folder = Path(args.summarize)
        (folder / "compile-summary.md").write_text(summarize(folder))
        print((folder / "compile-summary.md").read_text())
        return 0
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("command",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
