"""The DyME pipeline for Kubeflow Pipelines: data -> validate -> refine -> train -> evaluate -> register.

This file only wires the components of `components/steps.py` and adds the cluster settings (GPU,
volumes, Secrets, retries); the steps themselves are `dyme_core.steps`, the same functions `dyme <step>`
and `dvc repro` run. The pipeline takes one dict per params.yaml section (already merged with any
`key=value` overrides by `dyme-submit`) and hands each task only the params its DVC stage reads (whole
sections, or the keys `select_params_op` picks: refine gets `model.name_or_path` alone), so KFP's cache
behaves like DVC's: a `train.*` change reruns train, evaluate and register, not the data, validate,
init-model or refine steps. Train and register also receive the pipeline run id (checkpoint
folder, MLflow tag), so they run in every pipeline run.

    python -m pipelines.dyme_pipeline [--image REPO:TAG]   # recompile pipelines/dyme_pipeline.yaml (committed)
    dyme-submit --host http://localhost:8080 --config params.yaml train.max_steps=300   # pipelines/submit.py

Locally (platform settings are ignored there): `kfp.local.init(runner=kfp.local.SubprocessRunner(
use_venv=False))`, then call `dyme_pipeline(**sections(cfg), data_path=..., checkpoint_root=...)`; see
tests/pipelines/test_local_run.py. Kubernetes objects it expects in the namespace its pods run in
(k8s/pipeline, applied by the kfp-standalone or kfp-profile overlay): PVCs `dyme-data` and
`dyme-checkpoints`, the ConfigMap `dyme-mlflow` (key `tracking-uri`) and the optional Secret `dyme-llm`
(key `api-key`).
"""

import argparse
import tempfile
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineChannel

from components.image import PROJECT_IMAGE
from components.steps import (
    data_op,
    evaluate_op,
    init_model_op,
    refine_op,
    register_op,
    select_params_op,
    train_op,
    validate_op,
)

COMPILED = Path(__file__).with_name("dyme_pipeline.yaml")

DATA_PVC, DATA_MOUNT = "dyme-data", "/data"
CHECKPOINTS_PVC, CHECKPOINTS_MOUNT = "dyme-checkpoints", "/checkpoints"
TRAIN_RETRIES = 2  # a retried train task resumes from its latest checkpoint on the checkpoint volume


