"""A chart base that can read (issue 12): data, pretraining from scratch, and the go/no-go gate.

DyME's claim needs the paper's starting point: a model that sees the chart but does not reason to the
answer. A random or weakly trained tiny base reads nothing, so every method scores its prior guesses.
This script builds that starting point with the project's own code:

1. ``data``: the miniature's dataset through the project's ingest (``data.path=synthetic`` with
   ``synth.style=readable``, ``dyme_core/data/charts.py``): 2,000 train questions (the RL/SFT set),
   300 val, 1,500 test, materialised at ``<work>/data`` so ``open_dataset`` reads it.
2. ``pretrain``: an Idefics3 (SmolVLM architecture) built by ``dyme init-model``'s code
   (``init_tiny_model`` + the family adapter) with the project's BPE tokenizer trained on transcriptions,
   questions, answers, all three trace qualities and rule-refined traces (so the refined targets DyME
   memorises stay short), then trained from scratch, teacher-forced, loss on the target tokens only, on
   charts drawn on the fly by DataLoader worker processes (never the dataset's charts: another seed
   stream, and a chart whose table is in the dataset is refused). Prompts are built by the family adapter
   exactly as the trainer and evaluation build them. Mixture per example: 35% transcription
   ("List every label and its value." -> ``Label = value; ...``), 35% bare answers under the reasoning
   prompt (``Answer: <gt>``; single-step questions 3 times as often as multi-step ones), 15% text skills
   (the table as text + the question -> the arithmetic the rule refiner writes, e.g. ``45 - 23 = 22.``:
   what a language model brings, never chained to the model's own reading), 15% low-quality, partly
   ungrounded traces + ``Answer: <gt>``. AdamW, linear warmup, cosine to 0, bf16 autocast on a GPU.
   With ``--text-steps`` a language-model stage comes first: text-only batches of the text skill (no
   image), so the text model learns to copy and compute from its own context before it learns to see
   (the fourth base; without it the step after reading stayed near 25%). The model is saved (bf16
   safetensors, processor and tokenizer) to ``<work>/base`` every ``save_every`` steps and at the end or
   the deadline; progress (step, loss, examples/s) is rewritten to ``<out>/progress.json`` as it goes.
3. ``gate``: issue 12's go/no-go criteria (``GATE``, fixed before any method runs) on val and the RL set,
   written to ``<out>/gate.json`` pass or fail.

``all`` = data, pretrain, gate. ``--deadline-s`` (from the start of the process) makes the pretraining
stop early enough for the gate; when the measured speed cannot reach the planned steps in time the
schedule is shortened (recorded in progress.json) so the learning rate still decays to 0. Nothing here
imports trl, datasets, mlflow, dvc, kfp or great_expectations (checked at exit).

Run (GPU: ``bench/gpu_base.sh``; the CPU check of the whole flow, about 2 minutes on 2 cores)::

    .venv/bin/python bench/chart_base.py all --scale smoke --preset smoke --out /tmp/cb --work /tmp/cb-work

Tests: ``tests/core/test_chart_base.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORBIDDEN_MODULES = ("trl", "datasets", "mlflow", "great_expectations", "kfp", "dvc")
DATA_SEED = 12  # synth.seed of the dataset; the pretraining stream uses charts.stream_rng (disjoint)
STREAM_SEED = 0
MIXTURE = {"transcribe": 0.35, "answer": 0.35, "skill": 0.15, "low_trace": 0.15}  # the second base's; --mixture


def parse_mixture(text: str) -> dict[str, float]:
    """``transcribe=0.3,answer=0.4,skill=0.2,low_trace=0.1`` -> the mixture; every kind named, shares summing to 1."""
    try:
        pairs = dict(item.split("=", 1) for item in text.split(","))
        mixture = {k: float(pairs.pop(k)) for k in MIXTURE}
    except (KeyError, ValueError) as err:
        raise argparse.ArgumentTypeError(
            f"--mixture needs each of {list(MIXTURE)} as kind=share, got {text!r}") from err
    if pairs:
        raise argparse.ArgumentTypeError(f"--mixture: unknown kinds {sorted(pairs)} (known: {list(MIXTURE)})")
    if min(mixture.values()) < 0 or abs(sum(mixture.values()) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--mixture shares must be >= 0 and sum to 1, got {text!r}")
    return mixture


# Bare answers ask single-step questions three times as often as multi-step ones (the paper's starting point:
# a base that answers simple questions better than multi-step ones).
ANSWER_SINGLE_SHARE = 0.75

# Issue 12's go/no-go gate, fixed before any method runs. Fractions in [0, 1].
GATE = {
    "transcription_cells": (0.85, None),  # share of val chart cells read exactly
    "greedy_qa_accuracy": (0.20, 0.55),  # relaxed accuracy, reasoning prompt, greedy
    "sampled_format_rate": (0.05, 0.30),  # format_reward at T=1 with the train budget
    "rl_groups_some_right": (0.30, None),  # groups with 0 < c < K
    "rl_groups_none_right": (0.20, 0.60),  # groups with c = 0
}

# Model presets (init_model.* fields). The text MLP is 2x the width and the vision heads are 32 wide
# (the family adapter's choice for tiny models).
PRESETS: dict[str, dict[str, int]] = {
    "full": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "vision_hidden_size": 256, "vision_layers": 6,
             "image_size": 224, "patch_size": 16, "scale_factor": 2, "vocab_size": 2048},
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "vision_hidden_size": 192, "vision_layers": 4,
              "image_size": 224, "patch_size": 16, "scale_factor": 2, "vocab_size": 2048},
    # today's CPU default (params.yaml init_model), for the cost comparison only: 64 px charts are not readable
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "vision_hidden_size": 64, "vision_layers": 2,
             "image_size": 64, "patch_size": 8, "scale_factor": 2, "vocab_size": 1024},
    "smoke": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vision_hidden_size": 32, "vision_layers": 1,
              "image_size": 112, "patch_size": 14, "scale_factor": 2, "vocab_size": 512},
}


@dataclass(frozen=True)
class Scale:
    n_train: int  # the RL/SFT set
    n_val: int
    n_test: int
    corpus_charts: int  # pretraining-stream charts whose text the tokenizer also learns
    steps: int
    batch: int
    lr: float
    warmup: int
    save_every: int
    log_every: int
    gate_val: int  # val questions (and charts to transcribe) the gate uses
    gate_rl_prompts: int
    gate_k: int
    eval_batch: int
    gate_reserve_s: float  # time kept for the gate and saving when a deadline is set
    gate_max_new_tokens: int = 0  # caps both budgets (smoke only); 0 = train/evaluate defaults


SCALES = {
    "smoke": Scale(n_train=28, n_val=14, n_test=14, corpus_charts=200, steps=40, batch=8, lr=1e-3, warmup=5,
                   save_every=20, log_every=10, gate_val=14, gate_rl_prompts=8, gate_k=4, eval_batch=14,
                   gate_reserve_s=20, gate_max_new_tokens=24),
    "full": Scale(n_train=2000, n_val=300, n_test=1500, corpus_charts=3000, steps=8000, batch=64, lr=1e-3,
                  warmup=200, save_every=500, log_every=50, gate_val=300, gate_rl_prompts=256, gate_k=8,
                  eval_batch=300, gate_reserve_s=75),
}


# --------------------------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(f"[chart_base {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a call killed mid-write never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False))
    tmp.replace(path)


def environment() -> dict[str, Any]:
    import transformers

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


class Context:
    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.scale_name, self.preset_name = args.scale, args.preset
        self.scale, self.preset = SCALES[args.scale], PRESETS[args.preset]
        overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v}
        if overrides:
            steps = overrides.get("steps", self.scale.steps)
            self.scale = dataclasses.replace(self.scale, **overrides,
                                             warmup=min(self.scale.warmup, max(1, steps // 10)))
        self.init_from = Path(args.init_from) if args.init_from else None
        self.workers = args.workers if args.workers >= 0 else max(0, (os.cpu_count() or 1) - 2)
        self.low_form = args.low_traces
        self.mixture = args.mixture
        self.text_steps, self.text_batch = args.text_steps, args.text_batch
        self.rl_qtypes = args.rl_qtypes
        self.start = time.monotonic()
        self.deadline = self.start + args.deadline_s if args.deadline_s > 0 else math.inf
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    @property
    def base_dir(self) -> Path:
        return self.work / "base"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------------------------------------- data
def piece_data(ctx: Context) -> None:
    """The dataset through the project's ingest, rebuilt only when its spec changed."""
    from dyme_core.config import load_config
    from dyme_core.data.ingest import ingest

    s = ctx.scale
    spec = {"seed": DATA_SEED, "train": s.n_train, "val": s.n_val, "test": s.n_test,
            "image_size": ctx.preset["image_size"], "style": "readable"}
    if ctx.rl_qtypes:  # absent otherwise, so the earlier bases' datasets stay current
        spec["train_qtypes"] = ctx.rl_qtypes
    marker = ctx.work / "data_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and (ctx.data_dir / "manifest.json").is_file():
        log(f"data: {ctx.data_dir} is current")
        return
    t0 = time.perf_counter()
    cfg = load_config(None, [
        "data.path=synthetic", f"data.out_dir={ctx.data_dir}", f"data.report={ctx.work / 'reports' / 'ingest.json'}",
        "synth.style=readable", "synth.chart_types=[bar, line]", f"synth.seed={DATA_SEED}",
        f"synth.n_train={s.n_train}", f"synth.n_val={s.n_val}", f"synth.n_test={s.n_test}",
        f"synth.image_size={ctx.preset['image_size']}", "synth.trace_quality=medium",
        f"synth.train_qtypes=[{', '.join(ctx.rl_qtypes)}]",
    ])
    report = ingest(cfg)
    write_json(marker, spec)
    log(f"data: {report['rows_per_split']} at {spec['image_size']}px in {time.perf_counter() - t0:.1f}s")


