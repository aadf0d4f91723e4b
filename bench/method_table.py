"""The paper's method table in miniature, run fairly (DESIGN.md section 2 for the paper numbers; issue 12).

The claim under test: on a small VLM that can read charts but does not reason to the answer, SFT on
reasoning traces, GRPO and two-stage SFT->GRPO do not improve (or lower) chart-QA accuracy, while DyME
raises it. Inputs: ``--base DIR`` (an HF ``save_pretrained`` Idefics3 folder, e.g. bench/chart_base.py's
``W/base``, with its ``gate.json`` when it has one) and ``--data DIR`` (a materialised project dataset
with train / val / test splits, opened with ``dyme_core.data.ingest.open_dataset``).

Methods (``METHODS``), all from the same base with the reasoning prompt and identical data, steps,
prompts per step, K, completion budget and evaluation:

- core: ``base`` (evaluated only); ``sft`` on the rule-refined traces (= DyME without exploration);
  ``grpo`` with all three rewards (= DyME without memorisation); ``dyme``;
- extended: ``sft_low`` (SFT on the low-quality traces, ``meta.traces.low``), ``two_stage`` (SFT on
  refined traces, then GRPO), ``dyme_no_checker`` (thinking reward 0), ``dyme_no_refiner`` (memorises the
  raw hint).

Scale (``--scale NAME``): ``bench/scales/method-table-NAME.yaml``, whose ``config`` section is an ordinary dyme
config layer (the keys of params.yaml, applied to every run) and whose ``plan`` section holds the harness's own
settings (LR grid, seeds, threads, time estimates, the built-in base's sizes, ``refined_noise``, ``n_boot``);
``--set train.max_steps=120 lr_grid=3e-5,1e-4`` overrides either, recorded with every run.

Learning rate: every trained method runs seed 0 at each value of a small grid (``lr_grid``); the LR with
the best *validation* accuracy is that method's (ties: the shared LR, then the lower); the other seeds
(``seeds_core`` for the core methods, ``seeds_extended`` for the rest) run at the chosen LR only. The
shared-LR table (every method at ``shared_lr``, seed 0) comes from the same grid runs. The test split
is never used to choose anything.

Execution (``runs``): a scheduler launches up to ``--parallel`` runs as subprocesses (``subprocess``,
never fork after CUDA), each pinned to the least-loaded GPU through ``CUDA_VISIBLE_DEVICES`` and limited
to ``threads`` torch threads; a run trains with ``DymeTrainer`` and evaluates greedily with
``dyme_core.evaluate.evaluate`` on val and test. The parent appends one JSON line per finished run to
``--out/<results-name>`` immediately (failed runs too, marked ``failed``); runs already recorded in
``--out`` or a ``--from`` folder are skipped, so rerunning the same command resumes. ``--deadline-s``
stops launching runs whose estimated time (measured in this call, else ``est_*`` of the scale) does not
fit, and at the deadline ends the stragglers (SIGTERM, then SIGKILL, each by its own process group),
keeping everything finished; the call exits 3 while runs remain.

Per run (test split, questions ordered by sample id so that paired statistics are possible): relaxed
accuracy and the 0/1 vector, accuracy on single-step and multi-step questions (``meta.steps``, else from
the question type), strict format rate, grounding (the rule checker's score) and the hallucinated-number
rate (``hallucinated_numbers``); validation accuracy; training curves from the run's metrics.jsonl,
downsampled to ``curve_points`` rows; per-run seconds.

``aggregate`` (CPU, from the .jsonl files): paired-bootstrap 95% intervals (dyme_core/stats.py: the same
resampled questions for every method, seeds averaged per question) for each method's accuracy, each
method minus base, and DyME minus each of sft / grpo / two_stage; ``table.md`` beside the paper's
numbers, ``results.json``, ``curves.png``, ``modes.png``; and whether issue 12's goal lines are met.

Run (GPU, bench/gpu_method_table.sh; bench/README.md has the plan and budget)::

    BASE=bench/out/chart_base RESULTS=bench/out/method_table bash bench/gpu_method_table.sh  # again to resume
    python bench/method_table.py aggregate --out bench/results/method-table-fair --from bench/out/method_table/*/

CPU check of the whole flow at a tiny scale (about 2 minutes on 2 cores; builds its own tiny base and
synthetic data in ``--work`` because no ``--base``/``--data`` is given)::

    .venv/bin/python bench/method_table.py all --scale smoke --out bench/out/method_table_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench`, `dyme_core` when run as a script

from bench.common import append_jsonl, write_json  # noqa: E402

# Paper numbers (ChartQA relaxed accuracy, %; DESIGN.md section 2). The method rows are SmolVLM-500M;
# the ablation rows are LLaVA-OV-0.5B, 3-domain average, whose full DyME scores 55.4.
PAPER = {
    "base": {"acc": 63.2, "model": "SmolVLM-500M, ChartQA"},
    "sft": {"acc": 57.7, "model": "SmolVLM-500M, ChartQA"},
    "grpo": {"acc": 53.8, "model": "SmolVLM-500M, ChartQA"},
    "two_stage": {"acc": 60.1, "model": "SmolVLM-500M, ChartQA"},
    "dyme": {"acc": 69.7, "model": "SmolVLM-500M, ChartQA"},
    "dyme_full_ablation": {"acc": 55.4, "model": "LLaVA-OV-0.5B, 3-domain avg"},
    "ablation_no_memorization": {"acc": 43.9, "model": "LLaVA-OV-0.5B, 3-domain avg"},
    "ablation_no_exploration": {"acc": 50.4, "model": "LLaVA-OV-0.5B, 3-domain avg"},
    "dyme_no_refiner": {"acc": 51.6, "model": "LLaVA-OV-0.5B, 3-domain avg"},
    "dyme_no_checker": {"acc": 52.8, "model": "LLaVA-OV-0.5B, 3-domain avg"},
}


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...]  # the `train.*` overrides that make the method (all else is shared)
    core: bool  # core methods run `seeds_core` seeds, the others `seeds_extended`
    label: str
    color: str
    hint_trace: str | None = None  # replace each sample's hint by meta.traces[<this>] (the SFT target)
    rollouts: bool = True  # False: no sampling at all (cheaper; the scheduler's estimate)


# Launch priority order: the core methods first (their other seeds wait for their LR grid).
METHODS: dict[str, Method] = {
    "dyme": Method(("train.method=dyme",), True, "+DyME", "#1f77b4"),
    # GRPO and two-stage as the paper runs its GRPO baseline: KL to the initial model with beta 0.04
    "grpo": Method(("train.method=grpo", "train.beta=0.04"), True, "+GRPO (= w/o memorisation)", "#ff7f0e"),
    "sft": Method(("train.method=sft", "train.sft_target=refined"), True, "+SFT refined (= w/o exploration)",
                  "#8c564b", rollouts=False),
    "two_stage": Method(("train.method=two_stage", "train.sft_target=refined", "train.beta=0.04"), False,
                        "+two-stage SFT->GRPO", "#2ca02c"),
    "dyme_no_checker": Method(("train.method=dyme", "train.checker=none",
                               "train.reward_weights={format: 1.0, accuracy: 1.0, thinking: 0.0}"), False,
                              "DyME w/o checker", "#d62728"),
    "dyme_no_refiner": Method(("train.method=dyme", "train.use_refiner=false"), False, "DyME w/o refiner",
                              "#9467bd"),
    "sft_low": Method(("train.method=sft", "train.sft_target=hint"), False, "+SFT low-quality traces", "#e377c2",
                      hint_trace="low", rollouts=False),
}
BASE_LABEL, BASE_COLOR = "base", "#7f7f7f"
# DyME is compared with each of these (issue 12's goal: >= 3 points above the best of them, >= 5 above base)
BASELINES = ("sft", "grpo", "two_stage")
GOAL_VS_BEST_BASELINE, GOAL_VS_BASE = 0.03, 0.05
# Question types answered from one read of the chart; everything else takes several steps.
SINGLE_STEP_QTYPES = frozenset({"value_lookup", "lookup", "max_label", "min_label", "max", "min", "count"})
# Per-step metrics kept from each run's metrics.jsonl (the trainer logs more).
HISTORY_KEYS = (
    "step", "phase_sft", "loss", "loss/nll_memorized", "reward/format", "reward/accuracy", "reward/thinking",
    "reward/total", "mode/memorize", "mode/explore", "mode/skip", "frac_reward_zero_std",
    "completion/mean_length", "completion/clipped_ratio", "grad_norm", "time/step_s", "time/generation_s",
    "memory/peak_mb",
)
FORBIDDEN_MODULES = ("trl", "datasets", "mlflow", "great_expectations", "kfp", "dvc")
EXIT_INCOMPLETE = 3


@dataclass(frozen=True)
class Plan:
    """The harness's own settings of a scale, which are not config keys (a scale's ``plan:``)."""

    lr_grid: str  # comma list, e.g. "1e-4,3e-4,1e-3"
    shared_lr: float  # the common-LR table; must be in lr_grid
    seeds_core: int
    seeds_extended: int
    threads: int  # torch threads per run
    # planning only (the scheduler's estimate until a run of the kind has finished in this call)
    est_run_s: float  # one run with rollouts, training and both evaluations
    est_sft_s: float  # one run without rollouts
    est_eval_s: float  # the base's evaluation
    # the built-in tiny base (only without --base/--data): synthetic data and SFT from scratch on bare answers
    shards: int = 2
    train_per_shard: int = 28
    val_per_shard: int = 8
    test_per_shard: int = 14
    image_size: int = 64
    base_steps: int = 30
    base_batch: int = 16
    base_lr: float = 1e-3
    # share of the refined training traces given one wrong value in their Observation (`misstate_observations`):
    # a refiner that sometimes misreads the chart, as an LLM refiner may; 0 = the rule refiner's exact traces
    refined_noise: float = 0.0
    curve_points: int = 60  # training-curve rows kept per run
    n_boot: int = 2000  # bootstrap resamples in aggregate

    @property
    def lrs(self) -> list[float]:
        return [float(v) for v in self.lr_grid.split(",") if v.strip()]


@dataclass(frozen=True)
class Scale:
    """A scale file of bench/scales/: `config`, dotted dyme config keys applied to every run as ordinary
    overrides (validated by `dyme_core.config.load_config`), and the harness's `plan`."""

    name: str
    config: dict[str, Any]  # "train.max_steps" -> 40: the same keys as params.yaml, dotted
    plan: Plan
    sets: dict[str, str]  # the `--set` items given, recorded with every run

    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.config.items()]

    def value(self, key: str) -> Any:
        """A config key's value for every run: the scale's, else the config default."""
        from dyme_core.config import load_config

        section, name = key.split(".")
        return getattr(getattr(load_config(None, self.overrides()), section), name)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": self.sets, "config": self.config, "plan": dataclasses.asdict(self.plan)}


