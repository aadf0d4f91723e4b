"""The committed pipeline YAML is what the code compiles to, and it carries the cluster settings:
a GPU, the volumes and the Secret/ConfigMap of k8s/kfp, checkpoints under the run id with retries, the
image (overridable), and for each task only the params its DVC stage reads (KFP's cache key: a train change
leaves refine cached)."""

from pathlib import Path

import yaml

from components.image import PROJECT_IMAGE
from components.steps import select_params_op
from dyme_core.config import load_config
from pipelines.dyme_pipeline import COMPILED, TRAIN_RETRIES, compile_pipeline, main, sections

ROOT = Path(__file__).resolve().parents[2]
# task -> the `dyme` command whose step it runs
STEP_COMMAND = {"data-op": "ingest", "validate-op": "validate", "init-model-op": "init-model",
                "refine-op": "refine", "train-op": "train", "evaluate-op": "evaluate", "register-op": "register"}


def _load(path: Path) -> tuple[dict, dict]:
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return pipeline_spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(pipeline_spec: dict) -> dict[str, dict]:
    tasks = dict(pipeline_spec["root"]["dag"]["tasks"])
    for component in pipeline_spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _train_executors(pipeline_spec: dict) -> list[str]:
    names = [n for n in pipeline_spec["deploymentSpec"]["executors"] if n.startswith("exec-train-op")]
    assert len(names) == 2  # one per branch: tiny model / model.name_or_path
    return names


def test_committed_yaml_is_up_to_date(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "dyme_pipeline.yaml")
    assert fresh.read_bytes() == COMPILED.read_bytes(), (
        f"{COMPILED.relative_to(ROOT)} is stale: run `python -m pipelines.dyme_pipeline` and commit it")


def test_every_component_runs_the_project_image_and_the_image_is_overridable(tmp_path: Path) -> None:
    pipeline_spec, _ = _load(COMPILED)
    images = {e["container"]["image"] for e in pipeline_spec["deploymentSpec"]["executors"].values()}
    assert images == {PROJECT_IMAGE}
    out = tmp_path / "mine.yaml"
    assert main(["--image", "registry.example/me/dyme:dev", "--out", str(out)]) == 0
    mine, platform = _load(out)
    assert {e["container"]["image"] for e in mine["deploymentSpec"]["executors"].values()} == {
        "registry.example/me/dyme:dev"}
    assert platform == _load(COMPILED)[1]  # only the image differs


def test_manifests_name_the_same_image() -> None:
    kustomization = yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())
    [image] = [i for i in kustomization["images"] if i["name"] == "dyme"]
    assert f"{image['newName']}:{image['newTag']}" == PROJECT_IMAGE


def _received(task: dict, tasks: dict[str, dict]) -> set[str]:
    """The params a task receives: `section` for a whole section, `section.key` for keys a select task picked."""
    received = set()
    for name, spec in task["inputs"].get("parameters", {}).items():
        if not name.endswith("_params"):
            continue
        section = name.removesuffix("_params")
        if "taskOutputParameter" in spec:
            picker = tasks[spec["taskOutputParameter"]["producerTask"]]["inputs"]["parameters"]
            received |= {f"{section}.{key}" for key in picker["keys"]["runtimeValue"]["constant"]}
        else:
            received.add(section)
    return received


def test_each_task_receives_only_the_params_its_dvc_stage_reads() -> None:
    # KFP's cache key is a task's inputs: a params section or key its DVC stage does not list would rerun
    # the task where `dvc repro` does not (data.out_dir arrives as the dataset artifact)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    pipeline_spec, _ = _load(COMPILED)
    tasks = _tasks(pipeline_spec)
    seen = set()
    for name, task in tasks.items():
        step = STEP_COMMAND.get(name.rsplit("-", 1)[0] if name[-1].isdigit() else name)
        if step is None:
            continue
        seen.add(step)
        dvc_reads = set(stages[step.replace("-", "_").replace("ingest", "data")]["params"]) - {"data.out_dir"}
        received = _received(task, tasks)
        sections = {p.split(".")[0] for p in dvc_reads}
        assert {p.split(".")[0] for p in received} <= sections | {"data"}, f"{name}: {sorted(received)}"
        assert sections <= {p.split(".")[0] for p in received}, f"{name}: {sorted(received)} vs {sorted(dvc_reads)}"
        picked = {p for p in received if "." in p}
        assert picked <= dvc_reads, f"{name} picks {sorted(picked - dvc_reads)}, which dvc.yaml does not list"
    assert seen == set(STEP_COMMAND.values())
    # refine, exactly: dvc.yaml's refine stage reads data.out_dir, refine and model.name_or_path
    assert _received(tasks["refine-op"], tasks) == {"refine", "model.name_or_path"}
    assert set(stages["refine"]["params"]) == {"data.out_dir", "refine", "model.name_or_path"}


def _task_inputs(pipeline_spec: dict, arguments: dict) -> dict[str, dict]:
    """Each task's parameter values for a run with these pipeline `arguments` (what KFP's cache key holds),
    resolved from the compiled spec: pipeline inputs, constants, and select_params_op's outputs."""
    tasks = _tasks(pipeline_spec)
    resolved: dict[str, dict] = {}

    def value(spec: dict) -> object:
        if "componentInputParameter" in spec:
            return arguments.get(spec["componentInputParameter"].removeprefix("pipelinechannel--"))
        if "runtimeValue" in spec:
            return spec["runtimeValue"]["constant"]
        producer = spec["taskOutputParameter"]["producerTask"]
        assert producer.startswith("select-params-op"), producer
        return select_params_op.python_func(**inputs(producer))

    def inputs(name: str) -> dict:
        if name not in resolved:
            resolved[name] = {k: value(v) for k, v in tasks[name]["inputs"].get("parameters", {}).items()}
        return resolved[name]

    return {name: inputs(name) for name in tasks if name.split("-op")[0] + "-op" in STEP_COMMAND}