def dataset_keys(ctx: Context) -> set[tuple]:
    """Table keys of every dataset chart (the pretraining stream refuses them)."""
    from dyme_core.data.charts import table_from_facts, table_key
    from dyme_core.data.ingest import open_dataset

    keys = {table_key(table_from_facts(smp.visual_facts)) for smp in open_dataset(ctx.data_dir).samples}
    return keys


# ------------------------------------------------------------------------------------------ pretrain
LOW_FORMS = ("conversational", "refined", "consistent")


def misread(rng: np.random.Generator, table):
    """The table as a careless glance reads it: one or two values off by 10-40%, kept distinct and in 10-99."""
    import dataclasses as dc

    from dyme_core.data.charts import VALUE_RANGE

    values = list(table.values)
    for i in rng.choice(len(values), int(rng.integers(1, 3)), replace=False):
        v = round(values[i] * (1 + float(rng.choice([-1, 1])) * float(rng.uniform(0.1, 0.4))))
        v = min(max(v, VALUE_RANGE[0]), VALUE_RANGE[1])
        while v in values[:i] + values[i + 1:]:  # distinct, as the charts' values are
            v = v + 1 if v < VALUE_RANGE[1] else VALUE_RANGE[0]
        values[i] = v
    return dc.replace(table, values=tuple(values))


def misread_answer(rng: np.random.Generator, wrong, qtype: str, question: str) -> str:
    """The answer to ``question`` read off the misread table ``wrong``: ``ask`` with the generator state that asked it
    about the true table (``rng`` as it was before), so the same labels are picked; a count-above question keeps its
    threshold (``ask`` draws it between the true table's values)."""
    from dyme_core.data.charts import ask

    qa = ask(rng, wrong, qtype)
    if qa.question == question:
        return qa.answer
    if qtype != "count_above":  # only the threshold depends on the values
        raise AssertionError(f"{qtype}: the misread table was asked {qa.question!r}, not {question!r}")
    threshold = int(question.rsplit(" ", 1)[1].rstrip("?"))
    return str(sum(v > threshold for v in wrong.values))


