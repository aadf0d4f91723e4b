"""The `dyme` command line: one thin command per pipeline step, each over one library function.

    dyme <command> [--config params.yaml] [section.key=value ...]

Commands: ingest, synth, init-model, validate, refine, train, evaluate, register, sync, promote, compare.
(Kubeflow submission lives on the pipelines side: `dyme-submit`, pipelines/submit.py.)
`dyme <command> --help` lists the keys the command reads, with their help and defaults, and the values
`--config FILE` (else ./params.yaml) and the overrides on the line give them. Bad input
(missing file, bad config key, corrupt image, failed validation) ends with one line on stderr and a
non-zero exit status, never a traceback. This module is the only place that reads argv and the
environment (the LLM API key, torchrun's rank variables, MLflow's tracking URI, DVC's experiment name):
`resolve_tracking` turns them into `register.*` values that the library receives; `cpu_threads` picks
torch's CPU threads from the cores and OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from dyme_core import steps
from dyme_core.config import Config, ConfigError, describe, load_config

log = logging.getLogger("dyme")

# command -> (config sections it reads, one-line description)
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "ingest": (("data", "synth", "validate"), "Materialise data.path (synthetic, project folder, DyME JSON, HF "
               "dataset) into data.out_dir, the dataset every later step reads."),
    "synth": (("synth",), "Render the synthetic chart-QA dataset alone into synth.out_dir (no ingest)."),
    "init-model": (("data", "init_model"), "Build a tiny random model of init_model.family (idefics3, qwen2_vl, ...)."),
    "validate": (("data", "validate"), "Validate the dataset; non-zero exit if any check fails."),
    "refine": (("data", "model", "refine", "train"), "Write grounded reference traces for the training split."),
    "train": (("data", "model", "train", "register"), "Train with dyme | grpo | sft | two_stage."),
    "evaluate": (("data", "model", "evaluate"), "Greedy evaluation: predictions, metrics, plots."),
    "register": (("data", "train", "evaluate", "register"), "Log the run and model to MLflow; gate champion."),
    "promote": (("register",), "Set an alias (default champion) on a registered version."),
    "compare": (("register",), "Print a side-by-side table of runs."),
    "sync": (("data", "train", "register"), "Send metrics buffered while MLflow was unreachable."),
}


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _llm_client(llm_cfg, needed: bool):
    if not needed:
        return None
    if not llm_cfg.base_url:
        raise UserError("an LLM backend is configured but llm.base_url is empty")
    from dyme_core.llm import ChatClient

    return ChatClient(llm_cfg, api_key=os.environ.get(llm_cfg.api_key_env))


def cmd_ingest(cfg: Config, args: argparse.Namespace) -> int:
    report = steps.ingest(cfg)
    splits = ", ".join(f"{k}={v}" for k, v in report["rows_per_split"].items())
    carve = report["carve"]
    carved = f"; carved {carve['rows']} from train (seed {carve['seed']})" if carve else ""
    print(f"ingested {report['source']} ({report['format']}) -> {cfg.data.out_dir}: {report['n_rows']} rows "
          f"({splits}), {report['n_images']} images, {report['n_dropped']} dropped"
          f"{' ' + json.dumps(report['dropped']) if report['dropped'] else ''}{carved}; digest {report['digest'][:12]}")
    return 0


def cmd_synth(cfg: Config, args: argparse.Namespace) -> int:
    print(f"wrote synthetic dataset to {steps.synth(cfg)}")
    return 0


def cmd_init_model(cfg: Config, args: argparse.Namespace) -> int:
    print(f"saved tiny model to {steps.init_model(cfg)}")
    return 0


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    from dyme_core.validation import summarize

    report = steps.validate(cfg)
    print(summarize(report))
    return 0 if report["success"] else 1


def cmd_refine(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.refine.facts_from == "vlm" and not cfg.refine.llm.base_url:
        raise UserError("refine.facts_from=vlm needs a vision endpoint: set refine.llm.base_url")
    needed = cfg.refine.backend == "llm" or cfg.refine.facts_from == "vlm"
    stats = steps.refine(cfg, _llm_client(cfg.refine.llm, needed))
    print(f"refined {stats['n']} samples -> {cfg.refine.out} ({json.dumps(stats)})")
    return 0


def _init_distributed() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # NCCL for the gradients on GPU; gloo for the small CPU tensors of metric reduction
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def cpu_threads(environ: Mapping[str, str], cores: int) -> int | None:
    """Intra-op threads for torch on the CPU: None when OMP_NUM_THREADS is set (torch reads it itself),
    else half the cores this process may use, at least one.

    torch's default, one thread per core, waits at every parallel operation for the thread that another
    process has pushed off its core: on 2 cores shared with other work (load average 7-13), a training
    step of the default took 35 s on average with 2 threads and 7.4 s with 1. Half the cores leaves the
    other half to whatever else runs. (The thread count changes float rounding, so the trained weights'
    bytes depend on it: dvc.lock is reproduced with the same count.)
    """
    return None if environ.get("OMP_NUM_THREADS") else max(1, cores // 2)


def _use_cpu_threads() -> None:
    import torch

    threads = cpu_threads(os.environ, len(os.sched_getaffinity(0)))
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
        # said where work starts (the trainer's first line), not here: a bad input stays a one-line error
        log.debug("torch on the CPU: %d intra-op thread(s), half the cores", threads)


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    # Kubernetes stops a pod with SIGTERM: finish the current step, then end the MLflow run as KILLED (the
    # staged run and its checkpoints wait for resume_from=auto). Raising from the handler instead would
    # interrupt whatever runs at that moment, a metrics write to the tracking store included.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    client = _llm_client(cfg.train.llm, cfg.train.checker == "llm")
    _use_cpu_threads()
    _init_distributed()
    metrics = steps.train(cfg, client, stop=stop)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    _use_cpu_threads()
    metrics = steps.evaluate(cfg)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


def cmd_register(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(steps.register(cfg)))
    return 0


def cmd_sync(cfg: Config, args: argparse.Namespace) -> int:
    from dyme_core.tracking import sync

    result = sync(cfg, cfg.train.output_dir)
    print(json.dumps(result) if result else f"nothing buffered in {cfg.train.output_dir}")
    return 0


def cmd_promote(cfg: Config, args: argparse.Namespace) -> int:
    from dyme_core.tracking import promote

    if not args.version:
        raise UserError("promote needs --version N")
    promote(cfg.register, args.version, alias=args.alias)
    print(f"{cfg.register.model_name} version {args.version} is now @{args.alias}")
    return 0


def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    from dyme_core.tracking import compare, compare_paired

    if args.paired and args.runs:
        raise UserError("give either --paired RUN_A RUN_B or --runs, not both")
    if args.paired:
        print(compare_paired(cfg.register, *args.paired)["text"])
    else:
        print(compare(cfg.register, run_ids=args.runs or None))
    return 0


HANDLERS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "ingest": cmd_ingest, "synth": cmd_synth, "init-model": cmd_init_model, "validate": cmd_validate,
    "refine": cmd_refine,
    "train": cmd_train, "evaluate": cmd_evaluate, "register": cmd_register, "sync": cmd_sync,
    "promote": cmd_promote, "compare": cmd_compare,
}


# MLflow's HTTP client retries for minutes by default; a step must not stall that long on a dead server.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_DISABLE_TELEMETRY": "true"}


def absolute_tracking_uri(uri: str, base_dir: str | Path) -> str:
    """`uri` with a relative local store made absolute against `base_dir` (the user's repo root).

    `sqlite:///mlruns.db` -> `sqlite:////abs/mlruns.db`; a bare or `file:` path likewise; server and
    other URIs unchanged. The CLI passes the DVC repo root, so `dvc exp run --temp` and queued
    experiments register into the same store as `dvc repro`, not one inside a throw-away workspace.
    """
    base = Path(base_dir).resolve()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{base / path}"
    if uri.startswith("file:"):
        path = uri[len("file:"):].removeprefix("//")
        return uri if path.startswith("/") else (base / path).as_uri()
    if "://" in uri or not uri or uri.startswith("databricks"):
        return uri
    return str(base / uri) if not Path(uri).is_absolute() else uri


def git_commit(cwd: str) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def resolve_tracking(cfg: Config, environ: dict[str, str] | None = None, cwd: str | None = None) -> Config:
    """Fill `register.*` from the outside world, once, for the library to receive.

    MLFLOW_TRACKING_URI wins over `register.tracking_uri`; a relative local store is made absolute
    against DVC_ROOT (the user's repo, also under `dvc exp run --temp`/`--queue`) or `cwd`; an empty
    `register.run_name` takes DVC_EXP_NAME; an empty `register.git_commit` takes `git rev-parse HEAD`.
    Also bounds MLflow's HTTP retries (unless set) and turns its telemetry off, before mlflow is imported.
    """
    env = os.environ if environ is None else environ
    cwd = cwd or os.getcwd()
    reg = cfg.register
    uri = env.get("MLFLOW_TRACKING_URI") or reg.tracking_uri
    if urlsplit(uri).password or urlsplit(uri).username:
        # the URI lands in config.yaml and the MLflow params: MLflow reads credentials from its own variables
        raise ConfigError("MLFLOW_TRACKING_URI carries credentials; set MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    reg.tracking_uri = absolute_tracking_uri(uri, env.get("DVC_ROOT") or cwd)
    reg.run_name = reg.run_name or env.get("DVC_EXP_NAME", "")
    reg.git_commit = reg.git_commit or git_commit(cwd)
    if environ is None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    return cfg


# Third-party loggers held above INFO in every entry point (the CLI, the KFP components), set before the
# libraries are imported: their INFO lines would drown the step's own (great_expectations logs about 200
# at import; httpx one per LLM request; alembic the SQLite store's schema steps).
QUIET_LOGGERS = {"great_expectations": logging.WARNING, "huggingface_hub": logging.ERROR,  # retries: one error
                 "httpx": logging.WARNING, "httpx2": logging.WARNING, "alembic": logging.WARNING}


def quiet_libraries() -> None:
    """Hold the QUIET_LOGGERS at their levels and turn transformers' progress bars and notices off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def help_values(argv: list[str]) -> tuple[Config | None, str]:
    """The config `dyme <step> ... --help` shows, and where its values come from.

    `--config FILE` (else ./params.yaml when it exists) merged with the `key=value` overrides on the line,
    so --help shows what that command line (or `dvc repro`) runs; (None, why) for the defaults alone.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    path = known.config or ("params.yaml" if Path("params.yaml").is_file() else None)
    if path is None:
        return None, "defaults (no --config and no ./params.yaml)"
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        return None, f"defaults ({e})"
    given = f"{path} and the overrides" if overrides else path
    return cfg, given if known.config else f"{given} (what `--config params.yaml` and `dvc repro` run)"


def _keys_help(sections: tuple[str, ...], values: Config | None = None, source: str = "") -> str:
    """Each key the step reads with its help, its value in `values` and the default where that differs."""
    rows = [r for r in describe() if r[0].split(".")[0] in sections]
    lines = []
    for key, help_, default in rows:
        value = default if values is None else functools.reduce(getattr, key.split("."), values)
        shown = f"default: {default!r}" if value == default else f"value: {value!r}; default: {default!r}"
        lines.append(f"  {key:<34} {help_} [{shown}]")
    return f"config keys (section.key=value), values from {source or 'defaults'}:\n" + "\n".join(lines)


def build_parser(values: Config | None = None, source: str = "") -> argparse.ArgumentParser:
    """The `dyme` parser; each step's --help lists its keys with the values of `values` (else defaults)."""
    parser = argparse.ArgumentParser(prog="dyme", description="DyME training pipeline for small VLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (sections, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, epilog=_keys_help(sections, values, source),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=None, help="YAML file laid out one section per step (params.yaml).")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. train.max_steps=4.")
        if name == "promote":
            p.add_argument("--version", default="", help="Registered model version.")
            p.add_argument("--alias", default="champion", help="Alias to set.")
        if name == "compare":
            p.add_argument("--runs", nargs="*", default=[], help="Run ids (default: latest runs).")
            p.add_argument("--paired", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                           help="B - A in accuracy on the test rows both runs were evaluated on, with paired-"
                                "bootstrap 95%% intervals overall and per question type (run ids or names); "
                                "logged as a comparison run.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_help = "-h" in argv or "--help" in argv
    args = build_parser(*help_values(argv) if wants_help else ()).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    try:
        cfg = resolve_tracking(load_config(args.config, args.overrides))
        return HANDLERS[args.command](cfg, args)
    except (ConfigError, UserError, steps.ValidationFailed) as e:
        print(f"dyme {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        # DataError, LLMError and friends: a one-line message names what is wrong
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dyme {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dyme {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
