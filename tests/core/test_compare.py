"""`dyme compare --paired RUN_A RUN_B` (dyme_core/tracking.py `compare_paired`) against a real MLflow store on
SQLite: runs laid out as `dyme register` leaves them (tag `dyme.eval.data_digest`, eval/predictions.jsonl with id,
qtype and correct per row), the paired table and its intervals, the comparison run it logs, and the one-line
refusals. (Registration itself into such runs: tests/core/test_tracking.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported (the CLI does it too)

import pytest  # noqa: E402

from dyme_core import tracking  # noqa: E402
from dyme_core.cli import main  # noqa: E402
from dyme_core.config import RegisterConfig  # noqa: E402

EXPERIMENT = "paired"
DIGEST = "3f2a9c1e" * 8
QTYPES = ("compare", "max", "sum")
N = 120  # 40 rows of each question type


def _correct_a() -> list[int]:
    # right on every other row of each type: 20 of 40 each, 60 of 120 overall
    return [i % 2 for i in range(N)]


def _correct_b() -> list[int]:
    # A's rows, plus 12 of A's misses among the "sum" rows (rows 80-119): +12/120 overall, +12/40 on sum
    b = _correct_a()
    for i in [i for i in range(80, N) if b[i] == 0][:12]:
        b[i] = 1
    return b


def _rows(correct: list[int], ids: list[str] | None = None) -> list[dict]:
    ids = ids or [f"q{i:03d}" for i in range(N)]
    return [{"id": ids[i], "qtype": QTYPES[i // 40], "question": "?", "reference": "1", "completion": "Answer: 1",
             "answer": "1", "correct": c} for i, c in enumerate(correct)]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema takes seconds); each test has its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tracking._client(RegisterConfig(tracking_uri=uri))  # creates the schema under its file lock
    return uri


@pytest.fixture
def store(database: str, tmp_path: Path) -> dict:
    experiment = f"{EXPERIMENT}-{tmp_path.name}"
    cfg = RegisterConfig(tracking_uri=database, experiment=experiment)
    client = tracking._client(cfg)
    experiment_id = client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    return {"uri": database, "cfg": cfg, "client": client, "experiment_id": experiment_id, "tmp": tmp_path,
            "experiment": experiment}


def _run(store: dict, name: str, rows: list[dict] | None, digest: str | None = DIGEST) -> str:
    """A finished run as `dyme register` leaves it: the evaluation's digest tag and eval/predictions.jsonl."""
    client = store["client"]
    run_id = client.create_run(store["experiment_id"], run_name=name).info.run_id
    if digest:
        client.set_tag(run_id, tracking.EVAL_DIGEST_TAG, digest)
    if rows is not None:
        path = store["tmp"] / name / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(run_id, str(path), "eval")
    client.set_terminated(run_id)
    return run_id


def test_paired_table_intervals_and_the_logged_comparison(store: dict) -> None:
    a = _run(store, "grpo-run", _rows(_correct_a()))
    b = _run(store, "dyme-run", _rows(_correct_b()))
    result = tracking.compare_paired(store["cfg"], "grpo-run", b)  # a run name and a run id
    rows = {r["qtype"]: r for r in result["rows"]}
    assert list(rows) == ["all", *QTYPES]
    # overall: exactly +12/120; every resample has B >= A, and not every resample holds a changed row
    assert rows["all"]["diff"] == pytest.approx(0.1)
    assert 0 < rows["all"]["lo"] < 0.1 < rows["all"]["hi"] and rows["all"]["excludes_zero"]
    assert (rows["all"]["acc_a"], rows["all"]["acc_b"]) == (0.5, pytest.approx(0.6))
    assert (rows["all"]["b_only"], rows["all"]["a_only"]) == (12, 0)
    assert rows["sum"]["diff"] == pytest.approx(0.3) and rows["sum"]["lo"] > 0
    # the same answers on a type: exactly zero, with a zero-width interval
    assert (rows["max"]["diff"], rows["max"]["lo"], rows["max"]["hi"]) == (0.0, 0.0, 0.0)

    text = result["text"]
    assert f"on {N} test rows (dataset {DIGEST[:12]}): B - A" in text
    assert f"A  grpo-run ({a[:8]})" in text and f"B  dyme-run ({b[:8]})" in text
    [line] = [x for x in text.splitlines() if x.startswith("all ")]
    assert line.split()[1:5] == ["120", "50.0", "60.0", "+10.0"] and line.rstrip().endswith("12       0")
    assert "*" in line  # the interval excludes 0
    assert "10,000 resamples of the test rows (seed 0)" in text and "percentile" in text
    assert f"Logged as run {result['run_id']}" in text

    client = store["client"]
    logged = client.get_run(result["run_id"])
    assert logged.info.experiment_id == store["experiment_id"] and logged.info.status == "FINISHED"
    assert logged.data.tags[tracking.COMPARISON_TAG] == "true"
    assert (logged.data.tags["dyme.compare.run_a"], logged.data.tags["dyme.compare.run_b"]) == (a, b)
    assert logged.data.metrics["paired/diff"] == pytest.approx(0.1)
    assert logged.data.metrics["paired/sum/diff_lo"] > 0
    assert {f.path for f in client.list_artifacts(result["run_id"], "comparison")} == {
        "comparison/paired.json", "comparison/paired.csv", "comparison/paired.png"}
    saved = json.loads(Path(client.download_artifacts(result["run_id"], "comparison/paired.json",
                                                      str(store["tmp"]))).read_text())
    assert (saved["difference"], saved["resamples"], saved["interval"]) == ("B - A", 10_000,
                                                                            "paired bootstrap, percentile")
    assert saved["rows"] == result["rows"]
    # the comparison run is neither a column of the plain table nor a run a name resolves to
    assert "compare-grpo-run" not in tracking.compare(store["cfg"])
    again = tracking.compare_paired(store["cfg"], "grpo-run", "dyme-run")
    assert again["rows"] == result["rows"]  # seeded: the same intervals