def parse_qtypes(text: str) -> list[str]:
    """``difference,difference,value_lookup`` -> that list; an unknown type is refused with the known ones."""
    from dyme_core.data.charts import QTYPES

    names = [t.strip() for t in text.split(",") if t.strip()]
    if unknown := sorted(set(names) - set(QTYPES)):
        raise argparse.ArgumentTypeError(f"unknown question types {unknown} (known: {', '.join(QTYPES)})")
    return names


def stream_example(rng: np.random.Generator, image_size: int, refused: set[tuple], low_form: str = "conversational",
                   mixture: dict[str, float] = MIXTURE):
    """One pretraining example: (image, question, target text, kind), its kind drawn from ``mixture``.

    ``low_form``: the low-quality traces are the charts module's conversational ones (``conversational``, what the
    second base was pretrained with), or the rule-refined form (every row observed) over a misread table: partly
    ungrounded traces in the form DyME memorises, so a base that writes them only has to learn to ground them.
    ``refined`` (the third base) ends on the reference answer, so where a misread row matters its reasoning states
    a value the observation does not hold (the base learns that reasoning need not follow the observation);
    ``consistent`` works the whole trace out on the misread table (the arithmetic always written, the answer the
    misread table gives, wrong where the misread rows matter): reasoning that follows what was read.
    """
    from dyme_core.data.charts import (
        MULTI_STEP,
        QTYPES,
        SINGLE_STEP,
        TRANSCRIBE_QUESTION,
        ask,
        random_chart,
        table_key,
        transcription,
    )
    from dyme_core.data.schema import Sample
    from dyme_core.models import ANSWER_FLAG
    from dyme_core.refiner import derivation

    while True:
        table, image = random_chart(rng, image_size)
        if table_key(table) not in refused:
            break
    u = float(rng.random())
    edges = np.cumsum(list(mixture.values()))
    kind = list(mixture)[int(np.searchsorted(edges, u, side="right"))] if u < edges[-1] else "low_trace"
    if kind == "transcribe":
        return image, TRANSCRIBE_QUESTION, transcription(table), kind
    if kind == "answer":
        pool = SINGLE_STEP if rng.random() < ANSWER_SINGLE_SHARE else MULTI_STEP
        qa = ask(rng, table, pool[int(rng.integers(len(pool)))])
        return image, qa.question, f"{ANSWER_FLAG} {qa.answer}", kind
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    # the consistent form asks the misread table the same question: the generator as it was before asking
    before = copy.deepcopy(rng) if kind == "low_trace" and low_form == "consistent" else None
    qa = ask(rng, table, qtype)
    if kind == "skill":
        # text skill: the table given as text, the arithmetic that answers the question (what a language
        # model brings); the base never sees it chained to its own reading of a chart
        smp = Sample(id="s", image="", question=qa.question, answer=qa.answer, visual_facts=table.facts())
        return image, f"{transcription(table)}. {qa.question}", derivation(smp) or qa.answer, kind
    if low_form in ("refined", "consistent"):
        from dyme_core.refiner import rule_refine

        wrong_table = misread(rng, table)
        answer = qa.answer if before is None else misread_answer(before, wrong_table, qtype, qa.question)
        wrong = Sample(id="s", image="", question=qa.question, answer=answer, visual_facts=wrong_table.facts())
        return image, qa.question, f"{rule_refine(wrong, observe='all')}\n{ANSWER_FLAG} {answer}", kind
    return image, qa.question, f"{qa.traces['low']}\n{ANSWER_FLAG} {qa.answer}", kind


class SeededStream(torch.utils.data.IterableDataset):
    """Endless batches: worker ``w`` makes its ``i``-th batch from ``charts.stream_rng(self.seed, w, i)``, so the
    stream is deterministic for a given worker count. Subclasses set ``seed`` and define ``make_batch(rng)``."""

    seed: int

    def __iter__(self):
        from dyme_core.data.charts import stream_rng

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        i = 0
        while True:
            yield self.make_batch(stream_rng(self.seed, worker, i))
            i += 1

    def make_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ChartStream(SeededStream):
    """Endless batches of freshly drawn charts, tokenised and preprocessed in the worker that drew them.

    Worker ``w`` draws its ``i``-th batch from ``charts.stream_rng(seed, w, i)``: deterministic for a
    given worker count, and disjoint from the dataset's generators.
    """

    def __init__(self, processor, batch: int, image_size: int, refused: set[tuple], seed: int = STREAM_SEED,
                 pixel_dtype: torch.dtype = torch.float32, low_form: str = "conversational",
                 mixture: dict[str, float] = MIXTURE):
        self.processor, self.batch, self.image_size = processor, batch, image_size
        self.refused, self.seed, self.pixel_dtype, self.low_form = refused, seed, pixel_dtype, low_form
        self.mixture = mixture

    def make_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        from dyme_core.families import get_family

        examples = [stream_example(rng, self.image_size, self.refused, self.low_form, self.mixture)
                    for _ in range(self.batch)]
        images, questions, targets, kinds = zip(*examples, strict=True)
        out = encode_examples(self.processor, get_family("idefics3"), list(images), list(questions),
                              list(targets), list(kinds))
        # bf16 pixels on a GPU: half the bytes through shared memory and pinning (the model reads them
        # under bf16 autocast anyway; the processor's [-1, 1] values lose nothing visible)
        out["pixel_values"] = out["pixel_values"].to(self.pixel_dtype)
        return out


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers draw and preprocess; the main process owns the cores' BLAS


def text_example(rng: np.random.Generator, refused: set[tuple]) -> tuple[str, str, int]:
    """One example of the language-model stage: (question, target, question-type index). The ``skill`` kind
    without the image: a table given as text and a question about it -> the arithmetic that answers it."""
    from dyme_core.data.charts import CHART_TYPES, QTYPES, ask, draw_table, table_key, transcription
    from dyme_core.data.schema import Sample
    from dyme_core.refiner import derivation

    while True:
        table = draw_table(rng, CHART_TYPES[int(rng.integers(len(CHART_TYPES)))])  # the text only: nothing drawn
        if table_key(table) not in refused:
            break
    q = int(rng.integers(len(QTYPES)))
    qa = ask(rng, table, QTYPES[q])
    smp = Sample(id="s", image="", question=qa.question, answer=qa.answer, visual_facts=table.facts())
    return f"{transcription(table)}. {qa.question}", derivation(smp) or qa.answer, q


