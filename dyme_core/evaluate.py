"""Evaluation (`dyme evaluate`): greedy decoding on a split, predictions, metrics and plots.

Metrics (DESIGN.md section 6): relaxed accuracy overall and per question type, format rate, thinking
grounding score (the rule-based visual checker against the sample's facts) and mean thinking length
(characters). Writes predictions.jsonl, metrics.json and PNG plots to `evaluate.out_dir`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from dyme_core import generation
from dyme_core.checker import rule_thinking_score
from dyme_core.config import Config, EvaluateConfig, ModelConfig
from dyme_core.data.loaders import Dataset
from dyme_core.families import family_of
from dyme_core.models import (
    GPU_ATTENTION,
    attention_kernels,
    load_model,
    load_processor,
    suppressed_token_ids,
)
from dyme_core.rewards import accuracy_reward, direct_accuracy, format_reward, parse_completion

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: list[Image.Image],
    questions: list[str],
    max_new_tokens: int = EvaluateConfig.max_new_tokens,
    style: str = "reason",
    cuda_graph_decode: bool = True,
    prefixes: list[str] | None = None,
) -> list[str]:
    """Greedy completions, one per (image, question); the model family's adapter encodes the inputs.

    cuda_graph_decode: on a CUDA model, the decode step replays a CUDA graph (`generation.complete_static`).
    prefixes: a forced start of each answer, appended to its prompt (the completion continues it).
    """
    model.eval()
    family = family_of(model.config)
    batch = family.encode(processor, questions, images, style)
    tok = processor.tokenizer
    if prefixes is not None:
        batch.prompt_ids = [torch.cat([p, torch.tensor(tok(x, add_special_tokens=False)["input_ids"], dtype=p.dtype)])
                            for p, x in zip(batch.prompt_ids, prefixes, strict=True)]
    rows = list(range(len(questions)))
    # left-padded prompts (generation appends on the right) with the family's text and image inputs
    width = max(len(p) for p in batch.prompt_ids)
    ids = torch.full((len(rows), width), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(batch.prompt_ids):
        ids[i, width - len(p):] = p
        attn[i, width - len(p):] = 1
    ids, attn = ids.to(model.device), attn.to(model.device)
    text = family.text_inputs(batch, rows, [0] * len(rows), width, model.device)
    settings = {"max_new_tokens": max_new_tokens, "eos_token_id": tok.eos_token_id,
                "suppress_tokens": suppressed_token_ids(model, processor),
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                **family.vision_inputs(batch, rows, model.device, model.dtype)}
    with attention_kernels(GPU_ATTENTION if model.device.type == "cuda" else None):
        if family.prefill_once:  # the same greedy tokens as `generate`, without its per-step overhead
            out = generation.complete(model, ids, attn, text_inputs=text, cuda_graph=cuda_graph_decode, **settings)
        else:
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, **text,
                                 **settings)[:, ids.shape[1]:]
    return tok.batch_decode(out, skip_special_tokens=True)


def evaluate(cfg: Config, dataset: Dataset) -> dict[str, float]:
    """Evaluate `evaluate.model_path` on `evaluate.split`; returns the metrics it writes."""
    e = cfg.evaluate
    samples = dataset.split(e.split)
    if e.limit:
        samples = samples[: e.limit]
    if not samples:
        raise ValueError(f"dataset {dataset.root} has no {e.split!r} samples")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_cfg = ModelConfig(**{**cfg.model.__dict__, "name_or_path": e.model_path, "lora_r": 0})
    processor = load_processor(model_cfg)
    model = load_model(model_cfg, device)
    out_dir = Path(e.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acc_fn = direct_accuracy if e.prompt_style == "direct" else accuracy_reward
    rows = []
    for lo in tqdm(range(0, len(samples), e.batch_size), desc="evaluate", dynamic_ncols=True):
        chunk = samples[lo: lo + e.batch_size]
        texts = generate_answers(model, processor, [dataset.load_image(s) for s in chunk],
                                 [s.question for s in chunk], e.max_new_tokens, e.prompt_style)
        for s, text in zip(chunk, texts, strict=True):
            p = parse_completion(text)
            rows.append({
                "id": s.id, "qtype": s.qtype or "all", "question": s.question, "reference": s.answer,
                "completion": text, "answer": p.answer, "correct": acc_fn(text, s.references()),
                "format": format_reward(text),
                "grounding": rule_thinking_score(p.thinking, s.visual_facts, p.answer, hint=s.hint),
                "thinking_length": len(p.thinking),
            })
    metrics = summarize(rows)
    with (out_dir / "predictions.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    per_type = [{"qtype": k.split("/", 1)[1], "accuracy": v} for k, v in sorted(metrics.items())
                if k.startswith("accuracy/")]
    (out_dir / "accuracy_by_type.json").write_text(json.dumps(per_type, indent=2))
    plot_accuracy_by_type(metrics, out_dir / "accuracy_by_type.png")
    log.info("evaluated %d samples: relaxed accuracy %.3f", len(rows), metrics["relaxed_accuracy"])
    return metrics


def summarize(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_type[r["qtype"]].append(r["correct"])
    metrics = {
        "n": n,
        "relaxed_accuracy": sum(r["correct"] for r in rows) / n,
        "format_rate": sum(r["format"] for r in rows) / n,
        "grounding_score": sum(r["grounding"] for r in rows) / n,
        "mean_thinking_length": sum(r["thinking_length"] for r in rows) / n,
    }
    metrics.update({f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_type.items())})
    return metrics


def plot_accuracy_by_type(metrics: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("accuracy/"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [metrics[f"accuracy/{n}"] for n in names], color="#4c72b0")
    ax.axhline(metrics["relaxed_accuracy"], color="k", ls="--", lw=1, label="overall")
    ax.set_ylim(0, 1)
    ax.set_ylabel("relaxed accuracy")
    ax.set_title(f"Accuracy by question type (n={metrics['n']})")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def plot_training(metrics_jsonl: Path, out_dir: Path) -> list[Path]:
    """Reward curves and mode fractions over steps, from the trainer's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    steps = [h["step"] for h in history]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, keys in (("rewards", ["reward/format", "reward/accuracy", "reward/thinking", "reward/total"]),
                       ("modes", ["mode/memorize", "mode/explore", "mode/skip"])):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            ax.plot(steps, [h.get(k, 0.0) for h in history], label=k.split("/")[1])
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths
