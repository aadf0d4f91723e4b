"""Where a default CPU training step spends its time, generation first (issue 11, item 5).

Builds the trainer exactly as `dyme train` does (params.yaml + overrides, the ingested dataset, the refined
targets), then:

1. times `--steps` real training steps after `--warmup` untimed ones: step, generation, reward and update
   seconds, generated tokens, ms per generated token and ms per decode step (generation seconds over the
   decode positions of the step: prefill and vision tower included, an upper bound);
2. splits one training step's generation by forward hooks into vision tower, connector + embeddings, text model
   prefill, text model decode steps and LM head; the rest of the generation's wall time is the decode loop's own
   per-step work (input preparation, logits processors, sampling, stopping checks, cache bookkeeping);
3. records one training step's generation with `torch.profiler` (the top operators by self CPU time);
4. times evaluation's greedy `generate_answers` on one `evaluate.batch_size` batch of the test split with
   `evaluate.max_new_tokens`, and projects the whole evaluation;
5. projects the default `dvc repro` time: train.max_steps x the median step + the projected evaluation +
   `--other-stages-s` (ingest, validate, init_model, refine and register, measured apart), from wall seconds
   and from the process's CPU seconds (on a machine shared with other work, wall time is inflated; with one
   torch thread the CPU seconds are what an idle machine takes).

The trainer is used through its public entry points only (`DymeTrainer(...)`, `train_step()`); what belongs to
the generation is told apart by forward hooks on the model (`GenerationWindow`): a step's generation runs from
its first forward without gradients to the update's first forward with them, and each LM-head call without
gradients is one decode position. Each result file is rewritten as soon as its figure is measured
(`<label>.json`, `<label>-ops.txt`).

Run (the CPU default, 1-2 minutes):
  python bench/cpu_generation.py --label tiny --out bench/results/cpu-profile
The ~20M-parameter shape of the coming pretrained default (random weights):
  dyme init-model --config params.yaml init_model.out_dir=/tmp/m20 init_model.hidden_size=384 \
    init_model.num_layers=6 init_model.num_heads=6 init_model.vision_hidden_size=256 init_model.vision_layers=6 \
    init_model.image_size=224 init_model.patch_size=16 init_model.scale_factor=2 init_model.vocab_size=2048
  python bench/cpu_generation.py --label m20 --out bench/results/cpu-profile model.name_or_path=/tmp/m20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `dyme_core`

from dyme_core.config import load_config  # noqa: E402
from dyme_core.data.ingest import open_dataset  # noqa: E402
from dyme_core.evaluate import generate_answers  # noqa: E402
from dyme_core.models import load_model, load_processor  # noqa: E402
from dyme_core.trainer import DymeTrainer, load_refined  # noqa: E402


class ModuleTimer:
    """Wall time inside chosen submodules during generation (forwards without gradients), by forward pre/post hooks
    (CPU: no asynchronous kernels)."""

    def __init__(self, modules: dict[str, torch.nn.Module], text_model: torch.nn.Module | None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, mod in modules.items():
            self._hook(name, mod)
        if text_model is not None:  # prefill (many positions) and decode (one position) apart
            self._handles.append(text_model.register_forward_pre_hook(self._text_pre, with_kwargs=True))
            self._handles.append(text_model.register_forward_hook(self._text_post))

    def _hook(self, name: str, mod: torch.nn.Module) -> None:
        def pre(*_: Any) -> None:
            if not torch.is_grad_enabled():
                self._start[name] = time.perf_counter()

        def post(*_: Any) -> None:
            if name in self._start:
                self.seconds[name] += time.perf_counter() - self._start.pop(name)
                self.calls[name] += 1

        self._handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def _text_pre(self, _mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():  # the update
            return
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        self._text_kind = "text model: prefill" if x is not None and x.shape[1] > 1 else "text model: decode step"
        self._start["text"] = time.perf_counter()

    def _text_post(self, *_: Any) -> None:
        if "text" in self._start:
            self.seconds[self._text_kind] += time.perf_counter() - self._start.pop("text")
            self.calls[self._text_kind] += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def parts_of(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], torch.nn.Module | None]:
    """The modules timed apart: vision tower, connector, LM head; and the text model (embeddings inside)."""
    inner = getattr(model, "model", model)
    parts = {"vision tower": getattr(inner, "vision_model", None) or getattr(inner, "vision_tower", None)
             or getattr(inner, "visual", None),
             "connector": getattr(inner, "connector", None) or getattr(inner, "multi_modal_projector", None),
             "lm head": model.get_output_embeddings()}
    text = getattr(inner, "text_model", None) or getattr(inner, "language_model", None)
    return {k: v for k, v in parts.items() if v is not None}, text


class GenerationWindow:
    """A training step's generation, told apart by forward hooks on the model: it opens at the step's first forward
    without gradients and closes at the first forward with them (the update's). Inside it: the process CPU
    seconds, the LM-head calls (one per decode position; `decode_steps`), and `profiler` running when given."""

    def __init__(self, model: torch.nn.Module):
        self.profiler: Any = None
        self._handles = [model.register_forward_pre_hook(self._model_pre),
                         model.get_output_embeddings().register_forward_hook(self._head)]
        self.reset()

    def reset(self, profiler: Any = None) -> None:
        self.profiler, self.state, self.cpu0, self.cpu_s, self.decode_steps = profiler, "before", 0.0, 0.0, 0

    def _model_pre(self, *_: Any) -> None:
        if self.state == "before" and not torch.is_grad_enabled():
            self.state, self.cpu0 = "open", time.process_time()
            if self.profiler is not None:
                self.profiler.start()
        elif self.state == "open" and torch.is_grad_enabled():
            self.close()

    def _head(self, *_: Any) -> None:
        if self.state == "open" and not torch.is_grad_enabled():
            self.decode_steps += 1

    def close(self) -> None:
        """Ends the window (also after a step whose update forwarded nothing: then the step's end closes it)."""
        if self.state == "open":
            self.cpu_s = time.process_time() - self.cpu0
            if self.profiler is not None:
                self.profiler.stop()
        self.state = "closed"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("--label", required=True, help="name of the result files")
    ap.add_argument("--out", default="bench/results/cpu-profile")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--eval-batches", type=int, default=1, help="timed evaluation batches")
    ap.add_argument("--other-stages-s", type=float, default=0.0,
                    help="seconds of the DAG's stages other than train and evaluate (for the projection)")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler record")
    ap.add_argument("--decode", choices=("complete", "generate"), default="complete",
                    help="complete: the trainer's and evaluation's decode loop (generation.complete, one prefill per "
                         "prompt); generate: HF generate with K prefills per prompt, the path before it (same tokens)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (as the CLI takes them)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="dyme-cpu-gen-")
    cfg = load_config(args.config, [f"train.output_dir={tmp}/run", "train.checkpoint_dir=", *args.overrides])
    dataset = open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels)
    trainer = DymeTrainer(cfg, dataset, load_refined(cfg.train.refined), device="cpu")
    if args.decode == "generate":  # the adapter instance is shared: evaluation below takes the same path
        trainer.family.prefill_once = False
    window = GenerationWindow(trainer.model)
    t = cfg.train
    n_params = sum(p.numel() for p in trainer.model.parameters())
    result: dict[str, Any] = {
        "label": args.label, "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
        "threads": torch.get_num_threads(), "decode": args.decode, "command": " ".join(["python", *sys.argv]),
        "model": cfg.model.name_or_path, "params_m": round(n_params / 1e6, 2),
        "prompts": t.batch_size, "k": t.num_generations, "max_new_tokens": t.max_new_tokens,
    }
    path = out / f"{args.label}.json"

    def write() -> None:
        path.write_text(json.dumps(result, indent=2) + "\n")

    write()
    # 1. real training steps
    rows = []
    for i in range(args.warmup + args.steps):
        window.reset()
        c0 = time.process_time()
        m = trainer.train_step()
        step_cpu = time.process_time() - c0
        window.close()
        if i < args.warmup:
            continue
        gen = m["time/generation_s"]
        rows.append({"step_s": m["time/step_s"], "step_cpu_s": step_cpu, "generation_cpu_s": window.cpu_s,
                     "generation_s": gen, "reward_s": m["time/reward_s"],
                     "update_s": m["time/update_s"], "tokens": m["tokens"],
                     "decode_steps": window.decode_steps,
                     "ms_per_token": 1000 * gen / max(1.0, m["tokens"]),
                     "ms_per_decode_step": 1000 * gen / max(1, window.decode_steps),
                     "cpu_ms_per_token": 1000 * window.cpu_s / max(1.0, m["tokens"])})
        result["steps"] = rows
        result["median"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        result["generation_share"] = result["median"]["generation_s"] / result["median"]["step_s"]
        write()
        print(f"step {i}: {json.dumps(rows[-1])}", flush=True)
    # 2. one training step's generation split by module
    modules, text = parts_of(trainer.model)
    timer = ModuleTimer(modules, text)
    window.reset()
    wall = trainer.train_step()["time/generation_s"]
    window.close()
    timer.remove()
    split = dict(timer.seconds)  # the timed modules do not nest
    split["rest: prompt embeddings, the decode loop's own per-step work"] = wall - sum(split.values())
    result["generation_split"] = {"wall_s": wall, "seconds": split, "calls": dict(timer.calls)}
    write()
    print(json.dumps(result["generation_split"], indent=1), flush=True)
    # 3. torch.profiler over one training step's generation (started and stopped by the window's hooks)
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        window.reset(profiler=prof)
        trainer.train_step()
        window.close()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out / f"{args.label}-ops.txt").write_text(table + "\n")
        print("\n".join(table.splitlines()[:25]), flush=True)
    # 4. evaluation's greedy path
    e = cfg.evaluate
    samples = dataset.split(e.split)
    if e.limit:
        samples = samples[: e.limit]
    model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "lora_r": 0})
    model, processor = load_model(model_cfg, "cpu"), load_processor(model_cfg)
    times: list[float] = []
    cpu_times: list[float] = []
    for lo in range(0, min(len(samples), args.eval_batches * e.batch_size), e.batch_size):
        chunk = samples[lo: lo + e.batch_size]
        t0, c0 = time.perf_counter(), time.process_time()
        texts = generate_answers(model, processor, [dataset.load_image(s) for s in chunk],
                                 [s.question for s in chunk], e.max_new_tokens, e.prompt_style)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        n_tok = sum(len(processor.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts)
        result["evaluate"] = {"batch_s": times, "batch_cpu_s": cpu_times,
                              "projected_cpu_s": statistics.median(cpu_times) * -(-len(samples) // e.batch_size),
                              "batch_size": e.batch_size, "max_new_tokens": e.max_new_tokens,
                              "test_samples": len(samples),
                              "projected_s": statistics.median(times) * -(-len(samples) // e.batch_size),
                              "ms_per_decode_step": 1000 * statistics.median(times) / e.max_new_tokens,
                              "tokens_decoded_last_batch": n_tok}
        write()
    # 5. the default dvc repro, projected
    if "median" not in result or "evaluate" not in result:
        return 0
    train_s = t.max_steps * result["median"]["step_s"]
    train_cpu_s = t.max_steps * result["median"]["step_cpu_s"]
    ev = result["evaluate"]
    # wall: as measured on this (shared) machine; cpu: the process's CPU seconds, what an idle machine would take
    # at one thread
    result["projection"] = {"train_s": train_s, "evaluate_s": ev["projected_s"], "other_stages_s": args.other_stages_s,
                            "dvc_repro_s": train_s + ev["projected_s"] + args.other_stages_s,
                            "train_cpu_s": train_cpu_s, "evaluate_cpu_s": ev["projected_cpu_s"],
                            "dvc_repro_cpu_s": train_cpu_s + ev["projected_cpu_s"] + args.other_stages_s}
    write()
    print(json.dumps(result["median"]), json.dumps(result["projection"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