def test_a_learning_rate_change_leaves_refines_inputs_unchanged() -> None:
    # the README's promise: KFP's cache reruns what DVC would; a train.* change reruns train, not refine
    pipeline_spec, _ = _load(COMPILED)
    base = load_config(ROOT / "params.yaml")
    changed = load_config(ROOT / "params.yaml", [f"train.learning_rate={base.train.learning_rate * 2}"])
    before, after = _task_inputs(pipeline_spec, sections(base)), _task_inputs(pipeline_spec, sections(changed))
    assert before["refine-op"] == after["refine-op"]
    assert before["refine-op"]["model_params"] == {"name_or_path": base.model.name_or_path}
    assert before["train-op"] != after["train-op"]  # the change does reach training
    # a model key refine does not read leaves it cached too; the model it counts tokens with does not
    lora = _task_inputs(pipeline_spec, sections(load_config(ROOT / "params.yaml", ["model.lora_r=8"])))
    assert lora["refine-op"] == before["refine-op"]
    other = _task_inputs(pipeline_spec, sections(load_config(ROOT / "params.yaml", ["model.name_or_path=a/b"])))
    assert other["refine-op"] != before["refine-op"]


def test_train_checkpoints_under_the_run_id_on_the_volume_and_retries() -> None:
    pipeline_spec, platform = _load(COMPILED)
    tasks = _tasks(pipeline_spec)
    for name in ("train-op", "train-op-2"):
        task = tasks[name]
        parameters = task["inputs"]["parameters"]
        assert parameters["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert parameters["checkpoint_root"]["componentInputParameter"].endswith("checkpoint_root")
        assert task["retryPolicy"]["maxRetryCount"] == TRAIN_RETRIES
    assert pipeline_spec["root"]["inputDefinitions"]["parameters"]["checkpoint_root"]["defaultValue"] == "/checkpoints"
    for name in _train_executors(pipeline_spec):
        mounts = {m["constant"]: m["mountPath"] for m in platform[name]["pvcMount"]}
        assert mounts["dyme-checkpoints"] == "/checkpoints"
    # the component resumes from the run's folder (a retry finds the failed attempt's checkpoints)
    source = " ".join(pipeline_spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]["command"])
    assert '"train.checkpoint_dir": f"{checkpoint_root}/{run_id}"' in source
    assert '"train.resume_from": "auto"' in source


def test_train_gets_a_gpu_the_volumes_and_the_secrets() -> None:
    pipeline_spec, platform = _load(COMPILED)
    for name in _train_executors(pipeline_spec):
        resources = pipeline_spec["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        requests_and_limits = {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"}
        assert requests_and_limits <= set(resources)
        k8s = platform[name]
        mounts = {m["constant"]: m["mountPath"] for m in k8s["pvcMount"]}
        assert mounts == {"dyme-data": "/data", "dyme-checkpoints": "/checkpoints"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        [llm_key] = k8s["secretAsEnv"]
        assert (llm_key["secretName"], llm_key["optional"]) == ("dyme-llm", True)
        assert llm_key["keyToEnv"] == [{"secretKey": "api-key", "envVar": "DYME_LLM_API_KEY"}]
    for name in [*_train_executors(pipeline_spec), "exec-register-op", "exec-register-op-2"]:
        [mlflow] = platform[name]["configMapAsEnv"]
        assert mlflow["configMapName"] == "dyme-mlflow"
        assert mlflow["keyToEnv"] == [{"configMapKey": "tracking-uri", "envVar": "MLFLOW_TRACKING_URI"}]


def test_data_step_takes_the_data_path_input() -> None:
    pipeline_spec, platform = _load(COMPILED)
    assert pipeline_spec["root"]["inputDefinitions"]["parameters"]["data_path"]["defaultValue"] == ""
    data_task = _tasks(pipeline_spec)["data-op"]
    assert data_task["inputs"]["parameters"]["data_path"]["componentInputParameter"] == "data_path"
    source = " ".join(pipeline_spec["deploymentSpec"]["executors"]["exec-data-op"]["container"]["command"])
    assert "steps.ingest(" in source and "steps.synth(" not in source  # the same ingest as `dyme ingest`
    assert {m["constant"] for m in platform["exec-data-op"]["pvcMount"]} == {"dyme-data"}  # paths on the volume


def test_training_waits_for_validation_and_registering_is_never_cached() -> None:
    pipeline_spec, _ = _load(COMPILED)
    tasks = _tasks(pipeline_spec)
    assert "validate-op" in tasks["refine-op"]["dependentTasks"]
    for name in ("train-op", "train-op-2"):
        validation = tasks[name]["inputs"]["artifacts"]["validation"]
        assert validation["componentInputArtifact"] == "pipelinechannel--validate-op-report"
    assert "base_model" in tasks["train-op"]["inputs"]["artifacts"]  # the tiny branch trains init_model's output
    assert "base_model" not in tasks["train-op-2"]["inputs"]["artifacts"]  # the other, model.name_or_path
    for name in ("register-op", "register-op-2"):
        assert tasks[name]["cachingOptions"] == {}  # enableCache false is omitted
