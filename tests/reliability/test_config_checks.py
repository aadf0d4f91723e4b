"""The config refuses non-finite numbers (issue 10, item 5): every float key, nan or +-inf, from the
command line or a params file, ends with one line naming the key and exit status 2, never a
traceback; `train.keep_checkpoints` must be >= 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyme_core import cli
from dyme_core.config import ConfigError, describe, load_config

# every leaf whose default is a float (learning rate, temperature, top_p, eps, margins, timeouts...)
FLOAT_KEYS = [key for key, _, default in describe() if isinstance(default, float)]
# floats inside a mapping: the reward weights
MAPPED_FLOATS = [f"{key}.{name}" for key, _, default in describe() if isinstance(default, dict)
                 for name, value in default.items() if isinstance(value, float)]


def test_the_walk_covers_the_keys_the_issue_names() -> None:
    assert {"train.learning_rate", "train.temperature", "train.top_p", "train.adv_eps", "train.clip_eps",
            "register.gate_margin"} <= set(FLOAT_KEYS)
    assert "train.reward_weights.format" in MAPPED_FLOATS


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "NaN", "Infinity", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS + MAPPED_FLOATS)
def test_non_finite_values_are_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    named, rest = str(e.value).split(" ", 1)
    # the key, or (LLMConfig checks itself before the tree is built) its `llm.<field>` tail
    assert key.endswith(named) and named.count(".") >= 1, str(e.value)
    assert rest.startswith("must be a finite number")


def test_defaults_and_params_yaml_pass() -> None:
    load_config(None, [])
    load_config(Path(__file__).resolve().parents[2] / "params.yaml", [])


@pytest.mark.parametrize("override", ["train.learning_rate=nan", "train.temperature=inf", "train.top_p=-inf",
                                      "train.reward_weights.thinking=.nan", "train.keep_checkpoints=-1"])
def test_cli_refuses_with_one_line(override: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc = cli.main(["train", f"train.output_dir={out}", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert override.split("=")[0] in err
    assert not out.exists()


def test_params_file_with_nan_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  learning_rate: .nan\n")
    assert cli.main(["train", "--config", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dyme train: error: train.learning_rate must be a finite number, got nan"
