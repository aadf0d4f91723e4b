"""The DyME pipeline for Kubeflow Pipelines: data -> validate -> refine -> train -> evaluate -> register.

This file only wires the components of `components/steps.py` and adds the cluster settings (GPU,
volumes, Secrets); the steps themselves are `dyme_core.steps`, the same functions `dyme <step>` and
`dvc repro` run. Every task gets the whole params.yaml text plus `section.key=value` overrides, so an
experiment is a params change, never a new pipeline parameter.

    python -m pipelines.dyme_pipeline        # recompile pipelines/dyme_pipeline.yaml (committed; a test diffs it)
    dyme submit --host http://localhost:8080 --config params.yaml train.max_steps=300

Locally (platform settings are ignored there): `kfp.local.init(runner=kfp.local.SubprocessRunner(
use_venv=False))`, then call `dyme_pipeline(params=..., overrides=[...])`; see
tests/pipelines/test_local_run.py. Kubernetes objects it expects (k8s/base): PVCs `dyme-data` and
`dyme-checkpoints`, the optional Secret `dyme-llm` (key `api-key`) and a ConfigMap `dyme-mlflow` (key
`tracking-uri`, e.g. http://mlflow.dyme.svc:5000).
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineChannel

from components.steps import data_op, evaluate_op, init_model_op, refine_op, register_op, train_op, validate_op

COMPILED = Path(__file__).with_name("dyme_pipeline.yaml")

DATA_PVC, DATA_MOUNT = "dyme-data", "/data"
CHECKPOINTS_PVC, CHECKPOINTS_MOUNT = "dyme-checkpoints", "/checkpoints"


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


def use_llm_key(task: PipelineTask) -> PipelineTask:
    """DYME_LLM_API_KEY from the Secret dyme-llm when it exists (only LLM refiner/checker configs need it)."""
    return kubernetes.use_secret_as_env(task, secret_name="dyme-llm", secret_key_to_env={"api-key": "DYME_LLM_API_KEY"},
                                        optional=True)


def use_mlflow(task: PipelineTask) -> PipelineTask:
    """MLFLOW_TRACKING_URI from the ConfigMap dyme-mlflow; required, so a run never logs into the pod."""
    return kubernetes.use_config_map_as_env(task, config_map_name="dyme-mlflow",
                                            config_map_key_to_env={"tracking-uri": "MLFLOW_TRACKING_URI"})


def _train_evaluate_register(params: str, overrides: list, dataset: PipelineChannel,
                             refine_task: PipelineTask, validate_task: PipelineTask, **base_model) -> None:
    """The tail of the DAG; `base_model` (init_model_op's output) or none (`model.name_or_path`)."""
    train_task = train_op(params=params, overrides=overrides, data=dataset, refined=refine_task.outputs["refined"],
                          validation=validate_task.outputs["report"], **base_model)
    use_mlflow(use_llm_key(use_storage(use_gpu(train_task))))
    evaluate_task = use_gpu(evaluate_op(params=params, overrides=overrides, data=dataset,
                                        model=train_task.outputs["model"]))
    register_task = register_op(params=params, overrides=overrides, model=train_task.outputs["model"],
                                results=evaluate_task.outputs["results"])
    use_mlflow(register_task).set_caching_options(False)  # registering is a side effect: never skip it


@dsl.pipeline(name="dyme", description="DyME training of a small VLM: data, validate, refine, train, evaluate, "
                                       "register (arXiv 2506.23061).")
def dyme_pipeline(params: str, overrides: list = [], use_tiny_model: bool = True):  # noqa: B006 (KFP reads it)
    """`params`: params.yaml text; `overrides`: `section.key=value` strings; `use_tiny_model`: train the
    tiny random model built from the data (the embedded default) instead of `model.name_or_path`."""
    data_task = data_op(params=params, overrides=overrides)
    dataset = data_task.outputs["dataset"]
    validate_task = validate_op(params=params, overrides=overrides, data=dataset)
    refine_task = use_llm_key(refine_op(params=params, overrides=overrides, data=dataset).after(validate_task))
    # The tail sits in both branches: the local runner cannot pass a dsl.OneOf of artifacts out of a condition.
    with dsl.If(use_tiny_model == True):  # noqa: E712 (builds a KFP condition, not a Python bool)
        init_model_task = init_model_op(params=params, overrides=overrides, data=dataset).after(validate_task)
        _train_evaluate_register(params, overrides, dataset, refine_task, validate_task,
                                 base_model=init_model_task.outputs["model"])
    with dsl.Else():
        _train_evaluate_register(params, overrides, dataset, refine_task, validate_task)


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    """Write the pipeline spec YAML (what the cluster runs) and return its path."""
    compiler.Compiler().compile(dyme_pipeline, package_path=str(path))
    return Path(path)


def submit(host: str, experiment: str = "dyme", params_file: str | Path | None = None,
           overrides: list[str] | None = None) -> str:
    """Start a run of the pipeline on the KFP API at `host`; returns the run id.

    The config is validated here first, so a bad key fails now and not in the cluster. The tiny model
    is built when `model.name_or_path` is `init_model.out_dir` (as in params.yaml), as `dvc repro` does.
    """
    import kfp

    from dyme_core.config import load_config

    overrides = list(overrides or [])
    cfg = load_config(params_file, overrides)
    arguments = {
        "params": Path(params_file).read_text() if params_file else "",
        "overrides": overrides,
        "use_tiny_model": cfg.model.name_or_path == cfg.init_model.out_dir,
    }
    run = kfp.Client(host=host).create_run_from_pipeline_func(
        dyme_pipeline, arguments=arguments, experiment_name=experiment)
    return run.run_id


if __name__ == "__main__":
    print(f"compiled {compile_pipeline()}")