SCALES_DIR = Path(__file__).resolve().parent / "scales"
SCALES = sorted(p.stem.removeprefix("method-table-") for p in SCALES_DIR.glob("method-table-*.yaml"))


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_scale(name: str, sets: list[str] | None = None) -> Scale:
    """bench/scales/method-table-<name>.yaml with `--set` items: `section.key=value` a config key, `name=value` a
    plan field. A bad file, key or value is a one-line SystemExit naming it."""
    import yaml

    from dyme_core.config import ConfigError, load_config, parse_overrides

    path = SCALES_DIR / f"method-table-{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"scale {name!r}: no {path} (scales: {', '.join(SCALES)})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) != {"config", "plan"}:
        raise SystemExit(f"{path}: expected exactly the sections config and plan")
    config, plan = _dotted(raw["config"]), dict(raw["plan"])
    types = {f.name: str(f.type) for f in dataclasses.fields(Plan)}
    if unknown := sorted(set(plan) - set(types)):
        raise SystemExit(f"{path}: unknown plan field {unknown[0]} (known: {', '.join(types)})")
    given: dict[str, str] = {}
    for item in sets or []:
        key, _, text = item.partition("=")
        if not text or not ("." in key or key in types):
            raise SystemExit(f"--set {item!r}: expected section.key=VALUE (a config key) or FIELD=VALUE, FIELD one "
                             f"of {', '.join(types)}")
        given[key] = text
        if "." in key:
            config.update(_dotted(parse_overrides([item])))
        else:
            plan[key] = text
    parse = {"int": int, "float": float, "str": str}
    for key, value in plan.items():
        try:
            plan[key] = parse[types[key]](value)
        except ValueError:
            raise SystemExit(f"scale {name}: plan field {key}={value!r} is not a {types[key]}") from None
    try:
        load_config(None, [f"{key}={json.dumps(value)}" for key, value in config.items()])
        scale = Scale(name, config, Plan(**plan), given)
        [float(v) for v in scale.plan.lr_grid.split(",")]
    except ConfigError as e:
        raise SystemExit(f"scale {name}: {e}") from None
    except TypeError as e:
        raise SystemExit(f"{path}: plan: {e}") from None
    except ValueError:
        raise SystemExit(f"scale {name}: lr_grid {scale.plan.lr_grid!r} is not a comma list of numbers") from None
    return scale


# --------------------------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(f"[method_table {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rounded(x: Any, digits: int = 5) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v, digits) for v in x]
    return x


def environment() -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def run_id(method: str, lr: float | None = None, seed: int = 0) -> str:
    return "base" if method == "base" else f"{method}@lr{lr:g}@seed{seed}"


# ----------------------------------------------------------------------------------- per-question facts
def question_steps(sample) -> str:
    """"single" or "multi": meta["steps"] when the data says, else from the question type."""
    steps = sample.meta.get("steps")
    if steps in ("single", "multi"):
        return steps
    qtype = sample.qtype or sample.meta.get("qtype") or ""
    return "single" if qtype in SINGLE_STEP_QTYPES else "multi"


def hallucinated_numbers(thinking: str, sample) -> tuple[int, int]:
    """(numbers stated in `thinking`, of which hallucinated): neither among the chart's facts (the visual
    facts, else the numbers the hint states) nor in the question, nor the reference answer (a correctly
    derived result, e.g. a difference, is not made up). Distinct values are counted."""
    from dyme_core.checker import fact_set, hint_facts
    from dyme_core.rewards import extract_numbers

    stated = set(extract_numbers(thinking))
    facts = fact_set(sample.visual_facts) if sample.visual_facts else hint_facts(sample.hint or "")
    known = [*facts.numbers, *extract_numbers(sample.question),
             *(n for ref in sample.references() for n in extract_numbers(ref))]
    made_up = [n for n in stated if not any(math.isclose(n, f, rel_tol=1e-6, abs_tol=1e-9) for f in known)]
    return len(stated), len(made_up)


