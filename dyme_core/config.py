"""One validated configuration tree for every step (DESIGN.md section 5: config flows one way).

Dataclass defaults -> a YAML file laid out one section per step (the same layout as params.yaml)
-> ``section.key=value`` overrides from the command line or a KFP component, merged once by
:func:`load_config` into one :class:`Config`. Unknown keys and bad values raise :class:`ConfigError`
naming the key. Library code receives the object; it never reads YAML, environment or argv itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from dyme_core.rewards import REWARDS


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SynthConfig:
    out_dir: str = _f("data/synth", "Dataset root to write (samples.jsonl + images/).")
    seed: int = _f(0, "Random seed; the same seed gives byte-identical files.")
    n_train: int = _f(96, "Number of training samples.")
    n_val: int = _f(16, "Number of validation samples.")
    n_test: int = _f(48, "Number of test samples.")
    image_size: int = _f(224, "Rendered chart size in pixels (square).")
    chart_types: list = _f(["bar", "grouped_bar", "line", "pie"], "Chart kinds to render.")
    trace_quality: str = _f("medium", "Reference trace quality in `hint`: high | medium | low.",
                            choices=("high", "medium", "low"))
    style: str = _f("classic", "Chart drawing: classic (matplotlib; bar, grouped bar, line, pie; small fonts) | "
                    "readable (PIL; bar and line, 3-5 short labels, integer values 10-99 printed at each mark in "
                    "a font legible at the model's resolution; dyme_core/data/charts.py).",
                    choices=("classic", "readable"))
    train_qtypes: list = _f([], "Question types of the train split, one drawn per sample from this list, so a "
                            "repeated type weighs more (e.g. [difference, difference, value_lookup]: two thirds "
                            "difference); empty = every type in turn, as val and test always are.")


@dataclass
class DataConfig:
    path: str = _f("synthetic", "Source the ingest step reads: 'synthetic' (the chart generator, see synth), a "
                   "project-format folder or file, a DyME JSON file, a HF hub id, a local folder in the hub "
                   "layout (data/<split>-*.parquet or .arrow) or a save_to_disk folder.")
    format: str = _f("auto", "Source format: auto (detected) | synthetic | project | dyme_json | hf.",
                     choices=("auto", "synthetic", "project", "dyme_json", "hf"))
    out_dir: str = _f("data/dataset", "The materialised dataset ingest writes and every later step reads "
                      "(samples.parquet, images/, manifest.json).")
    report: str = _f("reports/ingest.json", "Ingest report (rows per split, dropped rows, carve); a DVC metric.")
    image_root: str = _f("", "Root that image paths are relative to (default: the source file's folder).")
    hf_split_map: dict = _f({"train": "train", "val": "validation", "test": "test"},
                            "Our split -> the source's split name (HF sources; 'val' also matches 'val').")
    hf_columns: dict = _f({"question": "query", "answer": "label", "image": "image"},
                          "Our field -> HF column (ChartQA's names by default).")
    task: str = _f("chart", "Task for samples that do not say: chart (relaxed accuracy) | vqa.")
    human_only: bool = _f(False, "Keep only rows whose human_or_machine says human (ChartQA's human split).")
    hint_quality: str = _f("", "Which reference trace becomes each row's hint when a source holds the same "
                           "questions with traces of three qualities: a DyME JSON folder (or one file of it) "
                           "with <split>_high.json, <split>_medium.json and <split>_low.json, read side by side "
                           "and matched row by row, or rows whose meta.traces has high/medium/low (the synthetic "
                           "set). Every quality's trace stays in meta.traces. '' = the hint the source gives (the "
                           "file data.path names; a folder of quality files needs a choice).",
                           choices=("", "high", "medium", "low"))
    val_fraction: float = _f(0.1, "Fraction of train carved out as val when the source has no val split.")
    test_fraction: float = _f(0.1, "Fraction of train carved out as test when the source has no test split.")
    split_seed: int = _f(0, "Seed of the deterministic val/test carve.")
    on_bad_row: str = _f("fail", "A bad source row: fail (one-line error naming row and reason) | drop "
                         "(dropped and counted in the ingest report).", choices=("fail", "drop"))


@dataclass
class ModelConfig:
    name_or_path: str = _f("models/tiny-smolvlm", "Hub id or local path of an image-text-to-text model.")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16.",
                    choices=("auto", "float32", "bfloat16", "float16"))
    freeze_vision: bool = _f(True, "Freeze the vision tower (the paper does).")
    lora_r: int = _f(0, "LoRA rank through peft; 0 trains the full model.")
    lora_alpha: int = _f(16, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Modules LoRA wraps.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless you trust it).")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa | eager | flash_attention_2.")


@dataclass
class InitModelConfig:
    family: str = _f("idefics3", "Model family of the tiny random model: idefics3 (SmolVLM) | llava_onevision | "
                     "qwen2_vl | qwen2_5_vl.", choices=("idefics3", "llava_onevision", "qwen2_vl", "qwen2_5_vl"))
    out_dir: str = _f("models/tiny-smolvlm", "Where to save the tiny random model and its processor.")
    seed: int = _f(0, "Seed for the random weights and tokenizer training order.")
    vocab_size: int = _f(1024, "BPE vocabulary size trained on the dataset's text.")
    hidden_size: int = _f(128, "Text model width.")
    num_layers: int = _f(2, "Text model layers.")
    num_heads: int = _f(4, "Text model attention heads.")
    num_kv_heads: int = _f(0, "Text model key/value heads (grouped-query attention, as SmolVLM, LLaVA-OneVision "
                           "and Qwen2-VL have; must divide num_heads); 0 = num_heads.")
    intermediate_size: int = _f(0, "Text model MLP width; 0 = 2 x hidden_size.")
    vision_hidden_size: int = _f(64, "Vision tower width.")
    vision_intermediate_size: int = _f(0, "Vision tower MLP width; 0 = 2 x vision_hidden_size.")
    vision_layers: int = _f(2, "Vision tower layers.")
    image_size: int = _f(64, "Image size the vision tower sees.")
    patch_size: int = _f(8, "Vision patch size.")
    scale_factor: int = _f(2, "Pixel-shuffle factor of the connector (Qwen2-VL: spatial merge size).")

    def __post_init__(self) -> None:
        if self.num_kv_heads < 0 or (self.num_kv_heads and self.num_heads % self.num_kv_heads):
            raise ConfigError(f"init_model.num_kv_heads={self.num_kv_heads} must divide init_model.num_heads="
                              f"{self.num_heads} (or be 0: as many as num_heads)")


@dataclass
class LLMConfig:
    base_url: str = _f("", "OpenAI-compatible endpoint, e.g. http://dyme-llm:8000/v1 ('' = not used).")
    model: str = _f("Qwen/Qwen2.5-1.5B-Instruct", "Model name sent to the endpoint.")
    api_key_env: str = _f("DYME_LLM_API_KEY", "Environment variable holding the API key (read by the CLI).")
    timeout_s: float = _f(30.0, "Total deadline of one attempt in seconds: connect, send, wait and read the "
                          "whole reply (a slow drip is cut off too).")
    max_retries: int = _f(2, "Retries after the first attempt (connection errors, deadline, 429, 5xx).")
    backoff_s: float = _f(0.5, "First backoff in seconds; doubles each retry, plus up to as much jitter. "
                          "A Retry-After header is honoured, capped by timeout_s.")
    max_response_bytes: int = _f(1_000_000, "Largest reply read; a longer one is abandoned while streaming.")
    breaker_failures: int = _f(3, "Consecutive failed requests that open the circuit breaker (0 = never).")
    breaker_cooldown_s: float = _f(60.0, "While open, the breaker stops calling for this long; then one request "
                                   "probes the endpoint.")
    on_failure: str = _f("fallback", "When the endpoint fails: fallback (to the rule backend, counted and "
                         "logged) | fail (a one-line error, non-zero exit).", choices=("fallback", "fail"))
    max_workers: int = _f(8, "Concurrent requests.")

    def __post_init__(self) -> None:
        finite_positive = {"timeout_s": self.timeout_s, "max_response_bytes": self.max_response_bytes,
                           "max_workers": self.max_workers}
        finite_non_negative = {"max_retries": self.max_retries, "backoff_s": self.backoff_s,
                               "breaker_failures": self.breaker_failures,
                               "breaker_cooldown_s": self.breaker_cooldown_s}
        for key, value in finite_positive.items():
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"llm.{key} must be a finite number > 0, got {value}")
        for key, value in finite_non_negative.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"llm.{key} must be a finite number >= 0, got {value}")


@dataclass
class ValidateConfig:
    report: str = _f("reports/validation.json", "Validation report (JSON) to write.")
    min_image_px: int = _f(16, "Smallest accepted image side.")
    max_image_px: int = _f(8192, "Largest accepted image side.")
    max_pixels: int = _f(8192 * 8192, "Largest accepted image area in pixels (decompression-bomb limit, "
                         "also used by ingest and when steps read images).")
    max_question_chars: int = _f(4000, "Longest accepted question.")
    max_answer_chars: int = _f(1000, "Longest accepted answer (each direct answer too).")
    max_hint_chars: int = _f(20000, "Longest accepted hint (reference reasoning).")
    min_rows: dict = _f({"train": 1, "test": 1}, "Minimum rows per split.")
    require_answer_in_facts: bool = _f(False, "Fail rows whose answer is a table label not found in the facts.")


@dataclass
class RefineConfig:
    backend: str = _f("rule", "rule (deterministic) | llm (OpenAI-compatible endpoint, rule fallback).",
                      choices=("rule", "llm"))
    out: str = _f("refined/targets.jsonl", "Refined reference traces, one per training sample.")
    template_pool: str = _f("refined/templates.json", "Persisted, versioned template pool.")
    cache_dir: str = _f(".cache/refine", "Refinement cache keyed by content hash.")
    splits: list = _f(["train"], "Splits to refine.")
    observe: str = _f("relevant", "Rows of a structured table the rule refiner's Observation states: relevant (the "
                      "rows the question names, all when it names none) | all (every row, in the chart's order: "
                      "the chart read out whole, as a model that can transcribe it reads it).",
                      choices=("relevant", "all"))
    max_trace_chars: int = _f(2000, "Longest refined trace accepted from the LLM; a longer one (or one that "
                              "does not state the answer) falls back to the rule refiner and is counted.")
    facts_from: str = _f("none", "Visual facts for rows with neither facts nor a hint (a Hugging Face ChartQA "
                         "folder): none (their traces only restate the question and the answer) | vlm (the "
                         "image and question go to refine.llm's endpoint, model refine.facts_model, which "
                         "transcribes the chart's data as a table; cached by image hash under cache_dir; the "
                         "facts are written into the targets, where training's checker reads them).",
                         choices=("none", "vlm"))
    facts_model: str = _f("Qwen/Qwen2.5-VL-7B-Instruct", "Vision model name sent to refine.llm's endpoint when "
                          "facts_from=vlm (the k8s/overlays/gpu-vlm server serves this one).")
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"help": "LLM refiner endpoint."})

    def __post_init__(self) -> None:
        if self.max_trace_chars < 1:
            raise ConfigError(f"refine.max_trace_chars must be >= 1, got {self.max_trace_chars}")


@dataclass
class TrainConfig:
    method: str = _f("dyme", "dyme | grpo | sft | two_stage.", choices=("dyme", "grpo", "sft", "two_stage"))
    output_dir: str = _f("runs/train", "Checkpoints, final model (model/), metrics.jsonl.")
    refined: str = _f("refined/targets.jsonl", "Refined targets from the refine step ('' = refine online).")
    template_pool: str = _f("refined/templates.json", "Template pool the refine step used (missing = default).")
    refine_cache_dir: str = _f(".cache/refine", "Cache for online refinement of MEMORIZE groups.")
    seed: int = _f(0, "Seed for data order, sampling and initialisation of LoRA.")
    max_steps: int = _f(12, "Train steps (one generation round of grad_accum_steps batches, then the updates).")
    batch_size: int = _f(4, "Prompts per process per generation batch.")
    num_generations: int = _f(4, "K: completions sampled per prompt.")
    grad_accum_steps: int = _f(1, "Generation batches accumulated per optimizer step.")
    micro_batch_size: int = _f(8, "Rows per forward/backward in the update.")
    learning_rate: float = _f(8e-5, "AdamW learning rate (paper: 8e-5 for DyME, 1e-5 baselines).")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    lr_scheduler: str = _f("constant", "constant | linear | cosine.", choices=("constant", "linear", "cosine"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    max_new_tokens: int = _f(128, "Longest completion (paper: 300); keep it above the p95 length of the refined "
                             "targets (refine_stats.json), or rollouts cannot reach the answer line.")
    max_target_tokens: int = _f(256, "Longest memorised reference (trace + answer line); a longer one loses the end "
                                "of its thinking, never its 'Answer:' line.")
    temperature: float = _f(1.0, "Sampling temperature for rollouts.")
    top_p: float = _f(1.0, "Nucleus sampling for rollouts.")
    top_k: int = _f(0, "Top-k sampling for rollouts (0 = off, as TRL and the official code sample; "
                    "transformers' own default would be 50).")
    beta: float = _f(0.0, "KL coefficient against the initial model (0 = no reference model); with beta > 0 "
                     "every rollout carries the KL gradient, so zero-advantage rows stay in the update.")
    clip_eps: float = _f(0.2, "PPO clip; only matters when num_iterations > 1.")
    num_iterations: int = _f(1, "Optimizer steps per generation (TRL's num_iterations): each train step "
                             "accumulates over all grad_accum_steps batches, steps, and repeats that "
                             "num_iterations times on the same rollouts (PPO ratio to the generating policy); "
                             "the LR schedule advances once per train step.")
    scale_rewards: bool = _f(True, "Divide group-centred rewards by (std + eps).")
    adv_eps: float = _f(1e-4, "eps in (r - mean) / (std + eps).")
    loss_type: str = _f("grpo", "Aggregation: grpo | bnpo | dr_grpo | weighted_mean.",
                        choices=("grpo", "bnpo", "dr_grpo", "weighted_mean"))
    reward_weights: dict = _f({"format": 1.0, "accuracy": 1.0, "thinking": 1.0},
                              "Reward name -> weight in the total (names: dyme_core.rewards.REWARDS); a mapping "
                              "given replaces this one whole. A listed reward is computed and logged even at "
                              "weight 0; accuracy always is (it picks the mode).")
    min_thinking_chars: int = _f(10, "Shortest thinking the format reward accepts.")
    checker: str = _f("rule", "Visual checker: rule | llm | none (none = thinking reward 0).",
                      choices=("rule", "llm", "none"))
    use_refiner: bool = _f(True, "Memorise refined traces (False: the raw hint, the no-refiner ablation).")
    sft_target: str = _f("hint", "Target for sft/two_stage: hint | refined.", choices=("hint", "refined"))
    sft_fraction: float = _f(0.5, "two_stage: fraction of max_steps spent on SFT before GRPO.")
    template_evolution: bool = _f(False, "Propose top-scoring correct traces as new templates.")
    prompt_style: str = _f("reason", "reason (think, then 'Answer:') | direct (answer only).",
                           choices=("reason", "direct"))
    save_steps: int = _f(0, "Checkpoint every N train steps (0 = none; the final model is always saved).")
    checkpoint_dir: str = _f("", "Where checkpoint-N/ go, e.g. a volume that outlives the pod ('' = the run's "
                             "staging folder beside output_dir, published with it).")
    resume_from: str = _f("", "'' | auto (newest intact checkpoint in checkpoint_dir, or the staging folder) | "
                          "a checkpoint path.")
    keep_checkpoints: int = _f(2, "Checkpoints kept (the newest N; 0 = all). resume_from=auto falls back to an "
                               "older intact one when the newest is broken, so keep at least 2.")
    logging_steps: int = _f(1, "Log every N steps.")
    report_to: list = _f(["jsonl"], "Metric sinks: jsonl | mlflow | none.")
    bf16: str = _f("auto", "auto (on GPU) | true | false.", choices=("auto", "true", "false"))
    generation_batch_size: int = _f(0, "Prompts per generate call (0 = all of the batch).")
    static_cache: bool = _f(False, "Use a static KV cache in generate (faster on GPU after compile).")
    cuda_graph_decode: bool = _f(True, "On a CUDA model, sample rollouts with the decode step captured in a CUDA "
                                 "graph (static KV cache, rows in buckets of 8, sampling on the device; "
                                 "generation.complete_static), captured once per batch shape; families that "
                                 "prefill once (Idefics3, LLaVA-OneVision). Ignored on the CPU and with "
                                 "static_cache (HF generate).")
    compile_decode: bool = _f(False, "With cuda_graph_decode: the captured decode step's forward goes through "
                              "torch.compile first (fused kernels, and attention that reads each KV head once: "
                              "generation.grouped_sdpa_attention); a one-time compile per batch shape, kept "
                              "in compile_cache_dir. A compile that fails falls back to the eager step, with "
                              "a warning.")
    compile_update: bool = _f(False, "Run the update's forward/backward through torch.compile, regionally: one "
                              "compiled decoder layer (dynamic rows and lengths) reused by every layer, so the "
                              "one-time compile is one layer's; generation unchanged. Fused kernels, less launch "
                              "overhead on GPU.")
    compile_cache_dir: str = _f("", "Directory of torch's compile artifacts (torch.compiler mega-cache, one file per "
                                "torch version and device): loaded at start, rewritten when a step compiled "
                                "something new, so a later run or a new pod with the same directory skips the "
                                "compile of the update and of the static-cache decode step ('' = torch's temp "
                                "cache only). Trusted like code: torch's cache loader unpickles what it reads, so "
                                "point it only at your own storage (a file anyone may write, or another user's, "
                                "is not loaded).")
    progress_bar: bool = _f(True, "Show a progress bar on the main process.")
    switch: str = _f("binary", "method dyme's switching strategy (the paper's Table 1): binary (DyME: memorise a "
                     "group iff no rollout is correct) | threshold (correct = mean of accuracy, format and thinking "
                     "> switch_threshold) | anneal (every group GRPO, plus its reference trace at advantage "
                     "0.5*(1+cos(pi*step/switch_anneal_steps))) | budget (failed groups' references are buffered; "
                     "one pure-SFT step on them once switch_budget train steps' prompts are buffered).",
                     choices=("binary", "threshold", "anneal", "budget"))
    switch_threshold: float = _f(0.9, "threshold switch: a rollout is correct when the mean of its accuracy, "
                                 "format and thinking rewards exceeds this (official: 0.9).")
    switch_anneal_steps: int = _f(0, "anneal switch: train steps over which the reference's advantage falls from "
                                  "1 to 0 on a cosine, then stays 0 (0 = max_steps).")
    switch_budget: int = _f(3, "budget switch: the SFT step comes when the buffer holds switch_budget x "
                            "batch_size x grad_accum_steps x processes failed prompts (official 3 x 8 x 8 = 192).")
    ignore_eos: bool = _f(False, "Sample every rollout to max_new_tokens (eos suppressed), as throughput "
                          "benchmarks of vLLM and TRL do; never for a real run.")
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"help": "LLM judge/refiner endpoint."})

    def __post_init__(self) -> None:
        if self.switch != "binary" and self.method != "dyme":
            raise ConfigError(f"train.switch={self.switch} applies to train.method=dyme only, got {self.method!r}")
        if not math.isfinite(self.switch_threshold):
            raise ConfigError(f"train.switch_threshold must be a finite number, got {self.switch_threshold}")
        if not 0 <= self.switch_threshold < 1:
            raise ConfigError(f"train.switch_threshold must be in [0, 1), got {self.switch_threshold}")
        if self.switch_anneal_steps < 0:
            raise ConfigError(f"train.switch_anneal_steps must be >= 0 (0 = max_steps), got {self.switch_anneal_steps}")
        if self.switch_budget < 1:
            raise ConfigError(f"train.switch_budget must be >= 1, got {self.switch_budget}")


@dataclass
class EvaluateConfig:
    model_path: str = _f("runs/train/model", "Model directory to evaluate.")
    split: str = _f("test", "Split to evaluate.", choices=("train", "val", "test"))
    out_dir: str = _f("reports/eval", "predictions.jsonl, metrics.json, plots.")
    batch_size: int = _f(16, "Prompts per greedy generate call.")
    max_new_tokens: int = _f(160, "Longest generated answer (reasoning included); above the refined targets' "
                             "longest, so that a trained model's answers are not clipped.")
    limit: int = _f(0, "Evaluate at most this many samples (0 = all).")
    prompt_style: str = _f("reason", "reason | direct.", choices=("reason", "direct"))


@dataclass
class RegisterConfig:
    model_name: str = _f("dyme-chart", "Registered model name in MLflow.")
    experiment: str = _f("dyme", "MLflow experiment.")
    tracking_uri: str = _f("sqlite:///mlruns.db", "Tracking URI; MLFLOW_TRACKING_URI wins. A relative local "
                           "store is made absolute against the repo root (DVC_ROOT under `dvc exp run`).")
    run_name: str = _f("", "MLflow run name; empty: DVC_EXP_NAME under `dvc exp run`, else <method>-<data>-<digest>.")
    tags: dict = _f({}, "Extra MLflow run tags (the KFP run id arrives here as kfp.run_id).")
    git_commit: str = _f("", "Logged as mlflow.source.git.commit; empty: the CLI fills in `git rev-parse HEAD`.")
    connect_timeout: float = _f(10.0, "Seconds to wait for the tracking server before training starts.")
    on_unreachable: str = _f("fail", "Tracking server unreachable at the start: fail (one-line error) or buffer "
                             "(metrics to <train.output_dir>/mlflow_buffer.jsonl, sent by `dyme sync`).",
                             choices=("fail", "buffer"))
    gate_metric: str = _f("relaxed_accuracy", "Evaluation metric compared against the champion.")
    gate_margin: float = _f(0.0, "Promote if challenger >= champion - margin.")
    out: str = _f("reports/register.json", "Where the registration result (version, promoted, metrics) is written.")


@dataclass
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig, metadata={"help": "Synthetic chart data."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Which dataset steps read."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model to train."})
    init_model: InitModelConfig = field(default_factory=InitModelConfig, metadata={"help": "Tiny model."})
    validate: ValidateConfig = field(default_factory=ValidateConfig, metadata={"help": "Data checks."})
    refine: RefineConfig = field(default_factory=RefineConfig, metadata={"help": "Visual refiner."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training."})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"help": "Evaluation."})
    register: RegisterConfig = field(default_factory=RegisterConfig, metadata={"help": "Registry."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        _check(self)


def _check(cfg: Config) -> None:
    _check_finite(cfg)
    _check_secrets(cfg)
    t = cfg.train
    if t.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints must be >= 0 (0 = keep all), got {t.keep_checkpoints}")
    positive = {
        "train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
        "train.num_generations": t.num_generations, "train.grad_accum_steps": t.grad_accum_steps,
        "train.micro_batch_size": t.micro_batch_size, "train.max_new_tokens": t.max_new_tokens,
        "train.num_iterations": t.num_iterations, "evaluate.batch_size": cfg.evaluate.batch_size,
        "init_model.vocab_size": cfg.init_model.vocab_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.method in ("dyme", "grpo", "two_stage") and t.num_generations < 2:
        raise ConfigError(f"train.num_generations must be >= 2 for method {t.method!r}")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, got {t.learning_rate}")
    unknown_rewards = sorted(set(t.reward_weights) - set(REWARDS))
    if unknown_rewards:
        raise ConfigError(f"train.reward_weights: unknown reward(s) {unknown_rewards} (known: {sorted(REWARDS)})")
    for name, weight in t.reward_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(f"train.reward_weights.{name} must be a finite number, got {weight!r}")
    if t.top_k < 0:
        raise ConfigError(f"train.top_k must be >= 0 (0 = off), got {t.top_k}")
    if t.beta < 0 or not math.isfinite(t.beta):
        raise ConfigError(f"train.beta must be a finite number >= 0, got {t.beta}")
    if not 0 <= t.sft_fraction <= 1:
        raise ConfigError(f"train.sft_fraction must be in [0, 1], got {t.sft_fraction}")
    if t.temperature <= 0:
        raise ConfigError(f"train.temperature must be > 0, got {t.temperature}")
    bad_sinks = set(t.report_to) - {"jsonl", "mlflow", "none"}
    if bad_sinks:
        raise ConfigError(f"train.report_to: unknown sink(s) {sorted(bad_sinks)}")
    d = cfg.data
    for key, frac in (("data.val_fraction", d.val_fraction), ("data.test_fraction", d.test_fraction)):
        if not 0 <= frac < 1:  # also rejects nan
            raise ConfigError(f"{key} must be in [0, 1), got {frac}")
    if d.val_fraction + d.test_fraction >= 1:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1 (train needs rows)")
    v = cfg.validate
    for name in ("max_pixels", "max_question_chars", "max_answer_chars", "max_hint_chars"):
        if getattr(v, name) < 1:
            raise ConfigError(f"validate.{name} must be >= 1, got {getattr(v, name)}")
    if cfg.synth.trace_quality not in ("high", "medium", "low"):
        raise ConfigError(f"synth.trace_quality must be high|medium|low, got {cfg.synth.trace_quality!r}")
    for section in dataclasses.fields(cfg):
        _check_choices(getattr(cfg, section.name), section.name)


def _leaves(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of the config: fields, list items (`key[i]`), mapping values."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{key}[{i}]")
    elif isinstance(obj, dict):
        for name, item in obj.items():
            yield from _leaves(item, f"{key}.{name}")
    else:
        yield key, obj


def _check_finite(cfg: Config) -> None:
    """Every float in the config must be finite: a nan compares False with every bound, so it would
    slip past the range checks below."""
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")


# Credentials a URL may carry, with or without a scheme: `user:password@` or `token@` after `//`, `user:password@`
# at the start of a value or of a path segment (`user:pw@host/v1`), and parameters of the query or fragment whose
# name looks secret (api_key=, access_token=, X-Amz-Signature=, sig=, password=...). An e-mail address
# (`alice@example.com`) is not one. One home for detecting and redacting them: `credential_spans`.
_USERINFO = re.compile(r"(?<=//)[^/?#@\s]+@|(?:^|(?<=/))[^/?#@\s:]+:[^/?#@\s]*@")
_PARAM = re.compile(r"(?<=[?#&;])([^=&;#?\s]+)=([^&;#\s]+)")
_SECRET_NAME = re.compile(r"key|token|secret|passw|pwd|signature|credential|auth|^sig$", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def credential_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, what) of every credential in `text` (see above); `what` names the form, never the value."""
    spans = [(m.start(), m.end(), "user:password@ before the host") for m in _USERINFO.finditer(text)]
    for m in _PARAM.finditer(text):
        name = unquote(m.group(1))
        if _SECRET_NAME.search(name):
            part = "fragment" if "#" in text[:m.start()] else "query"
            spans.append((m.start(2), m.end(2), f"{name}= in the {part}"))
    return sorted(spans)