class TextStream(SeededStream):
    """Endless text-only batches for the language-model stage (``--text-steps``): the reasoning prompt without
    its image, so the text model learns to read its own context (copy a row, compare, subtract) before it
    learns to see, as a real VLM's language model does before its vision is attached. Another seed stream than
    the charts'; tables of the dataset are refused."""

    def __init__(self, processor, batch: int, refused: set[tuple], seed: int = STREAM_SEED + 7):
        self.processor, self.batch, self.refused, self.seed = processor, batch, refused, seed

    def make_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        from dyme_core.families import get_family

        family, tok = get_family("idefics3"), self.processor.tokenizer
        questions, targets, qtypes = zip(*(text_example(rng, self.refused) for _ in range(self.batch)), strict=True)
        # the trainer's prompt, its image placeholder left out (the processor adds no special tokens either)
        prompts = [family.prompt(self.processor, q, "reason").replace("<image>", "") for q in questions]
        rows = [(torch.tensor(tok(p, add_special_tokens=False)["input_ids"]),
                 torch.tensor([*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]))
                for p, t in zip(prompts, targets, strict=True)]
        return {**pad_rows(rows, tok.pad_token_id), "kinds": torch.tensor(qtypes)}


def encode_examples(processor, family, images, questions, targets, kinds) -> dict[str, torch.Tensor]:
    """Prompt (the adapter's reasoning prompt, as the trainer builds it) + target + eos, right-padded;
    labels are -100 on the prompt and the padding, so the loss covers the target tokens only."""
    tok = processor.tokenizer
    batch = family.encode(processor, questions, images, "reason")
    rows = []
    for p, text in zip(batch.prompt_ids, targets, strict=True):
        # as the trainer encodes a memorised reference: the text's tokens, then eos
        t = torch.tensor([*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id], dtype=torch.long)
        rows.append((p, t))
    kind_ids = torch.tensor([list(MIXTURE).index(k) for k in kinds])
    return {**pad_rows(rows, tok.pad_token_id), "kinds": kind_ids, **batch.vision}


def pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, target ids) rows -> right-padded input_ids, attention_mask and labels (-100 but on the target)."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.cat([p, t])
        labels[i, len(p):n] = t
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def tokenizer_corpus(ctx: Context) -> tuple[list[str], list]:
    """Texts the BPE learns (stream charts and the RL set: transcriptions, questions, answers, all trace
    qualities, rule-refined traces with their answer line), and the RL set's samples."""
    from dyme_core.data.charts import (
        CHART_TYPES,
        QTYPES,
        TRANSCRIBE_QUESTION,
        ask,
        draw_table,
        stream_rng,
        transcription,
    )
    from dyme_core.data.ingest import open_dataset
    from dyme_core.data.schema import Sample

    texts = [TRANSCRIBE_QUESTION]
    rng = stream_rng(STREAM_SEED + 1, 0, 0)
    for i in range(ctx.scale.corpus_charts):
        table = draw_table(rng, CHART_TYPES[i % len(CHART_TYPES)])  # the text only: nothing drawn
        texts.append(transcription(table))
        for q in QTYPES:
            qa = ask(rng, table, q)
            smp = Sample(id="c", image="", question=qa.question, answer=qa.answer, visual_facts=table.facts())
            texts += [qa.question, qa.answer, *qa.traces.values(), refined_text(smp)]
    train = [s for s in open_dataset(ctx.data_dir).samples if s.split == "train"]
    for s in train:
        texts += [s.question, s.answer, s.hint or "", *s.meta.get("traces", {}).values(),
                  refined_text(s)]
    return [t for t in texts if t], train


def refined_text(sample) -> str:
    """The memorised target of the method table's runs: the rule-refined trace (every row observed) + answer."""
    from dyme_core.models import ANSWER_FLAG
    from dyme_core.refiner import rule_refine

    return f"{rule_refine(sample, observe='all')}\n{ANSWER_FLAG} {sample.answer}"


def refined_target_lengths(tokenizer, samples) -> dict[str, int]:
    n = np.array([len(tokenizer(refined_text(s), add_special_tokens=False)["input_ids"])
                  for s in samples])
    return {"p50": int(np.percentile(n, 50)), "p95": int(np.percentile(n, 95)), "max": int(n.max())}


