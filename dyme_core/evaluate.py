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
from tqdm import tqdm

from dyme_core.checker import rule_thinking_score
from dyme_core.config import Config, ModelConfig
from dyme_core.data.loaders import Dataset
from dyme_core.inference import generate_answers
from dyme_core.models import (
    load_model,
    load_processor,
)
from dyme_core.rewards import REWARDS, RewardContext, parse_completion

log = logging.getLogger(__name__)


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
    # accuracy and format as training scores them: the reward table, with train.min_thinking_chars
    ctx = RewardContext(e.prompt_style, cfg.train.min_thinking_chars)
    rows = []
    for lo in tqdm(range(0, len(samples), e.batch_size), desc="evaluate", dynamic_ncols=True):
        chunk = samples[lo: lo + e.batch_size]
        texts = generate_answers(model, processor, [dataset.load_image(s) for s in chunk],
                                 [s.question for s in chunk], e.max_new_tokens, e.prompt_style)
        correct, fmt = REWARDS["accuracy"](texts, chunk, ctx), REWARDS["format"](texts, chunk, ctx)
        for s, text, right, formatted in zip(chunk, texts, correct, fmt, strict=True):
            p = parse_completion(text)
            rows.append({
                "id": s.id, "qtype": s.qtype or "all", "question": s.question, "reference": s.answer,
                "completion": text, "answer": p.answer, "correct": right,
                "format": formatted,
                "grounding": rule_thinking_score(p.thinking, s.visual_facts, p.answer, hint=s.hint,
                                                 question=s.question),
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


SMOOTH_STEPS = 10  # the training plots' moving window: one step of a small batch is noise
MODE_COLORS = {"memorize": "#dd8452", "explore": "#4c72b0", "skip": "#c7c7c7"}


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing moving mean: point i is the mean of values[i - window + 1 : i + 1] (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_training(metrics_jsonl: Path, out_dir: Path) -> list[Path]:
    """Reward curves (rewards.png) and the shares of the three modes as a stacked area (modes.png) over
    steps, from the trainer's metrics.jsonl, each a trailing moving mean over SMOOTH_STEPS steps; the
    modes' legend gives each mode's share over the whole run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    history = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    steps = [h["step"] for h in history]
    window = max(1, min(SMOOTH_STEPS, len(history)))
    smoothed = f"moving mean over {window} steps"
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k in ("reward/format", "reward/accuracy", "reward/thinking", "reward/total"):
        ax.plot(steps, moving_mean([h.get(k, 0.0) for h in history], window), label=k.split("/")[1])
    ax.set_xlabel("step")
    ax.set_title(f"Rewards ({smoothed})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    paths = [_save(fig, out_dir / "rewards.png")]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    shares = {m: [h.get(f"mode/{m}", 0.0) for h in history] for m in MODE_COLORS}
    labels = [f"{m} {sum(v) / max(1, len(v)):.0%}" for m, v in shares.items()]
    ax.stackplot(steps, *(moving_mean(v, window) for v in shares.values()), labels=labels,
                 colors=list(MODE_COLORS.values()))
    ax.set_ylim(0, 1)
    ax.margins(x=0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("step")
    ax.set_ylabel("share of prompt groups")
    ax.set_title(f"Modes ({smoothed})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="whole run", reverse=True)
    paths.append(_save(fig, out_dir / "modes.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
