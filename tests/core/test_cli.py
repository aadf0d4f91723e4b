"""The real `dyme` CLI in subprocesses with tiny settings: each step, --help (with the values a config runs),
one-line errors (a dataset id the hub cannot give among them), and the CPU threads it picks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dyme_core.cli import cpu_threads
from dyme_core.config import ConfigError, load_config

DYME = [sys.executable, "-m", "dyme_core.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*DYME, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_keys(tmp_path: Path) -> None:
    proc = run("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "train.num_generations" in proc.stdout and "K: completions sampled per prompt" in proc.stdout


@pytest.mark.slow
def test_default_chain_ingest_to_evaluate(tmp_path: Path) -> None:
    # 112 px: the smallest readable chart; the chain trains the tiny model its init-model step builds
    tiny = ["synth.n_train=6", "synth.n_val=2", "synth.n_test=3", "synth.image_size=112",
            "model.name_or_path=models/tiny-smolvlm", "init_model.out_dir=models/tiny-smolvlm",
            "init_model.vocab_size=300", "init_model.hidden_size=32", "init_model.num_layers=1",
            "init_model.vision_hidden_size=32", "init_model.vision_layers=1", "init_model.image_size=32",
            "train.max_steps=2", "train.batch_size=2", "train.num_generations=2", "train.max_new_tokens=8",
            "train.report_to=[jsonl]", "evaluate.max_new_tokens=8"]
    params = Path(__file__).parents[2] / "params.yaml"
    for step in ("ingest", "validate", "init-model", "refine", "train", "evaluate"):
        proc = run(step, "--config", str(params), *tiny, cwd=tmp_path)
        assert proc.returncode == 0, f"{step}: {proc.stderr[-1500:]}"
    metrics = json.loads((tmp_path / "reports/eval/metrics.json").read_text())
    assert {"relaxed_accuracy", "format_rate", "grounding_score", "mean_thinking_length"} <= set(metrics)
    assert any(k.startswith("accuracy/") for k in metrics)
    assert len((tmp_path / "reports/eval/predictions.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "reports/eval/accuracy_by_type.png").stat().st_size > 0
    assert (tmp_path / "reports/eval/rewards.png").is_file() and (tmp_path / "reports/eval/modes.png").is_file()
    refined = (tmp_path / "refined/targets.jsonl").read_text().splitlines()
    assert len(refined) == 6 and "Observation:" in json.loads(refined[0])["trace"]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "train.nope=1"], "unknown config key train.nope"),
    (["train", "train.max_steps=abc"], "train.max_steps: expected an integer"),
    (["train", "train.method=ppo"], "train.method must be one of"),
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["ingest", "data.path=./nowhere/data"], "dataset not found"),  # a path, not a hub id: no network
    (["validate", "data.out_dir=nowhere/data"], "dataset not found"),
    (["evaluate", "data.out_dir=./nowhere/data"], "dataset not found"),
    (["init-model", "init_model.num_kv_heads=3"], "init_model.num_kv_heads=3 must divide init_model.num_heads=4"),
])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _ingested(tmp_path: Path, tiny_setup: dict) -> Path:
    """The tiny synthetic set materialised by `dyme ingest` into tmp_path/ds."""
    proc = run("ingest", f"data.path={tiny_setup['data']}", "data.out_dir=ds", "data.report=ingest.json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "ds"


def test_corrupt_image_fails_validation_then_training_refuses(tmp_path: Path, tiny_setup: dict) -> None:
    ds = _ingested(tmp_path, tiny_setup)
    victim = sorted((ds / "images").glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    proc = run("validate", "data.out_dir=ds", "validate.report=report.json", cwd=tmp_path)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(f["check"] == "image_decodable" for f in report["failures"]), report["failures"]
    proc = run("train", "data.out_dir=ds", "validate.report=report.json", cwd=tmp_path)
    assert proc.returncode == 2 and "failed validation" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_data_changed_after_validation_is_refused_in_one_line(tmp_path: Path, tiny_setup: dict) -> None:
    ds = _ingested(tmp_path, tiny_setup)
    proc = run("validate", "data.out_dir=ds", "validate.report=report.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for png in (ds / "images").glob("*.png"):
        png.write_bytes(b"garbage")
    proc = run("train", "data.out_dir=ds", f"model.name_or_path={tiny_setup['model']}", "train.max_steps=1",
               "train.refined=", "validate.report=report.json", "train.report_to=[jsonl]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "made for other data" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "train").exists()  # nothing was started (the run lock's dot-file aside)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("train:\n  max_steps: 7\n  method: grpo\n")
    cfg = load_config(cfg_file, ["train.max_steps=3", "train.reward_weights={format: 1, accuracy: 2, thinking: 0}"])
    assert cfg.train.max_steps == 3 and cfg.train.method == "grpo"
    assert cfg.train.reward_weights == {"format": 1, "accuracy": 2, "thinking": 0}
    with pytest.raises(ConfigError, match="unknown config key nosection"):
        load_config(None, ["nosection.x=1"])
    with pytest.raises(ConfigError, match="train.num_generations must be >= 2"):
        load_config(None, ["train.num_generations=1"])


def _key_line(help_text: str, key: str) -> str:
    [line] = [line for line in help_text.splitlines() if line.split()[:1] == [key]]
    return line


def test_help_shows_the_values_the_config_runs(tmp_path: Path) -> None:
    # no --config and no ./params.yaml: the dataclass defaults, as `dyme train` alone runs them
    proc = run("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _key_line(proc.stdout, "train.max_steps").endswith("[default: 12]")
    # --config and overrides: the values that command line runs, each with the default it replaces
    (tmp_path / "p.yaml").write_text("train:\n  max_steps: 7\n")
    proc = run("train", "--config", "p.yaml", "train.learning_rate=0.001", "--help", cwd=tmp_path)
    assert "values from p.yaml and the overrides" in proc.stdout
    assert _key_line(proc.stdout, "train.max_steps").endswith("[value: 7; default: 12]")
    assert _key_line(proc.stdout, "train.learning_rate").endswith("[value: 0.001; default: 8e-05]")
    assert _key_line(proc.stdout, "train.num_generations").endswith("[default: 4]")  # not in p.yaml
    # ./params.yaml (the repository's): what `dvc repro` runs
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = run("train", "--help", cwd=tmp_path)
    runs = load_config(ROOT / "params.yaml")
    assert "values from params.yaml (what `--config params.yaml` and `dvc repro` run)" in proc.stdout
    assert _key_line(proc.stdout, "train.max_steps").endswith(f"[value: {runs.train.max_steps}; default: 12]")
    assert f"[value: {runs.model.name_or_path!r}; default: 'models/tiny-smolvlm']" in proc.stdout


def test_a_bad_dataset_id_offline_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on: refused at once, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([*DYME, "ingest", "data.path=dyme-test/no-such-dataset"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.startswith("dyme ingest: error: data.path 'dyme-test/no-such-dataset': not a local folder "
                                  "and the Hugging Face hub is unreachable (offline?")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(("environ", "cores", "threads"), [
    ({}, 2, 1),  # a shared 2-core machine: one thread, the other core for whatever else runs
    ({}, 16, 8),
    ({}, 1, 1),
    ({"OMP_NUM_THREADS": "2"}, 2, None),  # set by the user (or torchrun): torch reads it as it is
])
def test_cpu_threads_leave_half_the_cores_unless_omp_num_threads_says(environ: dict, cores: int,
                                                                      threads: int | None) -> None:
    assert cpu_threads(environ, cores) == threads


def test_train_and_evaluate_set_torchs_threads_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dyme_core import cli

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(6)))
    try:
        cli._use_cpu_threads()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