def use_gpu(task: PipelineTask) -> PipelineTask:
    """One GPU and the same CPU/memory/shm as the PyTorchJob (k8s/overlays/gpu); tolerates GPU taints."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    task.set_cpu_request("8").set_cpu_limit("16").set_memory_request("48Gi").set_memory_limit("64Gi")
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="16Gi")
    return task


def use_storage(task: PipelineTask) -> PipelineTask:
    """The data and checkpoint volumes; hub downloads are cached on the data volume across runs."""
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    kubernetes.mount_pvc(task, pvc_name=CHECKPOINTS_PVC, mount_path=CHECKPOINTS_MOUNT)
    return task.set_env_variable("HF_HOME", f"{DATA_MOUNT}/.cache/huggingface")


def use_data_volume(task: PipelineTask) -> PipelineTask:
    """The data volume (datasets named by a path on it; hub downloads cached there)."""
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    return task.set_env_variable("HF_HOME", f"{DATA_MOUNT}/.cache/huggingface")


def use_llm_key(task: PipelineTask) -> PipelineTask:
    """DYME_LLM_API_KEY from the Secret dyme-llm when it exists (only LLM refiner/checker configs need it)."""
    return kubernetes.use_secret_as_env(task, secret_name="dyme-llm", secret_key_to_env={"api-key": "DYME_LLM_API_KEY"},
                                        optional=True)


def use_mlflow(task: PipelineTask) -> PipelineTask:
    """MLFLOW_TRACKING_URI from the ConfigMap dyme-mlflow; required, so a run never logs into the pod."""
    return kubernetes.use_config_map_as_env(task, config_map_name="dyme-mlflow",
                                            config_map_key_to_env={"tracking-uri": "MLFLOW_TRACKING_URI"})


def _train_evaluate_register(p: dict[str, PipelineChannel], checkpoint_root: PipelineChannel,
                             dataset: PipelineChannel, refine_task: PipelineTask, validate_task: PipelineTask,
                             **base_model: PipelineChannel) -> None:
    """The tail of the DAG; `base_model` (init_model_op's output) or none (`model.name_or_path`)."""
    train_task = train_op(data_params=p["data"], model_params=p["model"], train_params=p["train"],
                          register_params=p["register"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                          checkpoint_root=checkpoint_root, data=dataset, refined=refine_task.outputs["refined"],
                          validation=validate_task.outputs["report"], **base_model)
    use_mlflow(use_llm_key(use_storage(use_gpu(train_task))))
    train_task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2)
    # evaluate reads train.min_thinking_chars only (dvc.yaml): a learning-rate change reruns it through its model
    scoring = select_params_op(section=p["train"], keys=["min_thinking_chars"])
    scoring.set_display_name("evaluate-train-params")
    evaluate_task = use_gpu(evaluate_op(data_params=p["data"], model_params=p["model"],
                                        evaluate_params=p["evaluate"], train_params=scoring.output, data=dataset,
                                        model=train_task.outputs["model"]))
    register_task = register_op(data_params=p["data"], train_params=p["train"], evaluate_params=p["evaluate"],
                                register_params=p["register"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                data=dataset, model=train_task.outputs["model"],
                                results=evaluate_task.outputs["results"])
    use_mlflow(register_task).set_caching_options(False)  # registering is a side effect: never skip it


@dsl.pipeline(name="dyme", description="DyME training of a small VLM: data, validate, refine, train, evaluate, "
                                       "register (arXiv 2506.23061).")
def dyme_pipeline(synth: dict, data: dict, init_model: dict, model: dict, validate: dict, refine: dict,
                  train: dict, evaluate: dict, register: dict, data_path: str = "",
                  use_tiny_model: bool = False, checkpoint_root: str = CHECKPOINTS_MOUNT):
    """One dict per params.yaml section; `data_path`: a hub id, a path on the data volume or
    `dvc+<repo URL>#<path>[?rev=<rev>]` (else `data.path`; synthetic when both are unset);
    `use_tiny_model`: train a tiny random model built from the data (init_model) instead of
    `model.name_or_path` (by default models/chart-base, which the image carries); `checkpoint_root`:
    where the run's checkpoint folder is made (the volume)."""
    p = {"data": data, "model": model, "train": train, "evaluate": evaluate, "register": register}
    data_task = use_data_volume(data_op(data_params=data, synth_params=synth, validate_params=validate,
                                        data_path=data_path))
    dataset = data_task.outputs["dataset"]
    validate_task = validate_op(data_params=data, validate_params=validate, data=dataset)
    # refine reads model.name_or_path only (dvc.yaml): the rest of `model` must not rerun it
    refine_model = select_params_op(section=model, keys=["name_or_path"]).set_display_name("refine-model-params")
    refine_task = use_llm_key(refine_op(model_params=refine_model.output, refine_params=refine,
                                        data=dataset).after(validate_task))
    # The tail sits in both branches: the local runner cannot pass a dsl.OneOf of artifacts out of a condition.
    with dsl.If(use_tiny_model == True):  # noqa: E712 (builds a KFP condition, not a Python bool)
        init_model_task = init_model_op(data_params=data, init_model_params=init_model,
                                        data=dataset).after(validate_task)
        _train_evaluate_register(p, checkpoint_root, dataset, refine_task, validate_task,
                                 base_model=init_model_task.outputs["model"])
    with dsl.Else():
        _train_evaluate_register(p, checkpoint_root, dataset, refine_task, validate_task)


SECTIONS = ("synth", "data", "init_model", "model", "validate", "refine", "train", "evaluate", "register")


def sections(cfg: Any) -> dict[str, dict]:
    """The validated config as the pipeline's section arguments."""
    tree = cfg.to_dict()
    return {name: tree[name] for name in SECTIONS}


def compile_pipeline(path: str | Path = COMPILED, image: str = PROJECT_IMAGE) -> Path:
    """Write the pipeline spec YAML (what the cluster runs) with every step on `image`; return its path."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(dyme_pipeline, package_path=str(raw))
        text = raw.read_text()
    if image != PROJECT_IMAGE:
        docs = list(yaml.safe_load_all(text))
        for executor in docs[0]["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = image
        text = yaml.safe_dump_all(docs, sort_keys=True)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the DyME Kubeflow pipeline.")
    parser.add_argument("--image", default=PROJECT_IMAGE, help="Image every step runs (default: %(default)s).")
    parser.add_argument("--out", default=str(COMPILED), help="Where to write the pipeline YAML.")
    args = parser.parse_args(argv)
    print(f"compiled {compile_pipeline(args.out, args.image)} (image {args.image})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
