"""One KFP component per pipeline step, each a thin shell over the `dyme_core.steps` function of the
same name (the one `dyme <step>` calls).

Every component takes `params` (the params.yaml text) and `overrides` (`section.key=value` strings),
points the config's paths at its input/output artifacts and calls the step; no training, data or
registry logic lives here. Imports sit inside the bodies: KFP ships each function's source alone into
the project image, where `dyme_core` and this package are installed.

Run one locally: `kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`, then call it.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def data_op(params: str, overrides: list, dataset: Output[Dataset]):
    """Render the synthetic chart-QA dataset (samples.jsonl + images/) into `dataset`."""
    from components.runtime import step_config
    from dyme_core import steps

    steps.synth(step_config(params, overrides, {"synth.out_dir": dataset.path}))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def init_model_op(params: str, overrides: list, data: Input[Dataset], model: Output[Model]):
    """Build the tiny random SmolVLM-architecture model, its tokenizer trained on `data`'s text."""
    from components.runtime import step_config
    from dyme_core import steps

    steps.init_model(step_config(params, overrides, {"data.path": data.path, "init_model.out_dir": model.path}))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def validate_op(params: str, overrides: list, data: Input[Dataset], report: Output[Artifact],
                metrics: Output[Metrics]):
    """Validate `data` against the data contract; the task fails (and the DAG stops) if any check fails."""
    from components.runtime import step_config
    from dyme_core import steps
    from dyme_core.validation import summarize

    result = steps.validate(step_config(params, overrides, {"data.path": data.path, "validate.report": report.path}))
    print(summarize(result))
    metrics.log_metric("n_rows", result["n_rows"])
    metrics.log_metric("n_failures", len(result["failures"]))
    if not result["success"]:
        raise steps.ValidationFailed(f"the dataset failed validation:\n{summarize(result)}")


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def refine_op(params: str, overrides: list, data: Input[Dataset], refined: Output[Dataset]):
    """Refined reference traces (targets.jsonl, templates.json, refine_stats.json) into `refined`."""
    import tempfile

    from components.runtime import llm_client, step_config
    from dyme_core import steps

    with tempfile.TemporaryDirectory() as cache:
        cfg = step_config(params, overrides, {
            "data.path": data.path, "refine.out": f"{refined.path}/targets.jsonl",
            "refine.template_pool": f"{refined.path}/templates.json", "refine.cache_dir": cache,
        })
        steps.refine(cfg, llm_client(cfg.refine.llm, cfg.refine.backend == "llm"))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_op(params: str, overrides: list, data: Input[Dataset], refined: Input[Dataset],
             validation: Input[Artifact], model: Output[Model], metrics: Output[Metrics],
             base_model: Input[Model] = None):
    """Train; `model` holds the run directory (model/, metrics.jsonl, config.yaml, mlflow_run_id).

    Without `base_model` the model to train is `model.name_or_path` from the params (a hub id).
    Refuses to train if `validation` (validate_op's report) says the data failed.
    """
    from components.runtime import llm_client, step_config
    from dyme_core import steps

    paths = {"data.path": data.path, "train.refined": f"{refined.path}/targets.jsonl",
             "validate.report": validation.path, "train.output_dir": model.path}
    if base_model is not None:
        paths["model.name_or_path"] = base_model.path
    cfg = step_config(params, overrides, paths)
    for key, value in steps.train(cfg, llm_client(cfg.train.llm, cfg.train.checker == "llm")).items():
        metrics.log_metric(key, value)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate_op(params: str, overrides: list, data: Input[Dataset], model: Input[Model],
                results: Output[Artifact], metrics: Output[Metrics]):
    """Greedy evaluation of train_op's `model`: predictions.jsonl, metrics.json and plots into `results`."""
    from components.runtime import step_config
    from dyme_core import steps

    cfg = step_config(params, overrides, {"data.path": data.path, "evaluate.model_path": f"{model.path}/model",
                                          "evaluate.out_dir": results.path})
    for key, value in steps.evaluate(cfg).items():
        metrics.log_metric(key, value)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def register_op(params: str, overrides: list, model: Input[Model], results: Input[Artifact],
                registration: Output[Artifact]):
    """Log the run and model to MLflow, register a version and gate it; register.json into `registration`."""
    from components.runtime import step_config
    from dyme_core import steps

    result = steps.register(step_config(params, overrides, {"train.output_dir": model.path,
                                                             "evaluate.out_dir": results.path,
                                                             "register.out": registration.path}))
    registration.metadata.update({k: result[k] for k in ("model_name", "version", "promoted")})