def test_identical_runs_differ_by_exactly_zero(store: dict) -> None:
    _run(store, "first", _rows(_correct_a()))
    _run(store, "second", _rows(_correct_a()))
    rows = tracking.compare_paired(store["cfg"], "first", "second")["rows"]
    assert all((r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0) for r in rows)


def test_rows_are_paired_by_id_not_by_position(store: dict) -> None:
    _run(store, "a", _rows(_correct_a()))
    _run(store, "b", list(reversed(_rows(_correct_a()))))
    assert tracking.compare_paired(store["cfg"], "a", "b")["rows"][0]["hi"] == 0.0


@pytest.mark.parametrize(("rows_b", "digest_b", "message"), [
    (_rows(_correct_a()), "9c1d" * 16, r"evaluated on different data: a \(\w{8}\) on dataset 3f2a9c1e3f2a, "
                                       r"b \(\w{8}\) on 9c1d9c1d9c1d"),
    (_rows(_correct_a())[:-3], DIGEST, r"different rows: 3 row ids only in a \(\w{8}\), 0 only in b"),
    (_rows(_correct_a(), [f"other{i}" for i in range(N)]), DIGEST, "different rows: 120 row ids only in a"),
    (None, DIGEST, r"run b \(\w{8}\) has no eval/predictions.jsonl"),
    (_rows(_correct_a()), None, r"run b \(\w{8}\) records no dataset digest"),
    ([{"id": "q000", "completion": "x Answer: 1"}], DIGEST, r"predictions.jsonl line 1 has no usable id and correct"),
    ([*_rows(_correct_a()), _rows(_correct_a())[0]], DIGEST, "holds row id 'q000' twice"),
])
def test_refused_in_one_line(store: dict, rows_b, digest_b, message) -> None:
    _run(store, "a", _rows(_correct_a()))
    _run(store, "b", rows_b, digest=digest_b)
    with pytest.raises(tracking.ComparisonRefused, match=message) as err:
        tracking.compare_paired(store["cfg"], "a", "b")
    assert "\n" not in str(err.value)
    assert not [r for r in store["client"].search_runs([store["experiment_id"]])
                if r.data.tags.get(tracking.COMPARISON_TAG)]  # nothing logged


def test_unknown_and_ambiguous_run_names(store: dict) -> None:
    _run(store, "a", _rows(_correct_a()))
    _run(store, "twice", _rows(_correct_a()))
    _run(store, "twice", _rows(_correct_a()))
    unknown = f"no run with id or name 'nope' in experiment '{store['experiment']}'"
    with pytest.raises(tracking.ComparisonRefused, match=unknown):
        tracking.compare_paired(store["cfg"], "a", "nope")
    with pytest.raises(tracking.ComparisonRefused, match="run name 'twice' names 2 runs .*; pass a run id"):
        tracking.compare_paired(store["cfg"], "a", "twice")
    with pytest.raises(tracking.ComparisonRefused, match="both arguments name run a"):
        tracking.compare_paired(store["cfg"], "a", "a")


def test_cli(store: dict, capsys: pytest.CaptureFixture) -> None:
    _run(store, "grpo-run", _rows(_correct_a()))
    _run(store, "dyme-run", _rows(_correct_b()))
    _run(store, "elsewhere", _rows(_correct_a(), [f"other{i}" for i in range(N)]))
    common = [f"register.tracking_uri={store['uri']}", f"register.experiment={store['experiment']}"]
    assert main(["compare", "--paired", "grpo-run", "dyme-run", *common]) == 0
    out = capsys.readouterr().out
    assert "question type" in out and "B - A (pts)" in out and "95% interval (pts)" in out
    assert main(["compare", "--paired", "grpo-run", "elsewhere", *common]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's download progress bar
    assert last.startswith("dyme compare: error: the runs were evaluated on different rows: 120 row ids only in")
    assert main(["compare", "--paired", "grpo-run", "dyme-run", "--runs", "x", *common]) == 2
