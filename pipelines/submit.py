"""`dyme-submit`: compile the Kubeflow pipeline and start a run of it on a KFP API endpoint.

Submission lives on the pipelines side (the `dyme_core` library never imports `pipelines/` or
`components/`). The config is merged and validated here first (`--config params.yaml` then
`section.key=value` overrides), so a bad key fails now and not in the cluster; the run receives
one dict per params section, the git commit of the submitting checkout (logged to MLflow as
`mlflow.source.git.commit`) and the image every step runs.

    dyme-submit --host http://localhost:8080 --config params.yaml [--image REPO:TAG] [--data-path ID] \
        [--experiment dyme] [section.key=value ...]

Errors (bad config, unreachable or refusing API) are one line on stderr and exit status 1 or 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from components.image import PROJECT_IMAGE
from dyme_core.cli import git_commit
from dyme_core.config import ConfigError, load_config
from pipelines.dyme_pipeline import compile_pipeline, sections


class SubmitError(RuntimeError):
    """The KFP API could not be reached or refused the request."""


def submit(host: str, experiment: str = "dyme", params_file: str | Path | None = None,
           overrides: list[str] | None = None, image: str = PROJECT_IMAGE, data_path: str = "") -> str:
    """Start a run of the pipeline on the KFP API at `host`; returns the run id.

    The tiny random model is built when `model.name_or_path` is `init_model.out_dir`, as `dvc repro`
    does; otherwise the train task loads `model.name_or_path` (params.yaml's models/chart-base is in the
    image, resolved from the steps' working directory). `data_path` (a hub id, a path on the data
    volume or `dvc+<repo>#<path>`) wins over `data.path`.
    """
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    cfg = load_config(params_file, list(overrides or []))
    cfg.register.git_commit = cfg.register.git_commit or git_commit(os.getcwd())
    arguments = {
        **sections(cfg),
        "data_path": data_path,
        "use_tiny_model": cfg.model.name_or_path == cfg.init_model.out_dir,
    }
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "dyme_pipeline.yaml", image=image)
        try:
            run = kfp.Client(host=host).create_run_from_pipeline_package(
                str(package), arguments=arguments, experiment_name=experiment)
        except urllib3.exceptions.HTTPError as e:
            errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(e))
            reason = errno.group(0) if errno else type(e).__name__
            raise SubmitError(f"cannot reach the KFP API at {host} ({reason})") from None
        except ApiException as e:
            raise SubmitError(f"the KFP API at {host} answered {e.status} {e.reason}".rstrip()) from None
    return run.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dyme-submit", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080.")
    parser.add_argument("--config", default=None, help="params.yaml (one section per step).")
    parser.add_argument("--experiment", default="dyme", help="KFP experiment name.")
    parser.add_argument("--image", default=PROJECT_IMAGE, help="Image every step runs (default: %(default)s).")
    parser.add_argument("--data-path", default="", help="Dataset for this run (default: data.path).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. train.max_steps=4.")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module="kfp")  # its client warns about server versions on every call
    try:
        run_id = submit(args.host, experiment=args.experiment, params_file=args.config, overrides=args.overrides,
                        image=args.image, data_path=args.data_path)
    except ConfigError as e:
        print(f"dyme-submit: error: {e}", file=sys.stderr)
        return 2
    except (SubmitError, ValueError, OSError) as e:
        print(f"dyme-submit: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    print(f"submitted run {run_id} to {args.host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
