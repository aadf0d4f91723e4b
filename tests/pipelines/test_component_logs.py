"""A component's log under KFP's executor (which logs at INFO) holds the step's own lines, not a library's:
great_expectations alone logs about 200 INFO lines when it is imported, and one of its modules sets its own
logger to INFO."""

from pathlib import Path

import pytest
from kfp import dsl

from components.steps import data_op, validate_op
from dyme_core.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["synth.n_train=2", "synth.n_val=1", "synth.n_test=1", "synth.image_size=112"]
# what KFP's executor (kfp.dsl.executor_main) itself logs at INFO around a component
EXECUTOR_OWN = ("Looking for component", "Loading KFP component", "Got executor_input", "Wrote executor output")


@dsl.pipeline(name="data-then-validate")
def data_then_validate(data: dict, synth: dict, validate: dict):
    data_task = data_op(data_params=data, synth_params=synth, validate_params=validate, data_path="")
    validate_op(data_params=data, validate_params=validate, data=data_task.outputs["dataset"])


def test_the_validate_tasks_log_has_no_library_info_lines(local_kfp: Path, capfd: pytest.CaptureFixture) -> None:
    p = load_config(ROOT / "params.yaml", TINY).to_dict()
    data_then_validate(data=p["data"], synth=p["synth"], validate=p["validate"])
    log = "".join(capfd.readouterr()).split("Executing task")[-1]  # the last task's part: validate-op's
    assert "validate-op" in log and "validation passed: 4 rows" in log, log[-3000:]  # the step's own summary
    # the executor logs at INFO without logger names: every INFO line but its own is a library's
    info = [line.split(" INFO]: ", 1)[1] for line in log.splitlines() if " INFO]: " in line]
    foreign = [m for m in info if not m.startswith(EXECUTOR_OWN)]
    assert not foreign, f"{len(foreign)} library INFO lines, e.g. {foreign[:3]}"
