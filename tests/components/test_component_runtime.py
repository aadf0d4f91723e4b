"""components.runtime.step_config: artifact paths reach the config exactly and win over user overrides."""

import pytest

from components.runtime import step_config

PARAMS = "train:\n  max_steps: 7\ndata:\n  path: data/synth\n"


@pytest.mark.parametrize("path", [
    "/tmp/root/run/data-op/dataset",  # a plain local path
    "/minio/mlpipeline/v2/artifacts/dyme/1f2e/data-op/dataset",  # where KFP's launcher puts artifacts
    "/tmp/a: b/#c",  # YAML would read ": " as a mapping and "#" as a comment
    "123",  # YAML would read a number
    "true",  # YAML would read a boolean
])
def test_artifact_path_is_kept_verbatim(path: str) -> None:
    cfg = step_config(PARAMS, [], {"data.path": path})
    assert cfg.data.path == path


def test_artifact_paths_win_over_user_overrides_and_params_are_kept() -> None:
    cfg = step_config(PARAMS, ["data.path=/elsewhere", "train.batch_size=2"], {"data.path": "/artifact"})
    assert cfg.data.path == "/artifact"  # a user override cannot point a step away from its input
    assert (cfg.train.max_steps, cfg.train.batch_size) == (7, 2)
