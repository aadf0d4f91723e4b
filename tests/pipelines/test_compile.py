"""The committed pipeline YAML is what the code compiles to, and it carries the cluster settings:
a GPU, the volumes of k8s/base/storage.yaml and the Secret/ConfigMap for the LLM key and MLflow."""

from pathlib import Path

import yaml

from components.image import PROJECT_IMAGE
from pipelines.dyme_pipeline import COMPILED, compile_pipeline

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path) -> tuple[dict, dict]:
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return pipeline_spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _train_executors(pipeline_spec: dict) -> list[str]:
    names = [n for n in pipeline_spec["deploymentSpec"]["executors"] if n.startswith("exec-train-op")]
    assert len(names) == 2  # one per branch: tiny model / model.name_or_path
    return names


def test_committed_yaml_is_up_to_date(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "dyme_pipeline.yaml")
    assert fresh.read_bytes() == COMPILED.read_bytes(), (
        f"{COMPILED.relative_to(ROOT)} is stale: run `python -m pipelines.dyme_pipeline` and commit it")


def test_every_component_runs_the_project_image() -> None:
    pipeline_spec, _ = _load(COMPILED)
    images = {e["container"]["image"] for e in pipeline_spec["deploymentSpec"]["executors"].values()}
    assert images == {PROJECT_IMAGE}


def test_train_gets_a_gpu_the_volumes_and_the_secrets() -> None:
    pipeline_spec, platform = _load(COMPILED)
    pvcs = {d["metadata"]["name"] for d in yaml.safe_load_all((ROOT / "k8s/base/storage.yaml").read_text())}
    for name in _train_executors(pipeline_spec):
        resources = pipeline_spec["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        requests_and_limits = {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"}
        assert requests_and_limits <= set(resources)
        k8s = platform[name]
        mounts = {m["constant"]: m["mountPath"] for m in k8s["pvcMount"]}
        assert mounts == {"dyme-data": "/data", "dyme-checkpoints": "/checkpoints"}
        assert set(mounts) <= pvcs  # the claims the manifests create
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        [llm_key] = k8s["secretAsEnv"]
        assert (llm_key["secretName"], llm_key["optional"]) == ("dyme-llm", True)
        assert llm_key["keyToEnv"] == [{"secretKey": "api-key", "envVar": "DYME_LLM_API_KEY"}]
    for name in [*_train_executors(pipeline_spec), "exec-register-op", "exec-register-op-2"]:
        [mlflow] = platform[name]["configMapAsEnv"]
        assert mlflow["configMapName"] == "dyme-mlflow"
        assert mlflow["keyToEnv"] == [{"configMapKey": "tracking-uri", "envVar": "MLFLOW_TRACKING_URI"}]


def test_training_waits_for_validation_and_registering_is_never_cached() -> None:
    pipeline_spec, _ = _load(COMPILED)
    tasks = {}
    for component in pipeline_spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    tasks.update(pipeline_spec["root"]["dag"]["tasks"])
    assert "validate-op" in tasks["refine-op"]["dependentTasks"]
    for name in ("train-op", "train-op-2"):
        validation = tasks[name]["inputs"]["artifacts"]["validation"]
        assert validation["componentInputArtifact"] == "pipelinechannel--validate-op-report"
    assert "base_model" in tasks["train-op"]["inputs"]["artifacts"]  # the tiny branch trains init_model's output
    assert "base_model" not in tasks["train-op-2"]["inputs"]["artifacts"]  # the other, model.name_or_path
    for name in ("register-op", "register-op-2"):
        assert tasks[name]["cachingOptions"] == {}  # enableCache false is omitted