def save_base(model, processor, dest: Path) -> None:
    """bf16 safetensors + processor, written beside ``dest`` and renamed into place."""
    tmp = dest.with_name(dest.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def target_nll(model, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level NLL of the target tokens, (B, L-1), and their mask: kept per row so the log can say how each
    kind of target fares."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                            ignore_index=-100, reduction="none")
    return nll, labels != -100


def optimizer_step(model, opt, sched, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[float, np.ndarray]:
    """One teacher-forced step on the target tokens (grad-norm clip 1): the batch's loss and each row's mean NLL."""
    nll, mask = target_nll(model, batch, autocast)
    loss = nll.sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        return float(loss.detach()), (nll.sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()


def pretrain_text(ctx: Context, model, processor, progress: dict[str, Any]) -> None:
    """The language-model stage (``--text-steps``): text-only batches of the text skill, AdamW at the scale's peak
    LR with its own warmup and cosine to 0, before the chart mixture starts on fresh optimizer state. Loss per
    question type goes to progress.json's ``text_rows``. It stops early, leaving the chart stage at least
    two minutes before the gate's reserve."""
    from dyme_core.data.charts import QTYPES

    s, dev = ctx.scale, ctx.device
    steps = ctx.text_steps
    warmup = max(1, min(100, steps // 10))
    loader = torch.utils.data.DataLoader(
        TextStream(processor, ctx.text_batch, dataset_keys(ctx)), batch_size=None, num_workers=ctx.workers,
        pin_memory=dev.type == "cuda", prefetch_factor=4 if ctx.workers else None, worker_init_fn=_worker_init)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (
        1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup)))))
    progress["text_rows"] = []
    t0 = time.perf_counter()
    window = {"t": t0, "ex": 0, "loss": np.zeros(len(QTYPES)), "n": np.zeros(len(QTYPES))}
    step = 0
    for batch in loader:
        qtypes = batch.pop("kinds")
        _, per_row = optimizer_step(model, opt, sched, {k: v.to(dev, non_blocking=True) for k, v in batch.items()},
                                    dev.type == "cuda")
        step += 1
        np.add.at(window["loss"], qtypes.numpy(), per_row)
        np.add.at(window["n"], qtypes.numpy(), 1)
        window["ex"] += len(qtypes)
        stopping = step >= steps or ctx.time_left() < s.gate_reserve_s + 120
        if step % s.log_every == 0 or stopping:
            now = time.perf_counter()
            per_q = window["loss"] / np.maximum(1, window["n"])
            row = {"step": step, "loss": round(float(window["loss"].sum() / max(1, window["n"].sum())), 4),
                   "examples_per_s": round(window["ex"] / (now - window["t"]), 1), "elapsed_s": round(now - t0, 1),
                   "lr": float(f"{sched.get_last_lr()[0]:.3g}"),
                   **{f"loss/{q}": round(float(v), 4) for q, v in zip(QTYPES, per_q, strict=True)}}
            progress["text_rows"].append(row)
            write_json(ctx.out / "progress.json", progress)
            log(f"text step {step}/{steps} loss {row['loss']:.3f} {row['examples_per_s']:.0f} ex/s")
            window.update(t=now, ex=0, loss=np.zeros(len(QTYPES)), n=np.zeros(len(QTYPES)))
        if stopping:
            break
    progress.update(text_steps_done=step, text_train_s=round(time.perf_counter() - t0, 1))
    write_json(ctx.out / "progress.json", progress)
    log(f"text stage: {step} steps in {progress['text_train_s']}s")


def piece_pretrain(ctx: Context) -> None:
    from dyme_core.config import InitModelConfig, ModelConfig
    from dyme_core.models import init_tiny_model, load_model, load_processor

    s, dev = ctx.scale, ctx.device
    t_start = time.perf_counter()
    texts, train = tokenizer_corpus(ctx)
    init_dir = ctx.init_from or ctx.work / "init"
    if ctx.init_from is None:
        init_tiny_model(InitModelConfig(family="idefics3", out_dir=str(init_dir), seed=0, **ctx.preset), texts)
    elif not (init_dir / "config.json").is_file():
        raise SystemExit(f"--init-from {init_dir}: no config.json there (expected a base this script saved)")
    elif (size := json.loads((init_dir / "config.json").read_text()).get("vision_config", {}).get("image_size")) \
            != ctx.preset["image_size"]:
        raise SystemExit(f"--init-from {init_dir}: its images are {size} px, preset {ctx.preset_name}'s "
                         f"{ctx.preset['image_size']} px")
    processor = load_processor(ModelConfig(name_or_path=str(init_dir)))
    lengths = refined_target_lengths(processor.tokenizer, train)
    model = load_model(ModelConfig(name_or_path=str(init_dir), dtype="float32", freeze_vision=False), dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain: {n_params / 1e6:.2f}M params, vocab {len(processor.tokenizer)}, refined targets "
        f"{lengths} tokens; setup {time.perf_counter() - t_start:.1f}s")

    stream = ChartStream(processor, s.batch, ctx.preset["image_size"], dataset_keys(ctx),
                         pixel_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, low_form=ctx.low_form,
                         mixture=ctx.mixture)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=ctx.workers, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if ctx.workers else None, persistent_workers=False,
        worker_init_fn=_worker_init)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    plan = {"steps": s.steps}  # shortened when the deadline cannot hold it

    def lr_at(step: int) -> float:  # linear warmup, cosine to 0 at plan["steps"]
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s.warmup) / max(1, plan["steps"] - s.warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    progress = {"text_steps_planned": ctx.text_steps, "text_batch": ctx.text_batch,
                "preset": ctx.preset_name, "preset_fields": ctx.preset, "scale": ctx.scale_name,
                "scale_fields": dataclasses.asdict(s), "mixture": ctx.mixture, "low_traces": ctx.low_form,
                "n_params": n_params, "vocab": len(processor.tokenizer), "refined_target_tokens": lengths,
                "workers": ctx.workers, "env": environment(), "status": "running", "rows": [], "saved_step": None,
                "init_from": str(ctx.init_from) if ctx.init_from else None,
                "steps_planned": s.steps}
    write_json(ctx.out / "progress.json", progress)
    autocast = dev.type == "cuda"
    model.train()
    if ctx.text_steps:
        pretrain_text(ctx, model, processor, progress)
    t0 = time.perf_counter()
    window = {"loss": 0.0, "n": 0, "t": t0, "ex": 0, "kinds": np.zeros(len(MIXTURE)), "kind_n": np.zeros(len(MIXTURE))}
    step, stop_reason = 0, "done"
    probe = (max(1, min(150, s.steps // 4) // 5), min(150, s.steps // 4))  # steps between which speed is timed
    t_probe = t0
    for batch in loader:
        kinds = batch.pop("kinds")
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
        loss, per_row = optimizer_step(model, opt, sched, batch, autocast)
        step += 1
        window["loss"] += loss
        window["n"] += 1
        window["ex"] += len(kinds)
        np.add.at(window["kinds"], kinds.numpy(), per_row)
        np.add.at(window["kind_n"], kinds.numpy(), 1)
        if step == probe[0]:
            t_probe = time.perf_counter()  # the workers have started: time from here
        if step == probe[1] and ctx.deadline < math.inf:
            # from the measured speed: the steps that fit before the gate's reserve
            rate = (step - probe[0]) / (time.perf_counter() - t_probe)
            fit = step + int(rate * (ctx.time_left() - s.gate_reserve_s - 10))
            if fit < plan["steps"]:
                plan["steps"] = max(step + 1, fit)
                progress["steps_planned"] = plan["steps"]
                log(f"pretrain: {rate:.1f} steps/s; shortened to {plan['steps']} steps to meet the deadline")
        stopping = step >= plan["steps"] or ctx.time_left() < s.gate_reserve_s
        if step % s.log_every == 0 or stopping:
            now = time.perf_counter()
            row = {"step": step, "loss": round(window["loss"] / window["n"], 4),
                   "examples_per_s": round(window["ex"] / (now - window["t"]), 1),
                   "lr": float(f"{sched.get_last_lr()[0]:.3g}"), "elapsed_s": round(now - t0, 1),
                   **{f"loss/{k}": round(float(window["kinds"][i] / max(1, window["kind_n"][i])), 4)
                      for i, k in enumerate(MIXTURE)}}
            progress["rows"].append(row)
            write_json(ctx.out / "progress.json", progress)
            log(f"step {step}/{plan['steps']} loss {row['loss']:.3f} {row['examples_per_s']:.0f} ex/s")
            window.update(loss=0.0, n=0, t=now, ex=0, kinds=np.zeros(len(MIXTURE)), kind_n=np.zeros(len(MIXTURE)))
        if step % s.save_every == 0 and not stopping:
            save_base(model, processor, ctx.base_dir)
            progress["saved_step"] = step
            write_json(ctx.out / "progress.json", progress)
        if stopping:
            stop_reason = "done" if step >= plan["steps"] else "deadline"
            break
    save_base(model, processor, ctx.base_dir)
    train_s = time.perf_counter() - t0
    with (ctx.base_dir / "model.safetensors").open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    progress.update(status=stop_reason, saved_step=step, steps_done=step, train_s=round(train_s, 1),
                    examples_per_s=round(step * s.batch / train_s, 1), model_safetensors_sha256=digest,
                    bf16_mb=round((ctx.base_dir / "model.safetensors").stat().st_size / 2**20, 1))
    write_json(ctx.out / "progress.json", progress)
    log(f"pretrain: {step} steps in {train_s:.0f}s ({stop_reason}); base saved to {ctx.base_dir}")
    del loader


# ---------------------------------------------------------------------------------------------- gate
@torch.no_grad()
def sample_completions(model, processor, images, questions, k: int, max_new_tokens: int) -> list[list[str]]:
    """K completions per question at the trainer's sampling settings (TrainConfig defaults: T, top-p,
    top-k), prompts built by the family adapter with the reasoning prompt, sampled by the trainer's
    decode loop (`generation.complete`: one prefill per prompt)."""
    from dyme_core import generation
    from dyme_core.config import TrainConfig
    from dyme_core.families import family_of
    from dyme_core.models import GPU_ATTENTION, attention_kernels, suppressed_token_ids

    t = TrainConfig()
    model.eval()
    family = family_of(model.config)
    batch = family.encode(processor, questions, images, "reason")
    tok = processor.tokenizer
    rows = list(range(len(questions)))
    width = max(len(p) for p in batch.prompt_ids)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(batch.prompt_ids):
        ids[i, width - len(p):] = p
        attn[i, width - len(p):] = 1
    with attention_kernels(GPU_ATTENTION if model.device.type == "cuda" else None):
        out = generation.complete(model, ids.to(model.device), attn.to(model.device), k=k, do_sample=True,
                                  temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
                                  max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id,
                                  suppress_tokens=suppressed_token_ids(model, processor),
                                  **family.vision_inputs(batch, rows, model.device, model.dtype))
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return [texts[i * k: (i + 1) * k] for i in rows]


def _chunks(items: list, n: int):
    for lo in range(0, len(items), n):
        yield items[lo: lo + n]


def judge(figures: dict[str, float]) -> dict[str, dict]:
    out = {}
    for name, (lo, hi) in GATE.items():
        v = figures[name]
        ok = v >= lo and (hi is None or v <= hi)
        out[name] = {"value": round(v, 4), "min": lo, "max": hi, "pass": bool(ok)}
    return out


def piece_gate(ctx: Context) -> dict:
    from dyme_core.config import EvaluateConfig, ModelConfig, TrainConfig
    from dyme_core.data.charts import TRANSCRIBE_QUESTION, parse_transcription
    from dyme_core.data.ingest import open_dataset
    from dyme_core.evaluate import generate_answers
    from dyme_core.models import load_model, load_processor
    from dyme_core.rewards import accuracy_reward, format_reward

    t0 = time.perf_counter()
    torch.manual_seed(0)
    s, dev = ctx.scale, ctx.device
    mcfg = ModelConfig(name_or_path=str(ctx.base_dir))
    processor, model = load_processor(mcfg), load_model(mcfg, dev)
    ds = open_dataset(ctx.data_dir)
    val = ds.split("val")[: s.gate_val]
    rl = ds.split("train")[: s.gate_rl_prompts]
    train_budget, eval_budget = TrainConfig().max_new_tokens, EvaluateConfig().max_new_tokens
    if s.gate_max_new_tokens:
        train_budget, eval_budget = min(train_budget, s.gate_max_new_tokens), min(eval_budget, s.gate_max_new_tokens)
    min_thinking = TrainConfig().min_thinking_chars

    cells = exact_charts = n_cells = 0
    qa_rows, fmt = [], []
    examples: dict[str, list] = {"transcription": [], "greedy": [], "sampled": []}
    for chunk in _chunks(val, s.eval_batch):
        images = [ds.load_image(x) for x in chunk]
        reads = generate_answers(model, processor, images, [TRANSCRIBE_QUESTION] * len(chunk), 64, "reason")
        for x, text in zip(chunk, reads, strict=True):
            got = parse_transcription(text)
            right = sum(got.get(str(label)) == str(v) for label, v in x.visual_facts["rows"])
            cells += right
            n_cells += len(x.visual_facts["rows"])
            exact_charts += right == len(x.visual_facts["rows"]) and len(got) == right
            if len(examples["transcription"]) < 3:
                examples["transcription"].append({"id": x.id, "truth": x.visual_facts["rows"], "read": text})
        answers = generate_answers(model, processor, images, [x.question for x in chunk], eval_budget, "reason")
        for x, text in zip(chunk, answers, strict=True):
            qa_rows.append({"qtype": x.qtype, "steps": x.meta.get("steps"),
                            "correct": accuracy_reward(text, x.references())})
            if len(examples["greedy"]) < 4:
                examples["greedy"].append({"id": x.id, "question": x.question, "answer": x.answer, "completion": text})
        for x, (text,) in zip(chunk, sample_completions(model, processor, images, [x.question for x in chunk], 1,
                                                        train_budget), strict=True):
            fmt.append(format_reward(text, min_thinking))
            if len(examples["sampled"]) < 4:
                examples["sampled"].append({"id": x.id, "question": x.question, "completion": text})
    groups, group_types = [], []
    for chunk in _chunks(rl, max(1, s.eval_batch // s.gate_k)):
        images = [ds.load_image(x) for x in chunk]
        for x, texts in zip(chunk, sample_completions(model, processor, images, [x.question for x in chunk],
                                                      s.gate_k, train_budget), strict=True):
            groups.append(sum(accuracy_reward(t, x.references()) for t in texts))
            group_types.append(x.qtype)

    def acc(rows: list[dict]) -> float | None:
        return round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else None

    k = s.gate_k
    figures = {
        "transcription_cells": cells / max(1, n_cells),
        "greedy_qa_accuracy": acc(qa_rows) or 0.0,
        "sampled_format_rate": sum(fmt) / max(1, len(fmt)),
        "rl_groups_some_right": sum(0 < c < k for c in groups) / max(1, len(groups)),
        "rl_groups_none_right": sum(c == 0 for c in groups) / max(1, len(groups)),
    }
    single = acc([r for r in qa_rows if r["steps"] == "single"])
    multi = acc([r for r in qa_rows if r["steps"] == "multi"])
    criteria = judge(figures)
    criteria["single_above_multi"] = {"single": single, "multi": multi,
                                      "pass": bool(single is not None and multi is not None and single > multi)}
    progress_file = ctx.out / "progress.json"
    result = {
        "pass": all(c["pass"] for c in criteria.values()), "criteria": criteria,
        "figures": {**{k2: round(v, 4) for k2, v in figures.items()},
                    "transcription_whole_charts": round(exact_charts / max(1, len(val)), 4),
                    "greedy_qa_single_step": single, "greedy_qa_multi_step": multi,
                    "greedy_qa_by_type": {q: acc([r for r in qa_rows if r["qtype"] == q])
                                          for q in sorted({r["qtype"] for r in qa_rows})},
                    "rl_groups_all_right": round(sum(c == k for c in groups) / max(1, len(groups)), 4),
                    "rl_correct_per_group_histogram": [sum(c == j for c in groups) for j in range(k + 1)],
                    # where the never-solved prompts are: the question mix decides how often DyME can memorise
                    "rl_groups_none_right_by_type": {
                        q: round(sum(c == 0 for c, t in zip(groups, group_types, strict=True) if t == q)
                                 / group_types.count(q), 4) for q in sorted(set(group_types))}},
        "setup": {"val_questions": len(val), "val_cells": n_cells, "rl_prompts": len(rl), "k": k,
                  "train_max_new_tokens": train_budget, "eval_max_new_tokens": eval_budget,
                  "sampling": {"temperature": TrainConfig().temperature, "top_p": TrainConfig().top_p,
                               "top_k": TrainConfig().top_k},
                  "base": str(ctx.base_dir), "preset": ctx.preset_name, "scale": ctx.scale_name,
                  "pretrain": (json.loads(progress_file.read_text()) if progress_file.is_file() else {}).get("status")},
        "examples": examples, "env": environment(), "gate_s": round(time.perf_counter() - t0, 1),
    }
    write_json(ctx.out / "gate.json", result)
    log("gate: " + ", ".join(f"{n} {c.get('value', '')}{'' if c['pass'] else ' FAIL'}" for n, c in criteria.items())
        + f" -> {'PASS' if result['pass'] else 'FAIL'} ({result['gate_s']:.0f}s)")
    return result


# ------------------------------------------------------------------------------------------ cpu-cost
def piece_cpu_cost(ctx: Context) -> dict:
    """One DyME-shaped step's two halves with random weights of ``--preset`` on this machine: sampling
    4 prompts x K=4 = 16 completions of 128 new tokens (the default's batch; the trainer's decode loop,
    eos suppressed so every row runs the whole budget), and one update
    (forward, backward, AdamW) over those 16 rows with the vision tower frozen, as the default trains.
    The update runs the vision tower once per row (the trainer's frozen-encoder cache runs it once per
    prompt), so it slightly overstates the update."""
    from dyme_core import generation
    from dyme_core.config import InitModelConfig, ModelConfig
    from dyme_core.data.charts import QTYPES, ask, random_chart
    from dyme_core.families import family_of
    from dyme_core.models import init_tiny_model, load_model, load_processor, suppressed_token_ids

    prompts, k, new = 4, 4, 128
    rng = np.random.default_rng(0)
    tables = [random_chart(rng, max(112, ctx.preset["image_size"])) for _ in range(prompts)]
    qas = [ask(rng, t, QTYPES[i % len(QTYPES)]) for i, (t, _) in enumerate(tables)]
    texts = [x for qa in qas for x in (qa.question, qa.answer, *qa.traces.values())]
    model_dir = ctx.work / f"random-{ctx.preset_name}"
    init_tiny_model(InitModelConfig(out_dir=str(model_dir), **ctx.preset), texts)
    mcfg = ModelConfig(name_or_path=str(model_dir), dtype="float32")  # freeze_vision: the default's True
    processor, model = load_processor(mcfg), load_model(mcfg, ctx.device)
    images, questions = [im for _, im in tables], [qa.question for qa in qas]
    family = family_of(model.config)
    tok = processor.tokenizer
    batch = family.encode(processor, questions, images, "reason")
    width = max(len(p) for p in batch.prompt_ids)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), tok.pad_token_id), p]) for p in batch.prompt_ids])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in batch.prompt_ids])[:, None]).long()
    vision = family.vision_inputs(batch, list(range(prompts)), ctx.device, model.dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    result: dict[str, Any] = {"preset": ctx.preset_name, "preset_fields": ctx.preset,
                              "n_params": sum(p.numel() for p in model.parameters()),
                              "bf16_mb": round(sum(p.numel() for p in model.parameters()) * 2 / 2**20, 1),
                              "threads": torch.get_num_threads(), "env": environment(), "gen_s": [], "update_s": []}
    for _ in range(2):  # the first round warms the allocator and kernels; both are reported
        model.eval()
        t0 = time.perf_counter()
        completion = generation.complete(model, ids, attn, k=k, do_sample=True, max_new_tokens=new,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         suppress_tokens=[*suppressed_token_ids(model, processor), tok.eos_token_id],
                                         **vision)
        out = torch.cat([ids.repeat_interleave(k, 0), completion], 1)
        result["gen_s"].append(round(time.perf_counter() - t0, 3))
        model.train()
        rows = out.shape[0]
        row_vision = family.vision_inputs(batch, [i // k for i in range(rows)], ctx.device, model.dtype)
        t0 = time.perf_counter()
        mask = torch.cat([attn.repeat_interleave(k, 0), torch.ones(rows, new, dtype=torch.long)], 1)
        logits = model(input_ids=out, attention_mask=mask, **row_vision).logits
        logp = torch.log_softmax(logits[:, width - 1: -1].float(), -1).gather(-1, out[:, width:, None])
        loss = -logp.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        result["update_s"].append(round(time.perf_counter() - t0, 3))
    result["step_s"] = round(result["gen_s"][-1] + result["update_s"][-1], 3)
    write_json(ctx.out / f"cpu_cost-{ctx.preset_name}.json", result)
    log(f"cpu-cost {ctx.preset_name}: {result['n_params'] / 1e6:.2f}M params ({result['bf16_mb']} MB bf16), "
        f"generate 16x{new} {result['gen_s']} s, update {result['update_s']} s")
    return result


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pieces", nargs="+", choices=("data", "pretrain", "gate", "all", "cpu-cost"),
                        help="Pieces to run in order; all = data pretrain gate; cpu-cost times one DyME-shaped "
                             "generation and update of --preset with random weights.")
    parser.add_argument("--out", required=True, help="Result files: progress.json, gate.json.")
    parser.add_argument("--work", required=True, help="Scratch: <work>/data (the dataset), <work>/base (the model).")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES), help="Data, steps and gate sizes.")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS), help="Model size.")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="Seconds this process may use (0 = none); pretraining stops in time for the gate.")
    parser.add_argument("--workers", type=int, default=-1,
                        help="Chart-drawing DataLoader workers (default: cores - 2).")
    parser.add_argument("--low-traces", default="conversational", choices=LOW_FORMS,
                        help="Form of the low-quality traces: the charts' conversational ones (the second base); the "
                             "rule-refined form over a misread table (every row observed, some wrong) ending on the "
                             "reference answer (refined, the third base), or worked out on the misread table "
                             "(consistent: the reasoning follows the observation, the answer is the misread one).")
    parser.add_argument("--init-from", default="",
                        help="Continue from a base this script saved (its weights and tokenizer) instead of a random "
                             "model; --preset must be the one it was built with.")
    parser.add_argument("--steps", type=int, default=0, help="Pretraining steps (default: the scale's).")
    parser.add_argument("--lr", type=float, default=0.0, help="Peak learning rate (default: the scale's).")
    parser.add_argument("--mixture", type=parse_mixture, default=dict(MIXTURE),
                        help="Shares of the pretraining kinds, e.g. transcribe=0.3,answer=0.4,skill=0.2,low_trace=0.1 "
                             "(default: the second base's 0.35/0.35/0.15/0.15).")
    parser.add_argument("--text-steps", type=int, default=0,
                        help="Steps of a language-model stage before the chart mixture: text-only batches of the "
                             "text skill (the table as text + the question -> the arithmetic), so the text model can "
                             "read its own context before it learns to see (0 = none, the first three bases).")
    parser.add_argument("--text-batch", type=int, default=256, help="Examples per step of the language-model stage.")
    parser.add_argument("--rl-qtypes", type=parse_qtypes, default=[],
                        help="Question types of the RL/SFT set, one drawn per question, a repeated type weighing more "
                             "(synth.train_qtypes), e.g. difference,difference,value_lookup; val and test keep every "
                             "type in turn (default: every type in turn).")
    args = parser.parse_args(argv)
    if args.text_steps < 0 or args.text_batch < 1:
        parser.error(f"--text-steps must be >= 0 and --text-batch >= 1, got {args.text_steps} and {args.text_batch}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = True
    ctx = Context(args)
    pieces = [p for piece in args.pieces for p in (("data", "pretrain", "gate") if piece == "all" else (piece,))]
    log(f"scale {ctx.scale_name}, preset {ctx.preset_name}, {ctx.workers} workers; work {ctx.work}; out {ctx.out}; "
        f"{environment()['device']}")
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        for p in pieces:
            t_piece = time.perf_counter()
            {"data": piece_data, "pretrain": piece_pretrain, "gate": piece_gate, "cpu-cost": piece_cpu_cost}[p](ctx)
            log(f"piece {p}: {time.perf_counter() - t_piece:.0f}s")
    finally:
        imported = sorted(m for m in FORBIDDEN_MODULES if m in sys.modules)
        log(f"total {time.perf_counter() - t0:.0f}s; modules outside the GPU stack imported: {imported or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
