"""The whole pipeline under kfp.local (SubprocessRunner in this environment) on a tiny config: every
step leaves the artifact the next one needs, and bad data stops the run at validate."""

import json
from pathlib import Path

import pytest

from pipelines.dyme_pipeline import dyme_pipeline

pytestmark = [
    pytest.mark.slow,
    # expected here: the project image is not used locally, and the cluster settings are ignored
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]

# The tiny configuration of the local runs (a few seconds a step on 2 CPU cores).
TINY = [
    "synth.n_train=8", "synth.n_val=2", "synth.n_test=4", "synth.image_size=64",
    "init_model.vocab_size=300", "init_model.hidden_size=32", "init_model.num_layers=1",
    "init_model.vision_hidden_size=32", "init_model.vision_layers=1", "init_model.image_size=32",
    "train.max_steps=2", "train.batch_size=2", "train.num_generations=2", "train.max_new_tokens=8",
    "train.report_to=[jsonl]", "train.progress_bar=false", "evaluate.max_new_tokens=8",
]


def _artifact(root: Path, task: str, output: str) -> Path:
    [path] = root.glob(f"dyme-*/{task}/{output}")
    return path


def test_pipeline_trains_evaluates_and_registers_the_tiny_model(local_kfp: Path, params: str,
                                                                tmp_path: Path) -> None:
    dyme_pipeline(params=params, overrides=TINY)

    report = json.loads(_artifact(local_kfp, "validate-op", "report").read_text())
    assert report["success"] is True
    samples = [json.loads(line) for line in (_artifact(local_kfp, "data-op", "dataset") / "samples.jsonl").open()]
    targets = (_artifact(local_kfp, "refine-op", "refined") / "targets.jsonl").read_text().splitlines()
    assert len(targets) == sum(s["split"] == "train" for s in samples) == 8
    model_dir = _artifact(local_kfp, "train-op", "model") / "model"
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()}
    metrics = json.loads((_artifact(local_kfp, "evaluate-op", "results") / "metrics.json").read_text())
    assert 0.0 <= metrics["relaxed_accuracy"] <= 1.0
    registered = json.loads(_artifact(local_kfp, "register-op", "registration").read_text())
    assert (registered["model_name"], registered["version"], registered["promoted"]) == ("dyme-chart", 1, True)
    assert (tmp_path / "mlruns.db").is_file()  # MLFLOW_TRACKING_URI reached the register subprocess


def test_pipeline_stops_at_validate_on_bad_data(local_kfp: Path, params: str) -> None:
    # every 64 px chart is below the smallest accepted image side: all rows fail validation
    with pytest.raises(RuntimeError, match="validate-op"):
        dyme_pipeline(params=params, overrides=[*TINY, "validate.min_image_px=65"])
    [run] = local_kfp.glob("dyme-*")
    assert sorted(p.name for p in run.iterdir()) == ["data-op", "validate-op"]  # nothing after validate ran