def score_predictions(pred_rows: list[dict], samples: dict[str, Any]) -> dict[str, Any]:
    """Per-split metrics of evaluate()'s predictions, questions ordered by sample id."""
    from dyme_core.rewards import parse_completion

    rows = sorted(pred_rows, key=lambda r: r["id"])
    correct = [int(bool(r["correct"])) for r in rows]
    by_steps: dict[str, list[int]] = {"single": [], "multi": []}
    by_type: dict[str, list[int]] = {}
    stated = made_up = with_made_up = 0
    for r, c in zip(rows, correct, strict=True):
        s = samples[r["id"]]
        by_steps[question_steps(s)].append(c)
        by_type.setdefault(r["qtype"], []).append(c)
        n, bad = hallucinated_numbers(parse_completion(r["completion"]).thinking, s)
        stated, made_up, with_made_up = stated + n, made_up + bad, with_made_up + (bad > 0)
    n = len(rows)
    return {
        "n": n, "ids_sha": _ids_digest([r["id"] for r in rows]),
        "acc": sum(correct) / n, "correct": "".join(map(str, correct)),
        "acc_single": statistics.fmean(by_steps["single"]) if by_steps["single"] else None,
        "acc_multi": statistics.fmean(by_steps["multi"]) if by_steps["multi"] else None,
        "n_single": len(by_steps["single"]), "n_multi": len(by_steps["multi"]),
        "format_rate": sum(r["format"] for r in rows) / n,
        "grounding": sum(r["grounding"] for r in rows) / n,
        "hallucinated_number_rate": made_up / stated if stated else 0.0,
        "answers_with_hallucinated_number": with_made_up / n,
        "numbers_stated_per_answer": stated / n,
        "mean_thinking_chars": sum(r["thinking_length"] for r in rows) / n,
        "acc_by_type": {k: statistics.fmean(v) for k, v in sorted(by_type.items())},
        "examples": [{k: r[k] for k in ("id", "qtype", "question", "reference", "completion", "correct")}
                     for r in rows[:2]],
    }


def _ids_digest(ids: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def downsample(rows: list[dict], n: int) -> list[dict]:
    """At most `n` rows, evenly spaced, first and last kept."""
    if len(rows) <= n or n < 2:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in picks]


# ---------------------------------------------------------------------------------------- one run (child)
def common_overrides(data_dir: Path) -> list[str]:
    return [f"data.path={data_dir}", f"data.out_dir={data_dir}", "model.dtype=float32", "train.bf16=auto",
            "train.report_to=[jsonl]", "train.progress_bar=false", "train.save_steps=0",
            "train.weight_decay=0.01", "train.max_grad_norm=1.0",
            # the refined Observation reads the whole chart in the form the base was pretrained to transcribe
            "refine.observe=all"]


def run_overrides(spec: dict, scale: Scale, run_dir: Path) -> list[str]:
    """The harness's fixed settings, then the scale's config keys, then this run's base, method, seed and LR."""
    refined = Path(spec["refined"])
    return [
        *common_overrides(Path(spec["data"])), "model.freeze_vision=true", "train.prompt_style=reason",
        "train.lr_scheduler=constant", "train.warmup_steps=0", "train.temperature=1.0", "train.logging_steps=1",
        *scale.overrides(),
        f"model.name_or_path={spec['base']}", f"train.output_dir={run_dir / 'train'}", f"train.refined={refined}",
        f"train.template_pool={refined.parent / 'templates.json'}", f"train.refine_cache_dir={run_dir / 'cache'}",
        f"train.seed={spec['seed']}", f"train.learning_rate={spec['lr']}", *METHODS[spec["method"]].overrides,
    ]


def evaluate_split(spec: dict, scale: Scale, model_dir: Path, out_dir: Path, dataset, split: str) -> dict:
    from dyme_core.config import load_config
    from dyme_core.evaluate import evaluate

    cfg = load_config(None, [*common_overrides(Path(spec["data"])), *scale.overrides(),
                             f"evaluate.model_path={model_dir}", f"evaluate.out_dir={out_dir}",
                             "evaluate.prompt_style=reason", f"evaluate.split={split}"])
    evaluate(cfg, dataset)
    preds = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return score_predictions(preds, {s.id: s for s in dataset.split(split)})


