"""The whole pipeline under kfp.local (SubprocessRunner in this environment) on a tiny config: the data
step ingests a non-synthetic local dataset given as `data_path` (a DyME JSON file), every step leaves
the artifact the next one needs, training checkpoints land under the run id in `checkpoint_root`, the
model is registered with the run's lineage, and bad data stops the run before training."""

import json
from pathlib import Path

import pytest

from dyme_core.config import SynthConfig, load_config
from dyme_core.data.schema import read_jsonl
from dyme_core.data.synth import synthesize
from pipelines.dyme_pipeline import dyme_pipeline, sections

pytestmark = [
    pytest.mark.slow,
    # expected here: the project image is not used locally, and the cluster settings are ignored
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
# The tiny configuration of the local runs (a few seconds a step on 2 CPU cores).
TINY = [
    "synth.n_train=8", "synth.n_val=2", "synth.n_test=4", "synth.image_size=112",  # readable style's minimum
    "init_model.vocab_size=300", "init_model.hidden_size=32", "init_model.num_layers=1",
    "init_model.vision_hidden_size=32", "init_model.vision_layers=1", "init_model.image_size=32",
    "train.max_steps=2", "train.batch_size=2", "train.num_generations=2", "train.max_new_tokens=8",
    "train.save_steps=1", "train.report_to=[jsonl]", "train.progress_bar=false", "evaluate.max_new_tokens=8",
]


def _dyme_json(root: Path) -> Path:
    """A DyME JSON file (the official layout: question, answer, hint, image, plus its extra fields) over
    charts on disk; `split` keeps a train/val/test split so the run has something to evaluate."""
    charts = synthesize(SynthConfig(out_dir=str(root / "charts"), n_train=8, n_val=2, n_test=4, image_size=64))
    rows = [{"id": f"q{i}", "question": s["question"], "answer": s["answer"], "hint": s["hint"],
             "image": f"charts/{s['image']}", "split": s["split"], "question_wo_prompt": s["question"],
             "human_or_machine": 0} for i, s in enumerate(read_jsonl(Path(charts) / "samples.jsonl"))]
    path = root / "chartqa_dyme.json"
    path.write_text(json.dumps(rows))
    return path


def _artifact(root: Path, task: str, output: str) -> Path:
    [path] = root.glob(f"dyme-*/{task}/{output}")
    return path


@pytest.fixture
def chart_base(local_kfp: Path, tmp_path: Path) -> str:
    """The default base (params.yaml's model.name_or_path, tracked by models/chart-base.dvc) fetched from
    the example remote into the working directory, where the image carries it: the steps load it by the
    same relative path. DVC's file system reads it without touching the repository's workspace."""
    from dvc.fs import DVCFileSystem

    name = load_config(ROOT / "params.yaml").model.name_or_path
    DVCFileSystem(repo=str(ROOT)).get(name, str(tmp_path / name), recursive=True)
    return name


@pytest.mark.parametrize("use_tiny_model", [False, True], ids=["default-base", "tiny-random"])
def test_pipeline_ingests_a_local_dataset_then_trains_evaluates_and_registers(local_kfp: Path, chart_base: str,
                                                                              tmp_path: Path,
                                                                              use_tiny_model: bool) -> None:
    dataset_file = _dyme_json(tmp_path / "mydata")
    cfg = load_config(ROOT / "params.yaml", TINY)
    dyme_pipeline(**sections(cfg), data_path=str(dataset_file), use_tiny_model=use_tiny_model,
                  checkpoint_root=str(tmp_path / "checkpoints"))

    manifest = json.loads((_artifact(local_kfp, "data-op", "dataset") / "manifest.json").read_text())
    assert (manifest["source"], manifest["format"]) == (str(dataset_file), "dyme_json")
    assert manifest["rows_per_split"] == {"train": 8, "val": 2, "test": 4}
    report = json.loads(_artifact(local_kfp, "validate-op", "report").read_text())
    assert report["success"] is True and report["data_digest"] == manifest["digest"]
    targets = (_artifact(local_kfp, "refine-op", "refined") / "targets.jsonl").read_text().splitlines()
    assert len(targets) == 8
    model_dir = _artifact(local_kfp, "train-op*", "model") / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    trained = json.loads((model_dir / "config.json").read_text())  # which base the train task started from
    base = json.loads((tmp_path / chart_base / "config.json").read_text())
    assert (trained["text_config"]["hidden_size"] == base["text_config"]["hidden_size"]) is not use_tiny_model
    # one folder, named by the pipeline run id (beside it, the run lock's dot-file)
    [run_folder] = [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    assert list(run_folder.glob("checkpoint-*")), "no checkpoint under <checkpoint_root>/<run id>"
    metrics = json.loads((_artifact(local_kfp, "evaluate-op*", "results") / "metrics.json").read_text())
    assert 0.0 <= metrics["relaxed_accuracy"] <= 1.0
    registered = json.loads(_artifact(local_kfp, "register-op*", "registration").read_text())
    assert (registered["model_name"], registered["version"], registered["promoted"]) == ("dyme-chart", 1, True)

    from dyme_core.tracking import MlflowClient  # MLFLOW_TRACKING_URI reached the register subprocess

    run = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(registered["run_id"])
    assert run.data.tags["kfp.run_id"] == run_folder.name
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest["digest"][:36]


def test_pipeline_stops_before_training_on_bad_data(local_kfp: Path) -> None:
    # every 112 px chart is below the smallest accepted image side: all rows fail validation
    cfg = load_config(ROOT / "params.yaml", [*TINY, "validate.min_image_px=113"])
    with pytest.raises(RuntimeError, match="validate-op"):
        dyme_pipeline(**sections(cfg), checkpoint_root=str(local_kfp / "checkpoints"))
    [run] = local_kfp.glob("dyme-*")
    # no step after validate ran (picking refine's model key is no step: it needs no data)
    assert {p.name for p in run.iterdir()} <= {"data-op", "validate-op", "select-params-op"}
