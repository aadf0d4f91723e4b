"""One timed DyME step per model family at its real shape, random weights (issue "Real inputs", GPU part).

Shapes (from the public configs): SmolVLM-256M (Idefics3: Llama 576 x 30, SigLIP-B/16 at 512 px, pixel
shuffle 4 = 64 image tokens), LLaVA-OneVision-0.5B (Qwen2-0.5B: 896 x 24, SigLIP-so400m/14 at 384 px, anyres
tiles, 729 tokens a tile), Qwen2-VL-2B (Qwen2-1.5B: 1536 x 28, ViT 1280 x 32 /14 with 2x2 merge; 448 px images =
256 image tokens). Real vocabularies (49,280 / 151,647 / 151,936 rows); the tokenizer is a small BPE trained on the
synthetic charts' text (ids above its size decode to nothing, which only the reward sees).

Every step: K=8 completions for each of 8 prompts, 128 new tokens (`train.ignore_eos`, so every completion is full
length), bf16 weights, the trainer's own loop (`DymeTrainer.train_step`), scored by the bench's reward table with
the "explore" mix (bench/common.py `ControlledRewards`: half of every group right) so that all 64 rollouts reach
the update: the heaviest DyME update. The frozen-vision
cache exists for Idefics3 only (families.py); LLaVA-OneVision and Qwen2-VL run their vision tower per row.

Each family's result is written to `--out/family-<name>.json` as soon as it is measured.

  python bench/family_step.py --device cuda --out OUT                     (the GPU plan, about 4 minutes)
  python bench/family_step.py --device cpu --shape tiny --new-tokens 8 --k 2 --prompts 2 --out /tmp/fs  (smoke)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ACCURACY_ONLY, ControlledRewards, sync  # noqa: E402
from dyme_core.config import DataConfig, InitModelConfig, SynthConfig, load_config  # noqa: E402
from dyme_core.data.loaders import load_dataset  # noqa: E402
from dyme_core.data.synth import synthesize  # noqa: E402
from dyme_core.families import get_family, mrope_section  # noqa: E402
from dyme_core.models import ANSWER_FLAG, DIRECT_INSTRUCTION, REASON_INSTRUCTION, save_model, train_tokenizer  # noqa: E402
from dyme_core.refiner import rule_refine  # noqa: E402
from dyme_core.trainer import DymeTrainer  # noqa: E402

# Real shapes. image: the side of the square chart images fed to the processor.
SHAPES: dict[str, dict[str, Any]] = {
    "idefics3": {"label": "SmolVLM-256M", "image": 512, "patch": 16, "scale": 4, "vocab": 49280,
                 "text": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                          "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0},
                 "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12}},
    "llava_onevision": {"label": "LLaVA-OneVision-0.5B", "image": 384, "patch": 14, "scale": 2, "vocab": 151647,
                        "text": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                 "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0},
                        "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
                                   "num_attention_heads": 16}},
    "qwen2_vl": {"label": "Qwen2-VL-2B", "image": 448, "patch": 14, "scale": 2, "vocab": 151936,
                 "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1000000.0},
                 "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}},
}
DERIVED = ("head_dim", "layer_types", "max_window_layers")
TIED = {"idefics3": False, "llava_onevision": True, "qwen2_vl": True}  # as the released checkpoints


def tiny_shape(family: str) -> dict[str, Any]:
    """A CPU-sized stand-in with the same code path (the smoke test of this script)."""
    s = SHAPES[family]
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": s["text"]["rope_theta"]}
    vision = ({"depth": 1, "embed_dim": 32, "num_heads": 1, "mlp_ratio": 2} if family == "qwen2_vl" else
              {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1})
    image = {"idefics3": 64, "llava_onevision": 56, "qwen2_vl": 56}[family]
    return {**s, "label": f"{s['label']} (tiny)", "image": image, "vocab": 2048, "text": text, "vision": vision}


def build(family: str, shape: dict[str, Any], texts: list[str], out: Path, device: torch.device) -> Path:
    """Random weights of `shape`, initialised on `device` in bf16, saved with the family's processor."""
    fam = get_family(family)
    corpus = sorted(set(texts)) + [REASON_INSTRUCTION, DIRECT_INSTRUCTION, ANSWER_FLAG, "User:", "Assistant:"]
    tokenizer = train_tokenizer(corpus, 2048, family)
    small = InitModelConfig(family=family, vocab_size=2048, hidden_size=32, num_layers=1, num_heads=2,
                            vision_hidden_size=32, vision_layers=1, image_size=shape["image"],
                            patch_size=shape["patch"], scale_factor=shape["scale"])
    processor, tiny = fam.build_tiny(small, tokenizer)  # the family's processor at the real image settings
    config = tiny.config
    del tiny
    # derived from the tiny sizes when saved: let the real sizes derive them again
    text = {**{k: v for k, v in config.text_config.to_dict().items() if k not in DERIVED}, **shape["text"],
            "vocab_size": shape["vocab"], "tie_word_embeddings": TIED[family]}
    if family == "qwen2_vl":
        head_dim = shape["text"]["hidden_size"] // shape["text"]["num_attention_heads"]
        text["rope_parameters"] = {**text["rope_parameters"], "rope_theta": shape["text"]["rope_theta"],
                                   "mrope_section": mrope_section(head_dim)}
        vision = {**config.vision_config.to_dict(), **shape["vision"], "hidden_size": shape["text"]["hidden_size"]}
    else:
        vision = {**config.vision_config.to_dict(), **shape["vision"]}
    config = type(config)(**{**config.to_dict(), "text_config": text, "vision_config": vision,
                             "tie_word_embeddings": TIED[family]})
    torch.manual_seed(0)
    with torch.device(device):
        model = fam_model_class(family)(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_model(model, processor, out)
    del model
    return out


def fam_model_class(family: str) -> type:
    from transformers import (
        Idefics3ForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    return {"idefics3": Idefics3ForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration,
            "qwen2_vl": Qwen2VLForConditionalGeneration}[family]


def run_family(family: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    shape = SHAPES[family] if args.shape == "real" else tiny_shape(family)
    work = Path(args.work) / family
    t0 = time.perf_counter()
    data = synthesize(SynthConfig(out_dir=str(work / "data"), n_train=max(16, args.prompts * 2), n_val=1, n_test=1,
                                  image_size=max(64, shape["image"])))
    ds = load_dataset(DataConfig(path=str(data)))
    texts = [t for s in ds.samples for t in (s.question, s.answer, s.hint or "", rule_refine(s)) if t]
    model_dir = build(family, shape, texts, work / "model", device)
    build_s = time.perf_counter() - t0
    cfg = load_config(None, [
        f"data.path={data}", f"model.name_or_path={model_dir}", "model.dtype=bfloat16",
        f"train.output_dir={work / 'run'}", "train.refined=", "train.template_pool=", "train.report_to=[none]",
        "train.progress_bar=false", f"train.batch_size={args.prompts}", f"train.num_generations={args.k}",
        f"train.max_new_tokens={args.new_tokens}", f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.warmup + args.steps}", "train.bf16=auto", f"train.static_cache={args.static_cache}",
        "train.ignore_eos=true", ACCURACY_ONLY,
    ])
    trainer = DymeTrainer(cfg, ds, device=device, rewards=ControlledRewards("explore").table())
    n_params = sum(p.numel() for p in trainer.model.parameters())
    first = trainer.samples[: args.prompts]  # the prompts' lengths, image tokens included, as the family encodes them
    prompts = trainer.family.encode(trainer.processor, [s.question for s in first],
                                    [ds.load_image(s) for s in first], cfg.train.prompt_style)
    prompt_lens = [len(p) for p in prompts.prompt_ids]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        m = trainer.train_step()
        sync(device)
        rec = {"step_s": time.perf_counter() - t, "generation_s": m["time/generation_s"],
               "update_s": m["time/update_s"], "reward_s": m["time/reward_s"], "rows_kept": m["rows/kept"],
               "tokens": m["tokens"], "peak_mb": m["memory/peak_mb"], "warmup": i < args.warmup}
        steps.append(rec)
        print(family, json.dumps(rec), flush=True)
    timed = [s for s in steps if not s["warmup"]]

    def mean(key: str) -> float:
        return sum(s[key] for s in timed) / len(timed)

    result = {
        "family": family, "shape": shape["label"], "params_m": n_params / 1e6, "image_px": shape["image"],
        "prompt_tokens_mean": sum(prompt_lens) / len(prompt_lens), "k": args.k, "prompts": args.prompts,
        "new_tokens": args.new_tokens, "micro_batch": args.micro_batch, "mix": "explore", "build_s": build_s,
        "static_cache": args.static_cache == "true",
        "step_s": mean("step_s"), "generation_s": mean("generation_s"), "update_s": mean("update_s"),
        "reward_s": mean("reward_s"), "rows_kept": mean("rows_kept"),
        "decode_ms_per_token_step": 1000 * mean("generation_s") / args.new_tokens,
        "peak_gb": max(s["peak_mb"] for s in steps) / 1024, "steps": steps,
    }
    del trainer, prompts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default="idefics3,llava_onevision,qwen2_vl")
    p.add_argument("--shape", default="real", choices=("real", "tiny"))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--static-cache", default="false", choices=("false", "true"),
                   help="train.static_cache: static KV cache, compiled decode step (compiles in the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--work", default="/tmp/dyme-family-bench")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    import transformers

    env = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    (out / "family-env.json").write_text(json.dumps(env, indent=2))
    failed = 0
    for family in args.families.split(","):
        try:
            result = {**run_family(family, args, device), **env}
        except Exception as exc:  # one family's failure must not lose the others' results
            failed += 1
            result = {"family": family, "error": f"{type(exc).__name__}: {exc}", **env}
            import traceback

            traceback.print_exc()
        suffix = "-static" if args.static_cache == "true" else ""
        (out / f"family-{family}{suffix}.json").write_text(json.dumps(result, indent=2))
        print("RESULT", json.dumps({k: v for k, v in result.items() if k != "steps"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
