"""One KFP component per pipeline step, each a thin shell over the `dyme_core.steps` function of the
same name (the one `dyme <step>` calls).

Every component takes the params its step reads (`<section>_params`, one dict each, as the DVC stage
declares them: a whole section, or the keys `select_params_op` picked), points the config's paths at its
input/output artifacts and calls the step; no training, data or registry logic lives here. So KFP's cache
key changes when, and only when, what the step reads changes. Imports sit inside the bodies: KFP ships
each function's source alone into the project image, where `dyme_core` and this package are installed.

Run one locally: `kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`, then call it.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def data_op(data_params: dict, synth_params: dict, validate_params: dict, data_path: str,
            dataset: Output[Dataset], report: Output[Artifact]):
    """Ingest `data_path` (else `data.path`; synthetic when both are unset) into the project format:
    samples.parquet, images/ and manifest.json in `dataset`, as `dyme ingest` does; the ingest
    report (rows per split, dropped rows, carve) into `report`."""
    import tempfile

    from components.runtime import fetch_data, step_config
    from dyme_core import steps

    with tempfile.TemporaryDirectory() as tmp:
        source = fetch_data(data_path or data_params.get("path", ""), tmp)
        sections = {"data": data_params, "synth": synth_params, "validate": validate_params}
        steps.ingest(step_config(sections, {"data.path": source, "data.out_dir": dataset.path,
                                            "data.report": report.path}))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def init_model_op(data_params: dict, init_model_params: dict, data: Input[Dataset], model: Output[Model]):
    """Build the tiny random model, its tokenizer trained on `data`'s text."""
    from components.runtime import step_config
    from dyme_core import steps

    steps.init_model(step_config({"data": data_params, "init_model": init_model_params},
                                 {"data.out_dir": data.path, "init_model.out_dir": model.path}))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def validate_op(data_params: dict, validate_params: dict, data: Input[Dataset], report: Output[Artifact],
                metrics: Output[Metrics]):
    """Validate `data` against the data contract; the task fails (and the DAG stops) if any check fails."""
    from components.runtime import step_config
    from dyme_core import steps
    from dyme_core.validation import summarize

    result = steps.validate(step_config({"data": data_params, "validate": validate_params},
                                        {"data.out_dir": data.path, "validate.report": report.path}))
    print(summarize(result))
    metrics.log_metric("n_rows", result["n_rows"])
    metrics.log_metric("n_failures", len(result["failures"]))
    if not result["success"]:
        raise steps.ValidationFailed(f"the dataset failed validation:\n{summarize(result)}")


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def select_params_op(section: dict, keys: list) -> dict:
    """The `keys` of one params section, for a task whose step reads only those (as its DVC stage lists
    `section.key`): that task's inputs, and so its cache key, stay the same while the rest of the section
    changes."""
    return {key: section[key] for key in keys}


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def refine_op(model_params: dict, refine_params: dict, data: Input[Dataset], refined: Output[Dataset]):
    """Refined reference traces (targets.jsonl, templates.json, refine_stats.json) into `refined`.

    Given only what the DVC stage reads: `refine`, `model_params` = {name_or_path} (the tokenizer the
    target lengths are counted in) and the dataset (data.out_dir), so a train change or another model key
    leaves the task cached. (Its warning of a train.max_new_tokens below the targets' p95 length compares
    with the default; the lengths are in refine_stats.json.)
    """
    import tempfile

    from components.runtime import llm_client, step_config
    from dyme_core import steps

    with tempfile.TemporaryDirectory() as cache:
        cfg = step_config({"model": model_params, "refine": refine_params}, {
            "data.out_dir": data.path, "refine.out": f"{refined.path}/targets.jsonl",
            "refine.template_pool": f"{refined.path}/templates.json", "refine.cache_dir": cache,
        })
        steps.refine(cfg, llm_client(cfg.refine.llm, cfg.refine.backend == "llm" or cfg.refine.facts_from == "vlm"))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_op(data_params: dict, model_params: dict, train_params: dict, register_params: dict,
             run_id: str, checkpoint_root: str, data: Input[Dataset], refined: Input[Dataset],
             validation: Input[Artifact], model: Output[Model], metrics: Output[Metrics],
             base_model: Input[Model] = None):
    """Train; `model` holds the run directory (model/, metrics.jsonl, config.yaml, mlflow_run_id).

    Checkpoints go to `<checkpoint_root>/<run_id>` (the checkpoint volume, one folder per pipeline
    run) and training resumes from the latest one there, so a retried task continues where the
    failed attempt stopped. The KFP run id is tagged on the MLflow run. Without `base_model` the model
    to train is `model.name_or_path` (a hub id). Refuses to train if `validation` says the data failed.
    """
    from components.runtime import llm_client, step_config
    from dyme_core import steps

    paths = {"data.out_dir": data.path, "train.refined": f"{refined.path}/targets.jsonl",
             "train.template_pool": f"{refined.path}/templates.json", "validate.report": validation.path,
             "train.output_dir": model.path, "train.checkpoint_dir": f"{checkpoint_root}/{run_id}",
             "train.resume_from": "auto", "register.tags": {**register_params.get("tags", {}), "kfp.run_id": run_id}}
    if base_model is not None:
        paths["model.name_or_path"] = base_model.path
    sections = {"data": data_params, "model": model_params, "train": train_params, "register": register_params}
    cfg = step_config(sections, paths)
    for key, value in steps.train(cfg, llm_client(cfg.train.llm, cfg.train.checker == "llm")).items():
        metrics.log_metric(key, value)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate_op(data_params: dict, model_params: dict, evaluate_params: dict, train_params: dict,
                data: Input[Dataset], model: Input[Model], results: Output[Artifact], metrics: Output[Metrics]):
    """Greedy evaluation of train_op's `model`: predictions.jsonl, metrics.json and plots into `results`.
    `train_params` = {min_thinking_chars}: format is scored as training scores it."""
    from components.runtime import step_config
    from dyme_core import steps

    cfg = step_config({"data": data_params, "model": model_params, "evaluate": evaluate_params,
                       "train": train_params},
                      {"data.out_dir": data.path, "evaluate.model_path": f"{model.path}/model",
                       "evaluate.out_dir": results.path})
    for key, value in steps.evaluate(cfg).items():
        metrics.log_metric(key, value)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def register_op(data_params: dict, train_params: dict, evaluate_params: dict, register_params: dict,
                run_id: str, data: Input[Dataset], model: Input[Model], results: Input[Artifact],
                registration: Output[Artifact]):
    """Log the run and model to MLflow, register a version and gate it; register.json into `registration`."""
    from components.runtime import step_config
    from dyme_core import steps

    sections = {"data": data_params, "train": train_params, "evaluate": evaluate_params,
                "register": register_params}
    result = steps.register(step_config(sections, {
        "data.out_dir": data.path, "train.output_dir": model.path, "evaluate.out_dir": results.path,
        "register.out": registration.path,
        "register.tags": {**register_params.get("tags", {}), "kfp.run_id": run_id}}))
    registration.metadata.update({k: result[k] for k in ("model_name", "version", "promoted")})