def child_run(spec_path: Path) -> int:
    """Train (unless `base`) and evaluate one run; write its record to <run_dir>/result.json."""
    import torch

    from dyme_core.config import load_config
    from dyme_core.data.ingest import open_dataset
    from dyme_core.data.loaders import Dataset
    from dyme_core.trainer import DymeTrainer, load_refined

    spec = json.loads(spec_path.read_text())
    scale = scale_of(spec["scale"])
    torch.set_num_threads(scale.plan.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    run_dir = Path(spec["run_dir"])
    t0 = time.perf_counter()
    dataset = open_dataset(spec["data"])
    record: dict[str, Any] = {"id": spec["id"], "method": spec["method"], "lr": spec["lr"], "seed": spec["seed"],
                              "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), **environment()}
    if spec["method"] == "base":
        model_dir = Path(spec["base"])
        gate = model_dir / "gate.json"
        record["gate"] = json.loads(gate.read_text()) if gate.is_file() else None
        record["train_s"] = 0.0
    else:
        method = METHODS[spec["method"]]
        train_set = dataset
        if method.hint_trace:
            # the SFT target is the hint: put the requested trace quality there
            missing = [s.id for s in dataset.split("train") if method.hint_trace not in s.meta.get("traces", {})]
            if missing:
                raise ValueError(f"{spec['method']}: {len(missing)} training samples lack meta.traces."
                                 f"{method.hint_trace} (first {missing[0]!r})")
            train_set = Dataset(dataset.root, [dataclasses.replace(s, hint=s.meta["traces"][method.hint_trace])
                                               if s.split == "train" else s for s in dataset.samples],
                                dataset.max_pixels)
        cfg = load_config(None, run_overrides(spec, scale, run_dir))
        trainer = DymeTrainer(cfg, train_set, load_refined(spec["refined"]))
        t_train = time.perf_counter()
        trainer.train()
        record["train_s"] = round(time.perf_counter() - t_train, 1)
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # the trainer publishes output_dir by a rename: it gets a folder of its own inside the run's
        model_dir = run_dir / "train" / "model"
        lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
        history = [json.loads(line) for line in lines if line.strip()]
        record["history"] = rounded(downsample([{k: h[k] for k in HISTORY_KEYS if k in h} for h in history],
                                               scale.plan.curve_points), 4)
    t_eval = time.perf_counter()
    if dataset.split("val"):
        val = evaluate_split(spec, scale, model_dir, run_dir / "eval-val", dataset, "val")
        record["val"] = {k: val[k] for k in ("n", "acc", "format_rate", "ids_sha")}
    else:
        record["val"] = None
    record["test"] = rounded(evaluate_split(spec, scale, model_dir, run_dir / "eval-test", dataset, "test"))
    record["eval_s"] = round(time.perf_counter() - t_eval, 1)
    record["total_s"] = round(time.perf_counter() - t0, 1)
    if spec["method"] != "base":
        shutil.rmtree(model_dir, ignore_errors=True)  # 16 runs a call: keep the disk small
    write_json(run_dir / "result.json", record)
    return 0


# ----------------------------------------------------------------------------------- planning (parent)
def n_seeds(method: str, plan: Plan) -> int:
    return plan.seeds_core if METHODS[method].core else plan.seeds_extended


def choose_lr(method: str, plan: Plan, done: dict[str, dict]) -> float | None:
    """The grid LR with the best val accuracy at seed 0 (ties: shared LR, then lower); None until all ran."""
    recs = [done.get(run_id(method, lr, 0)) for lr in plan.lrs]
    if any(r is None for r in recs):
        return None
    def key(r: dict) -> tuple:
        val = r["val"]["acc"] if r.get("val") else r["test"]["acc"]  # no val split (smoke data only)
        return (-val, r["lr"] != plan.shared_lr, r["lr"])
    return min(recs, key=key)["lr"]


def planned_runs(methods: list[str], plan: Plan, done: dict[str, dict]) -> tuple[list[dict], int]:
    """(the runs that can start now, in priority order; how many are still to run at all)."""
    ready: list[dict] = []
    remaining = 0
    if "base" not in done:
        ready.append({"id": "base", "method": "base", "lr": None, "seed": 0})
    ordered = sorted(methods, key=lambda m: (not METHODS[m].core, list(METHODS).index(m)))
    later: list[dict] = []  # the extended methods' grid waits behind the core methods' other seeds
    for method in ordered:
        grid = [{"id": run_id(method, lr, 0), "method": method, "lr": lr, "seed": 0} for lr in plan.lrs]
        (ready if METHODS[method].core else later).extend(r for r in grid if r["id"] not in done)
        chosen = choose_lr(method, plan, done)
        n_more = n_seeds(method, plan) - 1
        if chosen is None:
            remaining += n_more
            continue
        ready.extend(r for s in range(1, n_seeds(method, plan))
                     if (r := {"id": run_id(method, chosen, s), "method": method, "lr": chosen, "seed": s})["id"]
                     not in done)
    ready.extend(later)
    return ready, remaining + len(ready)


def load_records(folders: list[Path]) -> tuple[dict[str, dict], list[dict]]:
    """(successful runs by id, failed records) from every runs*.jsonl in `folders` (the first folder wins)."""
    done: dict[str, dict] = {}
    failed: list[dict] = []
    for folder in reversed(folders):
        for path in sorted(folder.glob("runs*.jsonl")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
                    log(f"WARNING: {path}:{n} is not JSON (cut off?), ignored")
                    continue
                if rec.get("failed"):
                    failed.append(rec)
                else:
                    done[rec["id"]] = rec
    return done, failed


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


@dataclass
class Active:
    spec: dict
    proc: subprocess.Popen
    gpu: int | None
    started: float
    run_dir: Path


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End one run's process group: SIGTERM, then SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


class Context:
    def __init__(self, args: argparse.Namespace, scale: Scale):
        self.out = Path(args.out)
        self.sources = [self.out, *(Path(p) for p in args.from_dirs)]
        self.work = Path(args.work or f"/tmp/dyme-method-table-{scale.name}")
        self.data = Path(args.data) if args.data else self.work / "data"
        self.base = Path(args.base) if args.base else self.work / "base"
        self.scale, self.plan = scale, scale.plan
        self.methods: list[str] = args.methods or list(METHODS)
        self.parallel = args.parallel
        self.results_name = args.results_name
        self.deadline = time.monotonic() + args.deadline_s if args.deadline_s > 0 else math.inf

    def time_left(self) -> float:
        return self.deadline - time.monotonic()



def scale_of(record: dict[str, Any]) -> Scale:
    """The Scale a run record (or a run's spec) was made with."""
    return Scale(record["name"], record["config"], Plan(**record["plan"]), record["overrides"])


def plan_of(record: dict[str, Any]) -> Plan:
    """The plan of a run record; records written before scales were files (2026-12-04 and earlier) hold the plan's
    fields at the top level of their flat `scale`."""
    if "plan" in record:
        return Plan(**record["plan"])
    return Plan(**{f.name: record[f.name] for f in dataclasses.fields(Plan) if f.name in record})


_OBSERVED_VALUE = re.compile(r"= (\d+)")


def misstate_observations(path: Path, share: float, seed: int = 0) -> int:
    """Rewrite refined targets so that round(share * n) of them (a seeded choice) state one wrong value: one
    `label = N` of the Observation line gets another integer of 10-99. The reasoning and the conclusion keep the
    true values, as a refiner that misreads one bar but is given the answer writes. Returns how many changed."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"refined_noise must be in [0, 1], got {share}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    # per record, the first Observation line that states a value (None: nothing to misstate)
    observed = [next((j for j, line in enumerate(r["trace"].splitlines())
                      if line.startswith("Observation:") and _OBSERVED_VALUE.search(line)), None) for r in records]
    candidates = [i for i, at in enumerate(observed) if at is not None]
    chosen = sorted(rng.sample(candidates, min(len(candidates), round(share * len(records)))))
    for i in chosen:
        lines, at = records[i]["trace"].splitlines(), observed[i]
        values = list(_OBSERVED_VALUE.finditer(lines[at]))
        hit = rng.choice(values)
        wrong = rng.choice([v for v in range(10, 100) if v != int(hit.group(1))])
        lines[at] = lines[at][: hit.start(1)] + str(wrong) + lines[at][hit.end(1):]
        records[i]["trace"] = "\n".join(lines)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(chosen)


def ensure_refined(ctx: Context) -> Path:
    """Offline refined targets (rule refiner) for the training split: what DyME and SFT memorise; with
    `refined_noise`, a share of them misstate one observed value (`misstate_observations`)."""
    from dyme_core import steps
    from dyme_core.config import load_config

    out = ctx.work / "refined" / "targets.jsonl"
    stamp = out.with_name("data.txt")
    made_from = f"{ctx.data.resolve()} noise={ctx.plan.refined_noise:g}"
    budget = ctx.scale.value("train.max_new_tokens")
    if not (out.is_file() and stamp.is_file() and stamp.read_text() == made_from):
        # the base's tokenizer and the run budget: refine warns when the targets do not fit the budget
        cfg = load_config(None, [*common_overrides(ctx.data), f"model.name_or_path={ctx.base}",
                                 f"train.max_new_tokens={budget}", f"refine.out={out}",
                                 f"refine.template_pool={out.parent / 'templates.json'}",
                                 f"refine.cache_dir={ctx.work / 'refine_cache'}", "refine.splits=[train]"])
        stats = steps.refine(cfg)
        if ctx.plan.refined_noise:
            wrong = misstate_observations(out, ctx.plan.refined_noise)
            log(f"refined_noise {ctx.plan.refined_noise:g}: {wrong} of {stats['n']} targets state one wrong value")
        stamp.write_text(made_from)
        log(f"refined {stats['n']} training targets: {stats['target_tokens_p50']} / {stats['target_tokens_p95']} / "
            f"{stats['target_tokens_max']} {stats['target_tokens_unit']} (p50 / p95 / max; budget "
            f"{budget})")
    return out


def piece_runs(ctx: Context) -> bool:
    """Launch every run that fits; append each finished one to the results file. True when all are done."""
    s = ctx.plan
    if s.shared_lr not in s.lrs:
        raise ValueError(f"shared_lr {s.shared_lr:g} is not in lr_grid {s.lr_grid!r}")
    for path, what in ((ctx.base, "--base"), (ctx.data, "--data")):
        if not path.is_dir():
            raise FileNotFoundError(f"{what} {path} is not a folder (give one, or run the `prepare` piece)")
    done, _ = load_records(ctx.sources)
    ready, remaining = planned_runs(ctx.methods, s, done)
    if remaining == 0:
        log(f"runs: all done already ({len(done)} recorded)")
        return True
    refined = ensure_refined(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    results = ctx.out / ctx.results_name
    n_gpus = gpu_count()
    log(f"runs: {len(done)} recorded, {remaining} to go; {ctx.parallel} in parallel on "
        f"{n_gpus or 'no'} GPU(s), {s.threads} torch thread(s) each; {ctx.time_left():.0f}s left")
    scale_rec = ctx.scale.record()
    active: dict[str, Active] = {}
    failed: set[str] = set()
    measured: dict[str, float] = {}  # kind -> longest seconds of a run of that kind in this call

    def kind(spec: dict) -> str:
        return "base" if spec["method"] == "base" else ("rl" if METHODS[spec["method"]].rollouts else "sft")

    def estimate(spec: dict) -> float:
        return measured.get(kind(spec), {"base": s.est_eval_s, "rl": s.est_run_s, "sft": s.est_sft_s}[kind(spec)])

    def launch(spec: dict) -> None:
        load = {g: sum(a.gpu == g for a in active.values()) for g in range(n_gpus)}
        gpu = min(load, key=lambda g: (load[g], g)) if n_gpus else None
        run_dir = ctx.work / "runs" / spec["id"].replace("@", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        full = {**spec, "data": str(ctx.data.resolve()), "base": str(ctx.base.resolve()), "refined": str(refined),
                "run_dir": str(run_dir), "scale": scale_rec}
        (run_dir / "spec.json").write_text(json.dumps(full))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if gpu is None else str(gpu),
               "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads), "TQDM_DISABLE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        with (run_dir / "log.txt").open("w") as f:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_run", str(run_dir / "spec.json")],
                                    stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        active[spec["id"]] = Active(spec, proc, gpu, time.monotonic(), run_dir)
        log(f"start {spec['id']} on {'GPU ' + str(gpu) if gpu is not None else 'CPU'} "
            f"(about {estimate(spec):.0f}s; {ctx.time_left():.0f}s left)")

    def reap(a: Active) -> None:
        secs = time.monotonic() - a.started
        result = a.run_dir / "result.json"
        if a.proc.returncode == 0 and result.is_file():
            rec = json.loads(result.read_text())
            rec.update(wall_s=round(secs, 1), scale=scale_rec, parallel=ctx.parallel, n_gpus=n_gpus)
            append_jsonl(results, rec)
            done[rec["id"]] = rec
            measured[kind(a.spec)] = max(measured.get(kind(a.spec), 0.0), secs)
            val = f" val {rec['val']['acc']:.3f}" if rec.get("val") else ""
            log(f"done  {rec['id']}: test {rec['test']['acc']:.3f}{val} format {rec['test']['format_rate']:.2f} "
                f"| train {rec['train_s']:.0f}s eval {rec['eval_s']:.0f}s wall {secs:.0f}s")
        else:
            tail = (a.run_dir / "log.txt").read_text(errors="replace")[-1500:]
            append_jsonl(results, {"id": a.spec["id"], "failed": True, "rc": a.proc.returncode,
                                   "wall_s": round(secs, 1), "log_tail": tail})
            failed.add(a.spec["id"])
            last = [line for line in tail.splitlines() if line.strip()][-1:] or ["(no output)"]
            log(f"FAILED {a.spec['id']} (exit {a.proc.returncode}) after {secs:.0f}s: {last[0]}")

    def on_term(signum: int, _frame) -> None:
        # the runs live in their own process groups: a SIGTERM to this process alone must not orphan them
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            for rid, a in list(active.items()):
                if a.proc.poll() is not None:
                    del active[rid]
                    reap(a)
            if ctx.time_left() <= 0:
                for rid, a in list(active.items()):
                    log(f"deadline: stopping {rid} after {time.monotonic() - a.started:.0f}s (not recorded)")
                    _stop(a.proc)
                    del active[rid]
                break
            ready, remaining = planned_runs(ctx.methods, s, done)
            ready = [r for r in ready if r["id"] not in active and r["id"] not in failed]
            for spec in ready:
                if len(active) >= ctx.parallel:
                    break
                if estimate(spec) <= ctx.time_left():
                    launch(spec)
            if not active:
                break
            time.sleep(1.0)
    finally:
        for a in active.values():  # an exception or a signal in the parent: leave no orphan runs
            _stop(a.proc, grace_s=3.0)
        signal.signal(signal.SIGTERM, previous)
    _, remaining = planned_runs(ctx.methods, s, done)
    log(f"runs: {len(done)} recorded, {len(failed)} failed in this call, {remaining} still to run")
    return remaining == 0


# ------------------------------------------------------------------------------ the built-in tiny base
def _synth_shard(out_dir: str, seed: int, n_train: int, n_val: int, n_test: int, image_size: int) -> str:
    from dyme_core.config import SynthConfig
    from dyme_core.data.synth import synthesize

    return str(synthesize(SynthConfig(out_dir=out_dir, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                                      image_size=image_size, trace_quality="medium")))


def piece_prepare(ctx: Context) -> None:
    """Without --base/--data: a synthetic chart set and a tiny base trained on bare answers, in --work.

    For the CPU smoke scale (the real base and data come from bench/chart_base.py). Deterministic:
    per-shard seeds, merged with unique ids.
    """
    from dyme_core.data.schema import Sample, read_jsonl, write_jsonl

    s = ctx.plan
    spec = {"shards": s.shards, "train": s.train_per_shard, "val": s.val_per_shard, "test": s.test_per_shard,
            "image_size": s.image_size, "base_steps": s.base_steps, "base_batch": s.base_batch, "base_lr": s.base_lr}
    marker = ctx.work / "prepare_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and (ctx.base / "config.json").is_file():
        log("prepare: done already")
        return
    t0 = time.perf_counter()
    for d in (ctx.data, ctx.base, ctx.work / "shards"):
        shutil.rmtree(d, ignore_errors=True)
    jobs = [(str(ctx.work / "shards" / f"{j:02d}"), j, s.train_per_shard, s.val_per_shard, s.test_per_shard,
             s.image_size) for j in range(s.shards)]
    with ProcessPoolExecutor(max(1, min(s.shards, os.cpu_count() or 1)), mp_context=get_context("spawn")) as pool:
        list(pool.map(_synth_shard, *zip(*jobs, strict=True)))
    (ctx.data / "images").mkdir(parents=True)
    merged = []
    for j, job in enumerate(jobs):
        for row in read_jsonl(Path(job[0]) / "samples.jsonl"):
            x = Sample.from_dict(row)
            new_id = f"synth-{x.split}-{j:02d}-{x.id.rsplit('-', 1)[1]}"
            os.replace(Path(job[0]) / x.image, ctx.data / "images" / f"{new_id}.png")
            merged.append(dataclasses.replace(x, id=new_id, image=f"images/{new_id}.png"))
    write_jsonl(sorted(merged, key=lambda x: x.id), ctx.data / "samples.jsonl")
    shutil.rmtree(ctx.work / "shards")
    _train_tiny_base(ctx)
    marker.write_text(json.dumps(spec))
    log(f"prepare: {len(merged)} samples and a tiny base in {time.perf_counter() - t0:.0f}s")


def _train_tiny_base(ctx: Context) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from dyme_core import steps
    from dyme_core.config import ModelConfig, load_config
    from dyme_core.data.ingest import open_dataset
    from dyme_core.data.loaders import Dataset
    from dyme_core.models import load_processor, save_model
    from dyme_core.trainer import DymeTrainer

    s = ctx.plan
    init_dir, run_dir = ctx.work / "init", ctx.work / "base-run"
    for d in (init_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(None, [
        *common_overrides(ctx.data), f"init_model.out_dir={init_dir}", "init_model.seed=0",
        "init_model.vocab_size=1024", "init_model.hidden_size=128", "init_model.num_layers=2",
        "init_model.num_heads=4", "init_model.vision_hidden_size=64", "init_model.vision_layers=2",
        f"init_model.image_size={s.image_size}", "init_model.patch_size=8",
        f"model.name_or_path={init_dir}", "model.freeze_vision=false", "train.method=sft",
        "train.prompt_style=reason", "train.sft_target=hint", f"train.output_dir={run_dir}", "train.refined=",
        "train.template_pool=", "train.refine_cache_dir=", "train.seed=0", f"train.max_steps={s.base_steps}",
        f"train.batch_size={s.base_batch}", f"train.micro_batch_size={s.base_batch}",
        f"train.learning_rate={s.base_lr}", "train.lr_scheduler=cosine", "train.warmup_steps=0",
    ])
    ds = open_dataset(ctx.data)
    # the tokenizer sees the training split's text only: nothing of the test split leaks in
    steps.init_model(cfg, Dataset(ds.root, ds.split("train")))
    # bare answers under the reasoning prompt ("Answer: <gt>"): it answers with the flag, never thinks
    DymeTrainer(cfg, Dataset(ds.root, [dataclasses.replace(x, hint=None) for x in ds.samples])).train()
    model = AutoModelForImageTextToText.from_pretrained(run_dir / "model", dtype=torch.bfloat16)
    save_model(model, load_processor(ModelConfig(name_or_path=str(run_dir / "model"))), ctx.base)


# ----------------------------------------------------------------------------------------- aggregate
def _vector(rec: dict) -> list[int]:
    return [int(c) for c in rec["test"]["correct"]]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _mean_curve(histories: list[list[dict]], key: str, rl_only: bool = True) -> list[list[float]]:
    """[[step, mean over seeds], ...] where the key was logged (RL steps only unless `rl_only` is False)."""
    by_step: dict[int, list[float]] = {}
    for hist in histories:
        for h in hist:
            if key in h and not (rl_only and h.get("phase_sft", 0) >= 0.5):
                by_step.setdefault(int(h["step"]), []).append(h[key])
    return [[st, statistics.fmean(v)] for st, v in sorted(by_step.items())]


def summarize_runs(recs: list[dict]) -> dict[str, Any]:
    """Means over seeds of one method's runs (at one LR)."""
    t = [r["test"] for r in recs]
    out = {"seeds": sorted(r["seed"] for r in recs), "lr": recs[0]["lr"],
           "acc_by_seed": [x["acc"] for x in t],
           "val_acc": _mean([r["val"]["acc"] if r.get("val") else None for r in recs])}
    for key in ("acc", "acc_single", "acc_multi", "format_rate", "grounding", "hallucinated_number_rate",
                "answers_with_hallucinated_number", "mean_thinking_chars"):
        out[key] = _mean([x.get(key) for x in t])
    out["acc_sd_over_seeds"] = statistics.stdev(out["acc_by_seed"]) if len(recs) > 1 else None
    hists = [r.get("history", []) for r in recs]
    rl = [h for hist in hists for h in hist if h.get("phase_sft", 0) < 0.5 and "mode/memorize" in h]
    out["train"] = {k: _mean([h.get(k) for h in rl]) for k in ("frac_reward_zero_std", "mode/memorize",
                                                                "mode/explore", "mode/skip", "reward/accuracy",
                                                                "reward/format", "reward/thinking")}
    out["train"].update(train_s=_mean([r["train_s"] for r in recs]), wall_s=_mean([r.get("wall_s") for r in recs]),
                        step_s=_mean([h.get("time/step_s") for hist in hists for h in hist]))
    out["curves"] = {k: _mean_curve(hists, k) for k in ("reward/accuracy", "reward/total", "reward/format",
                                                       "reward/thinking", "frac_reward_zero_std", "mode/memorize",
                                                       "mode/explore", "mode/skip")}
    out["curves"]["loss/nll_memorized"] = [p for p in _mean_curve(hists, "loss/nll_memorized", rl_only=False)
                                           if p[1] > 0]
    return out


def piece_aggregate(ctx: Context) -> dict[str, Any]:
    """results.json, table.md, curves.png, modes.png from the runs*.jsonl files."""
    from dyme_core.stats import paired_intervals, per_question_mean

    done, failed = load_records(ctx.sources)
    if "base" not in done:
        raise FileNotFoundError(f"aggregate needs the base run in a runs*.jsonl under {[str(p) for p in ctx.sources]}")
    base = done["base"]
    warnings = [f"run {r['id']} failed (exit {r.get('rc')})" for r in failed if r["id"] not in done]
    ids_sha = base["test"]["ids_sha"]
    if bad := sorted(i for i, r in done.items() if r["test"]["ids_sha"] != ids_sha):
        raise ValueError(f"runs evaluated on other test questions than the base: {bad}")
    scale = base["scale"]
    if diff := sorted(i for i, r in done.items() if {k: v for k, v in r["scale"].items() if k != "n_boot"}
                      != {k: v for k, v in scale.items() if k != "n_boot"}):
        warnings.append(f"runs at another scale than the base run: {diff}")
    sc = plan_of(scale)
    lrs, shared_lr = sc.lrs, sc.shared_lr
    tuned: dict[str, dict] = {}
    shared: dict[str, dict] = {}
    lr_choice: dict[str, Any] = {}
    for method in METHODS:
        grid = {lr: done.get(run_id(method, lr, 0)) for lr in lrs}
        if not any(grid.values()):
            continue
        lr_choice[method] = {f"{lr:g}": (r["val"]["acc"] if r and r.get("val") else None) for lr, r in grid.items()}
        if grid.get(shared_lr):
            shared[method] = summarize_runs([grid[shared_lr]])
        chosen = choose_lr(method, sc, done)
        if chosen is None:
            warnings.append(f"{method}: LR grid incomplete ({sum(r is not None for r in grid.values())}/{len(lrs)})")
            continue
        recs = [r for sd in range(n_seeds(method, sc)) if (r := done.get(run_id(method, chosen, sd)))]
        if len(recs) < n_seeds(method, sc):
            warnings.append(f"{method}: {len(recs)} of {n_seeds(method, sc)} seeds at the chosen LR {chosen:g}")
        tuned[method] = summarize_runs(recs)
        tuned[method]["vector"] = per_question_mean([_vector(r) for r in recs])
    base_summary = summarize_runs([base])
    base_summary["vector"] = per_question_mean([_vector(base)])
    results: dict[str, Any] = {"scale": scale, "paper": PAPER, "gate": base.get("gate"), "warnings": warnings,
                               "lr_choice_val_acc": lr_choice, "n_test": base["test"]["n"],
                               "devices": sorted({f"{r['device']} (torch {r['torch']}, transformers "
                                                  f"{r['transformers']}, {r['date_utc']} UTC)"
                                                  for r in done.values()})}
    for name, table in (("tuned", tuned), ("shared_lr", shared)):
        vectors = {"base": base_summary["vector"], **{m: t.get("vector", per_question_mean(
            [_vector(done[run_id(m, t["lr"], 0)])])) for m, t in table.items()}}
        pairs = [(m, "base") for m in table]
        pairs += [("dyme", b) for b in BASELINES if "dyme" in table and b in table]
        single, diffs = paired_intervals(vectors, pairs, n_boot=sc.n_boot, seed=0)
        rows = {"base": {**{k: v for k, v in base_summary.items() if k != "vector"}, "ci": single["base"].as_dict()}}
        for m, t in table.items():
            rows[m] = {**{k: v for k, v in t.items() if k != "vector"}, "ci": single[m].as_dict(),
                       "minus_base": diffs[f"{m}-base"].as_dict()}
        results[name] = {"methods": rows, "dyme_minus": {b: diffs[f"dyme-{b}"].as_dict() for b in BASELINES
                                                        if f"dyme-{b}" in diffs}}
        results[name]["goal"] = goal_check(results[name])
    results = rounded(results, 4)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json(ctx.out / "results.json", results)
    (ctx.out / "table.md").write_text(render_table(results))
    plot_curves(results["tuned"]["methods"], ctx.out / "curves.png")
    plot_modes(results["tuned"]["methods"], ctx.out / "modes.png")
    for w in warnings:
        log(f"WARNING: {w}")
    log(f"aggregate: {len(done)} runs -> results.json, table.md, curves.png, modes.png")
    print(render_table(results).split("\n\n## Training")[0], flush=True)
    return results


def goal_check(table: dict) -> dict[str, Any]:
    """Issue 12's goal lines: DyME >= 3 points above the best of sft/grpo/two_stage and >= 5 above base,
    each with an interval that excludes zero. Reported, never tuned for."""
    rows, dm = table["methods"], table["dyme_minus"]
    if "dyme" not in rows:
        return {"evaluated": False, "why": "no dyme runs"}
    present = [b for b in BASELINES if b in dm]
    out: dict[str, Any] = {"evaluated": True, "baselines_present": present}
    if present:
        best = max(present, key=lambda b: rows[b]["acc"])
        d = dm[best]
        out["vs_best_baseline"] = {"best": best, "diff": d["point"], "ci": [d["lo"], d["hi"]],
                                   "met": d["point"] >= GOAL_VS_BEST_BASELINE and d["lo"] > 0}
    d = rows["dyme"]["minus_base"]
    out["vs_base"] = {"diff": d["point"], "ci": [d["lo"], d["hi"]], "met": d["point"] >= GOAL_VS_BASE and d["lo"] > 0}
    out["met"] = bool(out["vs_base"]["met"] and out.get("vs_best_baseline", {}).get("met", False)
                      and len(present) == len(BASELINES))
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x * 100:.{digits}f}"


def _ci(c: dict) -> str:
    return f"{c['point'] * 100:+.1f} [{c['lo'] * 100:+.1f}, {c['hi'] * 100:+.1f}]"


def run_sizes(record: dict[str, Any]) -> dict[str, Any]:
    """Steps, prompts, K, new tokens, loss and beta of a scale record, for the table's header. Records written before
    scales were files (2026-12-04 and earlier) hold them flat, under the names steps, batch, k, ..."""
    if "config" not in record:
        return {k: record[k] for k in ("steps", "batch", "k", "max_new_tokens", "loss_type", "beta")}
    scale = scale_of(record)
    return {name: scale.value(key) for name, key in (
        ("steps", "train.max_steps"), ("batch", "train.batch_size"), ("k", "train.num_generations"),
        ("max_new_tokens", "train.max_new_tokens"), ("loss_type", "train.loss_type"), ("beta", "train.beta"))}


def render_table(results: dict) -> str:
    sc = results["scale"]
    plan, size = plan_of(sc), run_sizes(sc)
    paper_ref = {"sft": ("sft", "ablation_no_exploration"), "grpo": ("grpo", "ablation_no_memorization"),
                 "dyme": ("dyme", "dyme_full_ablation"), "base": ("base", None), "two_stage": ("two_stage", None),
                 "dyme_no_checker": (None, "dyme_no_checker"), "dyme_no_refiner": (None, "dyme_no_refiner"),
                 "sft_low": (None, None)}

    def paper(m: str, i: int) -> str:
        key = paper_ref[m][i]
        return f"{PAPER[key]['acc']:.1f}" if key else ""

    lines = ["# Method table in miniature (bench/method_table.py)", "",
             f"Scale `{sc['name']}`{' with ' + json.dumps(sc['overrides']) if sc['overrides'] else ''}: "
             f"{size['steps']} steps x {size['batch']} prompts x K={size['k']}, {size['max_new_tokens']} new tokens, "
             f"loss `{size['loss_type']}`, beta {size['beta']}; LR grid {plan.lr_grid} chosen per method on val (seed "
             f"0), shared LR {plan.shared_lr:g}; {plan.seeds_core} seeds for sft/grpo/dyme, {plan.seeds_extended} "
             f"for the rest. Test split: {results['n_test']} questions, relaxed accuracy in %; 95% paired-bootstrap "
             f"intervals ({plan.n_boot} resamples of the test questions, the same for every method, seeds "
             "averaged per question).", "",
             "Paper: SmolVLM-500M on ChartQA (base 63.2); ablation column: LLaVA-OV-0.5B, 3-domain average "
             "(full DyME 55.4).", ""]
    for name, title in (("tuned", "LR chosen per method on val"), ("shared_lr", f"every method at LR "
                                                                               f"{plan.shared_lr:g} (seed 0)")):
        table = results[name]
        lines += [f"## {title}", "",
                  "| method | LR | seeds | acc [95% CI] | Δ vs base [95% CI] | single | multi | format | grounding "
                  "| halluc. numbers | paper | paper ablation |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, r in table["methods"].items():
            label = BASE_LABEL if m == "base" else METHODS[m].label
            ci = r["ci"]
            acc = f"{ci['point'] * 100:.1f} [{ci['lo'] * 100:.1f}, {ci['hi'] * 100:.1f}]"
            delta = _ci(r["minus_base"]) if "minus_base" in r else ""
            lr = "" if r["lr"] is None else f"{r['lr']:g}"
            lines.append(f"| {label} | {lr} | {len(r['seeds'])} | {acc} | {delta} | {_pct(r['acc_single'])} | "
                         f"{_pct(r['acc_multi'])} | {_pct(r['format_rate'])} | {_pct(r['grounding'])} | "
                         f"{_pct(r['hallucinated_number_rate'])} | {paper(m, 0)} | {paper(m, 1)} |")
        lines.append("")
        for b, d in table["dyme_minus"].items():
            lines.append(f"- DyME − {METHODS[b].label}: {_ci(d)} points")
        g = table["goal"]
        if g.get("evaluated"):
            vb = g.get("vs_best_baseline")
            met = "MET" if g["vs_base"]["met"] else "not met"
            lines.append(f"- Goal (issue 12), DyME ≥ +5 vs base with CI > 0: {met} ({g['vs_base']['diff'] * 100:+.1f})")
            if vb:
                lines.append(f"- Goal, DyME ≥ +3 vs the best of sft/grpo/two_stage ({vb['best']}) with CI > 0: "
                             f"{'MET' if vb['met'] else 'not met'} ({vb['diff'] * 100:+.1f})")
        lines.append("")
    lines += ["## Training diagnostics (chosen LR, means over the RL steps of all seeds)", "",
              "| method | val acc by LR | train acc | zero-std | memorize | explore | skip | s/step | wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["tuned"]["methods"].items():
        if m == "base":
            continue
        t = r["train"]
        grid = ", ".join(f"{lr}: {_pct(v)}" for lr, v in results["lr_choice_val_acc"].get(m, {}).items())
        step_s = "n/a" if t["step_s"] is None else f"{t['step_s']:.2f}"
        wall = "n/a" if t["wall_s"] is None else f"{t['wall_s']:.0f}"
        lines.append(f"| {METHODS[m].label} | {grid} | {_pct(t['reward/accuracy'])} | "
                     f"{_pct(t['frac_reward_zero_std'], 0)} | {_pct(t['mode/memorize'], 0)} | "
                     f"{_pct(t['mode/explore'], 0)} | {_pct(t['mode/skip'], 0)} | {step_s} | {wall} |")
    lines += ["", render_gate(results.get("gate")), "",
              "Hallucinated numbers: share of the distinct numbers stated in the thinking that are neither among "
              "the chart's facts nor in the question nor the reference answer.", "",
              f"Runs on: {'; '.join(results['devices'])}.", *(f"WARNING: {w}" for w in results["warnings"]), ""]
    return "\n".join(lines)


def render_gate(gate: dict | None) -> str:
    """One line: the base's go/no-go gate (bench/chart_base.py's gate.json), each criterion's value and verdict."""
    if not gate:
        return "Base gate: no gate.json beside the base."
    crits = gate.get("criteria", {})
    def shown(c: dict) -> str:
        figures = {k: v for k, v in c.items() if k not in ("min", "max", "pass")}
        return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()) if \
            "value" not in figures else (f"{figures['value']:.3g}" if isinstance(figures["value"], float) else
                                         str(figures["value"]))

    parts = [f"{name} {shown(c)} ({'pass' if c.get('pass') else 'FAIL'})" for name, c in sorted(crits.items())]
    return f"Base gate (gate.json): {'PASS' if gate.get('pass') else 'FAIL'}; " + ", ".join(parts) + "."


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(m: str) -> str:
    return BASE_COLOR if m == "base" else METHODS[m].color


def plot_curves(methods: dict, path: Path) -> None:
    plt = _plt()
    panels = [("reward/accuracy", "accuracy reward"), ("reward/format", "format reward"),
              ("reward/thinking", "thinking (checker) reward"), ("frac_reward_zero_std", "zero-std share"),
              ("mode/memorize", "memorize share (c = 0)"), ("loss/nll_memorized", "NLL of memorised targets")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for m, r in methods.items():
            pts = r.get("curves", {}).get(key, [])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", ms=3, label=METHODS[m].label, color=_color(m))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncols=min(4, max(1, len(handles))), fontsize=8)
    fig.suptitle("Training curves at each method's chosen LR, mean over seeds")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def plot_modes(methods: dict, path: Path) -> None:
    plt = _plt()
    shown = [m for m in methods if m != "base" and METHODS[m].rollouts]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.3 * max(1, len(shown)), 3.2), squeeze=False)
    for ax, m in zip(axes[0], shown, strict=False):
        c = methods[m]["curves"]
        if c["mode/memorize"]:
            steps = [p[0] for p in c["mode/memorize"]]
            stack = [[p[1] for p in c[f"mode/{k}"]] for k in ("memorize", "explore", "skip")]
            ax.stackplot(steps, *stack, labels=["memorize (c=0)", "explore", "skip (c=K)"],
                         colors=["#dd8452", "#4c72b0", "#55a868"])
        ax.set_ylim(0, 1)
        ax.set_title(METHODS[m].label, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("fraction of prompt groups")
    if shown:
        axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_run"]:  # one run, started by the `runs` scheduler
        return child_run(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pieces", nargs="+", help="prepare | runs | aggregate | all (prepare when no --base, "
                                                  "runs, aggregate), run in the order given.")
    parser.add_argument("--scale", default="full", choices=SCALES,
                        help="Experiment size: bench/scales/method-table-<scale>.yaml.")
    parser.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Override the scale: a config key (train.max_steps=120) or a plan field "
                             "(lr_grid=1e-4,3e-4); recorded in every run.")
    parser.add_argument("--base", default="", help="The base model folder (HF save_pretrained; gate.json beside).")
    parser.add_argument("--data", default="", help="The materialised dataset folder (train/val/test).")
    parser.add_argument("--methods", type=lambda v: [m for m in v.split(",") if m], default=[],
                        help=f"Comma list of the methods to train (default all: {','.join(METHODS)}).")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (spread over the visible GPUs).")
    parser.add_argument("--out", required=True, help="Where this call's results go.")
    parser.add_argument("--results-name", default="runs.jsonl", help="The .jsonl (runs*.jsonl) this call appends to.")
    parser.add_argument("--from", dest="from_dirs", nargs="*", default=[],
                        help="Folders holding earlier calls' runs*.jsonl (read only).")
    parser.add_argument("--work", default="", help="Scratch: runs, refined targets, the built-in base "
                                                   "(default /tmp/dyme-method-table-<scale>).")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="Seconds this call may use: no run is started that would not finish, stragglers "
                             "are stopped at the end (exit 3 while runs remain).")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not args.results_name.startswith("runs") or not args.results_name.endswith(".jsonl"):
        parser.error("--results-name must look like runs*.jsonl (aggregate and resume read those)")
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    scale = load_scale(args.scale, args.sets)
    ctx = Context(args, scale)
    pieces = [p for piece in args.pieces
              for p in ((["prepare"] if not (args.base or args.data) else []) + ["runs", "aggregate"]
                        if piece == "all" else [piece])]
    if bad := [p for p in pieces if p not in ("prepare", "runs", "aggregate")]:
        parser.error(f"unknown piece(s) {bad}")
    if "prepare" in pieces and (args.base or args.data):
        parser.error("prepare builds the built-in base and data; not with --base/--data")
    if "runs" in pieces:
        log(f"scale {args.scale} {scale.sets or ''}; base {ctx.base}; data {ctx.data}; out {ctx.out}")
    t0 = time.perf_counter()
    complete = True
    try:
        for p in pieces:
            if p == "prepare":
                piece_prepare(ctx)
            elif p == "runs":
                complete = piece_runs(ctx) and complete
            elif complete:
                piece_aggregate(ctx)
            else:
                log("aggregate: skipped, runs remain (aggregate anywhere later from the .jsonl files)")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}): the runs in flight were stopped, every finished one is recorded")
        return 130
    finally:
        imported = sorted(m for m in FORBIDDEN_MODULES if m in sys.modules)
        log(f"total {time.perf_counter() - t0:.0f}s; modules outside the GPU stack imported: {imported or 'none'}")
    return 0 if complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