def redact_credentials(text: str) -> str:
    """`text` with every user:password@ removed and every secret parameter's value replaced by ***."""
    for start, end, what in reversed(credential_spans(text)):
        text = text[:start] + ("" if what.startswith("user:") else "***") + text[end:]
    return text


def _check_secrets(cfg: Config) -> None:
    """No credentials in any config value: the config is written to config.yaml, MLflow params and
    dvc.lock. A value carrying one (`credential_spans`) is refused (the message names the key and the form,
    never the value); `*.api_key_env` must name an environment variable, not hold the key."""
    for key, value in _leaves(cfg):
        if isinstance(value, str):
            _check_secret(key, value)


def _check_secret(key: str, obj: str) -> None:
    """One string value: `*.api_key_env` names a variable; no value carries a credential."""
    if key.endswith(".api_key_env") and obj and not _ENV_NAME.fullmatch(obj):
        raise ConfigError(f"{key} must be the NAME of an environment variable holding the API key "
                          "(letters, digits, _), not the key itself")
    found = credential_spans(obj)
    if not found:
        return
    if key.endswith("llm.base_url"):
        where = f"put the API key in the environment variable named by {key[:-len('base_url')]}api_key_env"
    elif key.endswith("tracking_uri"):  # also filled from MLFLOW_TRACKING_URI by the CLI
        where = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
    else:
        where = "pass credentials through the environment"
    forms = "; ".join(dict.fromkeys(what for _, _, what in found))
    raise ConfigError(f"{key} must not carry credentials (found {forms}): {where}")


def _check_choices(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}.{f.name}")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}.{f.name} must be one of {list(f.metadata['choices'])}, got {value!r}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if typ is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if isinstance(typ, types.UnionType):
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(typ, value, key)
        else:
            kwargs[name] = _coerce(key, value, typ)
    if cls is Config:
        return cls(**kwargs)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=3", ...]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults -> YAML file (one section per step) -> ``key=value`` overrides, validated once."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    return _build(Config, tree, "")


def dump_config(cfg: Config, path: str | Path, omit: tuple[str, ...] = ()) -> None:
    """Write `cfg` as YAML, without the sections named in `omit`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in cfg.to_dict().items() if k not in omit}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every leaf field: what `dyme <step> --help` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            rows.extend(describe(typ, key + "."))
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((key, f.metadata.get("help", ""), default))
    return rows
