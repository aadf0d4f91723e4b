"""The DVC pipeline as a user meets it: a fresh clone, tiny params, `dvc repro` and friends.

One module-scoped copy of the project (`git ls-files --cached --others --exclude-standard`, then
`git init` + commit, so DVC sees a fresh clone) gets a tiny params.yaml (the real one with smaller
sizes, same sections and keys) and the README's command, `dvc pull --allow-missing && dvc repro`. The
tests below then run in file order on that copy: what the first repro builds, the example artifacts
`dvc pull` fetched from the example remote (and that `dvc push` to a user's remote leaves that remote
alone), `dvc status/metrics/plots` (the tables fit 120 columns, the PNGs display without JavaScript);
then the copy's results are committed and a `git clone` of it runs the README's command again and must
leave `git status` clean (same seed, same bytes), and in that fresh clone `dvc exp run`, the README's
`dvc exp show` line, `dvc exp apply` and `dvc exp run --temp` work.
Back in the copy: a no-change repro, a train-param change, a refine-param change, a damaged stage
output, the validation gate and a bad row stopping ingest (on a user dataset beside data/raw), then
the whole DAG on a Hugging Face ChartQA-layout parquet folder and on a DyME JSON file, each by editing
only `data.path`. Subprocesses get `<repo>/.venv/bin` first on PATH, PYTHONPATH=<copy> (the copy's code
runs) and MLFLOW_TRACKING_URI=sqlite in tmp (the repo's mlruns.db is never touched).
About 6 minutes on 2 CPU cores; the timings print with `pytest -s`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from dyme_core.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
STAGES = ("data", "validate", "init_model", "refine", "train", "evaluate", "register")
EXAMPLES = {"data.dvc": "data/raw", "models/chart-base.dvc": "models/chart-base"}  # in the example remote
README = (REPO / "README.md").read_text()
# what repro may write besides stage outputs: DVC's own files, the MLflow store, caches, bytecode,
# register's record of what the registry did (gitignored, no output: the registry's ids are not the seed's),
# and the advisory locks `dyme train` holds beside its run and checkpoint folders (gitignored, emptied on exit)
BOOKKEEPING = re.compile(r"^(\.git/|\.dvc/|mlruns/|mlartifacts/|\.cache/|dvc\.lock$|(.*/)?\.gitignore$|.*__pycache__/"
                         r"|reports/register\.json$|(.*/)?\.[^/]+\.lock$)")

TINY = {
    "synth": {"n_train": 8, "n_val": 2, "n_test": 4, "image_size": 112},
    "init_model": {"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "vision_hidden_size": 32,
                   "vision_layers": 1, "image_size": 32},
    "train": {"max_steps": 2, "batch_size": 2, "num_generations": 2, "max_new_tokens": 8, "save_steps": 0,
              "report_to": ["jsonl", "mlflow"]},
    "evaluate": {"max_new_tokens": 8},
}

TIMINGS: dict[str, float] = {}


@dataclass
class Clone:
    root: Path
    env: dict[str, str] = field(repr=False)
    tmp: Path
    mlflow_db: Path
    repro: subprocess.CompletedProcess | None = field(default=None, repr=False)
    repro_s: float = 0.0
    written: list[str] = field(default_factory=list, repr=False)


def _run(clone: Clone, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in the clone; stdout and stderr merged into .stdout."""
    return subprocess.run(list(args), cwd=clone.root, env=clone.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _tail(done: subprocess.CompletedProcess, n: int = 4000) -> str:
    # great_expectations logs hundreds of INFO lines per import; keep what a reader needs
    lines = [ln for ln in done.stdout.splitlines() if "great_expectations" not in ln]
    return "\n".join(lines)[-n:]


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(done.args)}` exited {done.returncode}:\n{_tail(done)}")
    return done


def _pull_and_repro(clone: Clone) -> subprocess.CompletedProcess:
    """The README's command on a fresh clone: fetch what the example remote serves, then run the DAG
    (`dvc pull` alone exits 1 while the pipeline's outputs are in no remote; `--allow-missing` says so
    and goes on)."""
    pulled = _run(clone, "dvc", "pull", "--allow-missing")
    return pulled if pulled.returncode else _run(clone, "dvc", "repro")


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)", output))


def _params(clone: Clone) -> dict:
    return yaml.safe_load((clone.root / "params.yaml").read_text())


def _learning_rate(clone: Clone) -> float:
    """train.learning_rate as a run reads it (DVC's `-S` writes 5e-05, which a YAML 1.1 loader reads as text)."""
    return load_config(clone.root / "params.yaml").train.learning_rate


def _write_params(clone: Clone, params: dict) -> None:
    (clone.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dataset_rows(root: Path) -> list[dict]:
    """Rows of the materialised dataset (the data stage's output)."""
    return pq.read_table(root / "data/dataset/samples.parquet").to_pylist()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


def _status(clone: Clone) -> dict:
    done = _run(clone, "dvc", "status", "--json")
    _ok(done)
    return json.loads(done.stdout[done.stdout.index("{"):])


def _dirty_stages(status: dict) -> set[str]:
    return {name for name in status if name in STAGES}


def _resolve(text: str, params: dict) -> str:
    def lookup(m: re.Match) -> str:
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def _cached_outs(root: Path, params: dict) -> list[str]:
    """Paths of the dvc.yaml outputs DVC caches (and so git must not track)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if (opts or {}).get("cache", True):
                    paths.append(_resolve(path, params))
    return paths


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    """A fresh clone of the working tree with the tiny params committed."""
    tmp = tmp_path_factory.mktemp("dvc")
    root = tmp / "clone"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, still in the index
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, root / rel, follow_symlinks=False)

    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            assert key in params[section], f"params.yaml has no {section}.{key}; update TINY in this test"
            params[section][key] = value

    mlflow_db = tmp / "mlflow" / "mlruns.db"
    mlflow_db.parent.mkdir()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    c = Clone(root=root, env=env, tmp=tmp, mlflow_db=mlflow_db)
    _write_params(c, params)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "fresh clone, tiny params"]):
        _ok(_run(c, *cmd))
    return c


@pytest.fixture(scope="module")
def repro(clone: Clone) -> Clone:
    """The README's `dvc pull --allow-missing && dvc repro` in the fresh copy (timed; what it wrote is
    recorded)."""
    before = _snapshot(clone.root)
    t0 = time.perf_counter()
    clone.repro = _pull_and_repro(clone)
    clone.repro_s = TIMINGS["tiny dvc repro"] = time.perf_counter() - t0
    print(f"\n[dvc] tiny dvc repro: {clone.repro_s:.1f} s (exit {clone.repro.returncode})")
    after = _snapshot(clone.root)
    clone.written = sorted(p for p, sig in after.items() if before.get(p) != sig)
    return clone


def _need_repro(clone: Clone) -> None:
    if clone.repro is None or clone.repro.returncode != 0:
        pytest.skip("the first dvc repro failed (see test_repro_builds_every_stage_output)")


def test_no_cached_output_is_tracked_by_git(clone: Clone) -> None:
    """DVC refuses to cache an output git tracks ("already tracked by SCM"): a fresh clone cannot repro."""
    tracked = set(_run(clone, "git", "ls-files").stdout.splitlines())
    bad = {}
    for out in _cached_outs(clone.root, _params(clone)):
        hits = [p for p in tracked if p == out or p.startswith(out.rstrip("/") + "/")]
        if hits:
            bad[out] = len(hits)
    assert not bad, (
        f"outputs that dvc.yaml caches are committed to git (path: files): {bad}; "
        "`git rm -r --cached` them and let DVC's .gitignore entries cover them"
    )


def test_repro_builds_every_stage_output(repro: Clone) -> None:
    c = repro
    assert c.repro is not None
    rc, output = c.repro.returncode, _tail(c.repro)
    assert rc == 0, f"dvc repro failed:\n{output}"
    assert _ran(c.repro.stdout) == list(STAGES), output
    root = c.root

    samples = _dataset_rows(root)
    by_split = {s: sorted(r["id"] for r in samples if r["split"] == s) for s in ("train", "val", "test")}
    assert {k: len(v) for k, v in by_split.items()} == {"train": 8, "val": 2, "test": 4}
    assert all((root / "data/dataset" / r["image"]).is_file() for r in samples)
    manifest = json.loads((root / "data/dataset/manifest.json").read_text())
    assert manifest["source"] == "synthetic" and manifest["rows_per_split"] == {"train": 8, "val": 2, "test": 4}
    # validation is bound to the data it checked
    assert json.loads((root / "reports/validation.json").read_text())["data_digest"] == manifest["digest"]

    assert (root / "models/tiny-smolvlm/model.safetensors").is_file()
    assert json.loads((root / "reports/validation.json").read_text())["success"] is True

    targets = _rows(root / "refined/targets.jsonl")
    assert sorted(r["id"] for r in targets) == by_split["train"], "refine must write one row per train sample"
    assert all(r["trace"] for r in targets)

    assert (root / "runs/train/model/model.safetensors").is_file()
    # params.yaml's model.name_or_path (kept by TINY): train starts from the example base, not init_model's model
    trained = json.loads((root / "runs/train/model/config.json").read_text())["text_config"]["hidden_size"]
    base = json.loads((root / "models/chart-base/config.json").read_text())["text_config"]["hidden_size"]
    assert trained == base != TINY["init_model"]["hidden_size"]
    steps = [r["step"] for r in _rows(root / "runs/train/metrics.jsonl")]
    assert steps == [1, 2], f"metrics.jsonl should hold one row per step of max_steps=2, got steps {steps}"

    metrics = json.loads((root / "reports/eval/metrics.json").read_text())
    assert metrics["n"] == 4 and 0.0 <= metrics["relaxed_accuracy"] <= 1.0
    assert (root / "reports/eval/predictions.jsonl").is_file()

    reg = json.loads((root / "reports/register.json").read_text())
    assert isinstance(reg["version"], int) and reg["version"] >= 1
    # registered in the tmp MLflow store, not in a mlruns.db of the project
    assert not (root / "mlruns.db").exists()
    with sqlite3.connect(c.mlflow_db) as db:
        versions = db.execute("select name, version from model_versions").fetchall()
    assert (reg["model_name"], reg["version"]) in versions

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    # what a run measures about the machine stays in the run dir, out of DVC's hash (.dvcignore)
    timing = json.loads((root / "runs/train/timing.json").read_text())
    assert timing["wall_time_s"] > 0 and timing["peak_memory_mb"] > 0
    assert [r["step"] for r in _rows(root / "runs/train/timings.jsonl")] == [1, 2]
    assert not any(k.startswith("time/") for r in _rows(root / "runs/train/metrics.jsonl") for k in r)
    run_files = {p.relative_to(root / "runs/train").as_posix() for p in (root / "runs/train").rglob("*") if p.is_file()}
    volatile = {"timing.json", "timings.jsonl", "mlflow_run_id"}
    assert volatile <= run_files and lock["train"]["outs"][0]["nfiles"] == len(run_files - volatile)


def test_dvc_pull_fetches_the_example_remote(repro: Clone) -> None:
    """`dvc pull` put the example dataset and the base model where the README says, with the content
    their .dvc files pin, from the example remote (dvc-store/, in git) into this clone's DVC cache, and the
    example dataset ingests and validates as the project format."""
    _need_repro(repro)
    root = repro.root
    raw = root / "data/raw"
    samples = _rows(raw / "samples.jsonl")
    assert samples and all((raw / r["image"]).is_file() for r in samples)
    assert (root / "models/chart-base/model.safetensors").is_file()
    assert (root / "models/chart-base/config.json").is_file()
    for dvc_file, path in EXAMPLES.items():
        [out] = yaml.safe_load((root / dvc_file).read_text())["outs"]
        pinned = out["md5"]
        assert (root / "dvc-store/files/md5" / pinned[:2] / pinned[2:]).is_file(), f"{pinned} not in dvc-store/"
        assert (root / ".dvc/cache/files/md5" / pinned[:2] / pinned[2:]).is_file(), f"{path} is not in the DVC cache"
    status = _status(repro)
    assert not set(EXAMPLES) & set(status), status
    for config in ([], ["--config", "params.yaml"]):  # the defaults, then the pipeline's stricter checks
        out, report = repro.tmp / f"raw-dataset{len(config)}", repro.tmp / f"raw-validation{len(config)}.json"
        paths = [f"data.out_dir={out}", f"data.report={out}.json", f"validate.report={report}"]
        done = _ok(_run(repro, "dyme", "ingest", *config, "data.path=data/raw", *paths))
        assert "ingested data/raw (project)" in done.stdout
        assert sum(json.loads(Path(f"{out}.json").read_text())["rows_per_split"].values()) == len(samples)
        _ok(_run(repro, "dyme", "validate", *config, *paths))
        assert json.loads(report.read_text())["success"] is True


def test_dvc_push_leaves_the_example_remote_alone(repro: Clone) -> None:
    """A user's default remote (README: `dvc remote add -d storage ...`) gets the pipeline's outputs on
    `dvc push`; the example remote, in git, is not written, and the example artifacts stay out of the
    user's storage (their .dvc files name the example remote)."""
    _need_repro(repro)
    store, example = repro.tmp / "user-storage", repro.root / "dvc-store"
    before = _snapshot(example)
    _ok(_run(repro, "dvc", "remote", "add", "--local", "-d", "storage", str(store)))
    try:
        _ok(_run(repro, "dvc", "push"))
    finally:
        _ok(_run(repro, "dvc", "remote", "remove", "--local", "storage"))
    assert _snapshot(example) == before
    pushed = {p.parent.name + p.name for p in (store / "files/md5").glob("*/*")}  # md5 = dir + file name
    lock = yaml.safe_load((repro.root / "dvc.lock").read_text())["stages"]
    assert lock["train"]["outs"][0]["md5"] in pushed, "the trained model did not reach the user's storage"
    for dvc_file in EXAMPLES:
        assert yaml.safe_load((repro.root / dvc_file).read_text())["outs"][0]["md5"] not in pushed, dvc_file


def test_repro_writes_only_declared_outputs(repro: Clone) -> None:
    """Every file a stage writes is a dvc.yaml output: otherwise `dvc checkout` cannot restore it and a
    stale copy survives into the next run."""
    _need_repro(repro)
    lock = yaml.safe_load((repro.root / "dvc.lock").read_text())["stages"]
    declared = [o["path"].rstrip("/") for s in lock.values() for o in s.get("outs", [])] + list(EXAMPLES.values())
    undeclared = [p for p in repro.written if not BOOKKEEPING.match(p)
                  and not any(p == d or p.startswith(d + "/") for d in declared)]
    assert not undeclared, f"dvc pull + repro wrote files no stage or .dvc file declares: {undeclared}"


def test_status_up_to_date_after_repro(repro: Clone) -> None:
    _need_repro(repro)
    status = _status(repro)
    assert not status, f"dvc status after repro: {status}"


def _widest_line(done: subprocess.CompletedProcess) -> int:
    return max(len(line.rstrip()) for line in _ok(done).stdout.splitlines())


def test_metrics_show_lists_the_headline_in_120_columns(repro: Clone) -> None:
    """`dvc metrics show` lists only the short-named headline (no digests, paths or strings) and fits a
    120-column terminal; the evaluation's other figures and the stages' reports are plain JSON in git."""
    _need_repro(repro)
    done = _ok(_run(repro, "dvc", "metrics", "show", "--json"))
    shown = json.loads(done.stdout[done.stdout.index("{"):])[""]["data"]
    assert set(shown) == {"reports/eval/headline.json"}, set(shown)
    figures = shown["reports/eval/headline.json"]["data"]
    assert set(figures) == {"accuracy", "format", "grounding", "think_chars", "reward", "memorize", "explore",
                            "skip"}, figures
    assert all(isinstance(v, int | float) for v in figures.values()), figures
    evaluated = json.loads((repro.root / "reports/eval/metrics.json").read_text())
    assert figures["accuracy"] == round(evaluated["relaxed_accuracy"], 4)
    assert json.loads((repro.root / "reports/ingest.json").read_text())["rows_per_split"] == {
        "train": 8, "val": 2, "test": 4}
    width = _widest_line(_run(repro, "dvc", "metrics", "show"))
    assert width <= 120, f"`dvc metrics show` is {width} columns wide"


def test_plots_show_renders_every_plot(repro: Clone) -> None:
    """Every plot loads, and the PNGs are embedded as images (<img>, displayed with no network); the two
    interactive curves are the only vega plots (DVC's HTML loads vega from a CDN)."""
    _need_repro(repro)
    out = repro.tmp / "plots"
    done = _run(repro, "dvc", "plots", "show", "-o", str(out))
    _ok(done)
    html = out / "index.html"
    assert html.is_file() and html.stat().st_size > 0
    images = re.findall(r"<img[^>]*src=\"([^\"]+)\"", html.read_text())
    assert sorted(Path(src).name.removeprefix("workspace_reports_eval_") for src in images) == [
        "accuracy_by_type.png", "modes.png", "rewards.png"], images
    assert all((out / src).is_file() for src in images), images
    # exit 0 does not mean every plot rendered: DVC lists the ones it could not load
    done = _run(repro, "dvc", "plots", "show", "--json", "-o", str(out))  # -o: image plots go there too
    shown = json.loads(done.stdout[done.stdout.index("{"):])
    errors = shown.get("errors") or []
    assert not errors, "dvc plots could not load: " + "; ".join(
        f"{e.get('name')} ({e.get('source', e.get('type'))}): {str(e.get('msg', e)).splitlines()[-1]}" for e in errors)


@pytest.fixture(scope="module")
def fresh(repro: Clone) -> Clone:
    """The copy's first results committed (as a maintainer commits dvc.lock), then `git clone` of it (no
    DVC cache, no gitignored files) and the README's `dvc pull --allow-missing && dvc repro` there, as a new
    user runs it."""
    _need_repro(repro)
    _ok(_run(repro, "git", "add", "-A"))
    _ok(_run(repro, "git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "dvc.lock and results of dvc repro"))
    root = repro.tmp / "fresh"
    _ok(_run(repro, "git", "clone", "-q", str(repro.root), str(root)))
    mlflow_db = repro.tmp / "mlflow-fresh" / "mlruns.db"  # a new user's own store
    mlflow_db.parent.mkdir()
    env = {**repro.env, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}"}
    c = Clone(root=root, env=env, tmp=repro.tmp, mlflow_db=mlflow_db)
    t0 = time.perf_counter()
    c.repro = _pull_and_repro(c)
    c.repro_s = TIMINGS["fresh-clone dvc pull + repro"] = time.perf_counter() - t0
    return c


def test_fresh_clone_repro_writes_the_committed_bytes(fresh: Clone) -> None:
    """Same seed, same bytes: a fresh clone's `dvc repro` reruns every stage with an output git does not
    keep (its DVC cache is empty; register's record is gitignored, so the clone registers into its own
    MLflow store), and leaves `git status` clean: dvc.lock and every git-kept output as committed.
    (validate's only output is git-kept and its input comes back the same: DVC skips it.)"""
    _ok(fresh.repro)
    assert sorted(_ran(fresh.repro.stdout)) == sorted(set(STAGES) - {"validate"}), _tail(fresh.repro)
    registered = json.loads((fresh.root / "reports/register.json").read_text())
    with sqlite3.connect(fresh.mlflow_db) as db:
        assert (registered["model_name"], registered["version"]) in db.execute(
            "select name, version from model_versions").fetchall()
    dirty = _run(fresh, "git", "status", "--porcelain").stdout
    diff = _run(fresh, "git", "diff", "--", "dvc.lock").stdout
    assert not dirty.strip(), f"git status after dvc repro in a fresh clone:\n{dirty}\n{diff[-3000:]}"


def _readme_exp_show() -> list[str]:
    """The README's `dvc exp show ...` line, as a user copies it (shell quoting undone)."""
    import shlex

    lines = [ln.split("  #")[0] for ln in README.splitlines() if ln.startswith("dvc exp show ")]
    assert len(lines) == 1, f"the README should show one `dvc exp show` line, found {lines}"
    return shlex.split(lines[0])


def test_experiments_in_a_fresh_clone(fresh: Clone) -> None:
    """The README's experiment commands in a fresh clone, after its one `dvc pull`: the README's
    `dvc exp show` line compares them in 120 columns, and `dvc exp apply` checks out every output, the
    example artifacts included, from the cache that pull and the pipeline filled."""
    _ok(fresh.repro)
    lr = _params(fresh)["train"]["learning_rate"]
    _ok(_run(fresh, "dvc", "exp", "run", "-n", "half-lr", "-S", f"train.learning_rate={lr / 2}"))
    done = _ok(_run(fresh, "dvc", "exp", "show", "--json"))
    [run] = [exp["revs"][0] for base in json.loads(done.stdout) for exp in base.get("experiments") or []
             if exp["name"] == "half-lr"]
    assert set(run["data"]["metrics"]) == {"reports/eval/headline.json"}, run["data"]["metrics"]
    _ok(_run(fresh, "dvc", "exp", "run", "--temp", "-n", "quarter-lr", "-S", f"train.learning_rate={lr / 4}"))
    wide = {**fresh.env, "COLUMNS": "120"}
    table = subprocess.run([*_readme_exp_show(), "--no-pager"], cwd=fresh.root, env=wide, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
    assert _widest_line(table) <= 120 and "…" not in table.stdout, table.stdout
    shown = ("[half-lr]", "[quarter-lr]", "accuracy", "memorize", "train.learning_rate")
    assert all(s in table.stdout for s in shown), table.stdout
    _ok(_run(fresh, "git", "checkout", "-q", "--", "."))  # back to the committed workspace
    done = _run(fresh, "dvc", "exp", "apply", "half-lr")
    assert done.returncode == 0, f"dvc exp apply in a fresh clone failed:\n{_tail(done)}"
    assert _learning_rate(fresh) == lr / 2
    assert (fresh.root / "data/raw/samples.jsonl").is_file()
    assert (fresh.root / "models/chart-base/model.safetensors").is_file()
    assert not _dirty_stages(_status(fresh))
    done = _run(fresh, "dvc", "exp", "apply", "quarter-lr")
    assert done.returncode == 0, f"dvc exp apply of a --temp experiment failed:\n{_tail(done)}"
    assert _learning_rate(fresh) == lr / 4 and not _dirty_stages(_status(fresh))


def test_noop_repro_runs_no_stage(repro: Clone) -> None:
    _need_repro(repro)
    t0 = time.perf_counter()
    done = _run(repro, "dvc", "repro")
    TIMINGS["no-change dvc repro"] = elapsed = time.perf_counter() - t0
    print(f"\n[dvc] no-change dvc repro: {elapsed:.1f} s")
    _ok(done)
    assert _ran(done.stdout) == [], _tail(done)
    assert _skipped(done.stdout) == set(STAGES), _tail(done)


def test_train_param_change_reruns_train_evaluate_register(repro: Clone) -> None:
    _need_repro(repro)
    params = _params(repro)
    params["train"]["learning_rate"] = params["train"]["learning_rate"] / 2
    _write_params(repro, params)
    version_before = json.loads((repro.root / "reports/register.json").read_text())["version"]

    done = _run(repro, "dvc", "params", "diff", "--json")
    _ok(done)
    changed = json.loads(done.stdout[done.stdout.index("{"):])["params.yaml"]
    assert list(changed) == ["train.learning_rate"], changed
    # register reads the train section too (run naming, output_dir); evaluate follows once train reruns
    assert _dirty_stages(_status(repro)) == {"train", "register"}

    t0 = time.perf_counter()
    done = _run(repro, "dvc", "repro")
    TIMINGS["train-param dvc repro"] = time.perf_counter() - t0
    print(f"\n[dvc] dvc repro after a train param change: {TIMINGS['train-param dvc repro']:.1f} s")
    _ok(done)
    assert _ran(done.stdout) == ["train", "evaluate", "register"], _tail(done)
    assert _skipped(done.stdout) >= {"data", "init_model", "validate", "refine"}
    # DVC removed the old metrics.jsonl before train ran: no rows appended to the last run's
    assert [r["step"] for r in _rows(repro.root / "runs/train/metrics.jsonl")] == [1, 2]
    assert json.loads((repro.root / "reports/register.json").read_text())["version"] == version_before + 1
    assert not _dirty_stages(_status(repro))


def test_refine_param_change_stops_when_targets_are_unchanged(repro: Clone) -> None:
    """refine reruns on its own param; identical targets do not retrain (DVC compares the file, not the run)."""
    _need_repro(repro)
    params = _params(repro)
    params["refine"]["cache_dir"] = params["refine"]["cache_dir"].rstrip("/") + "-moved"
    _write_params(repro, params)
    targets = _md5(repro.root / "refined/targets.jsonl")
    assert _dirty_stages(_status(repro)) == {"refine"}
    done = _run(repro, "dvc", "repro")
    _ok(done)
    assert _ran(done.stdout) == ["refine"], _tail(done)
    assert _md5(repro.root / "refined/targets.jsonl") == targets
    assert _skipped(done.stdout) >= {"train", "evaluate", "register"}


def test_damaged_stage_output_is_restored_from_cache(repro: Clone) -> None:
    """A hand-damaged file of data/dataset (the data stage's output) comes back from the DVC cache:
    repro checks it out again and runs nothing. (So the validation gate is shown on data/raw below.)"""
    _need_repro(repro)
    image = sorted((repro.root / "data/dataset/images").glob("*.png"))[0]
    good = image.read_bytes()
    image.write_bytes(b"not an image at all")
    assert "data" in _dirty_stages(_status(repro))
    done = _run(repro, "dvc", "repro")
    _ok(done)
    assert _ran(done.stdout) == [], _tail(done)
    assert image.read_bytes() == good
    assert not _dirty_stages(_status(repro))


def test_validation_gate_stops_repro_before_train(repro: Clone) -> None:
    """An image too small for the model in a user's dataset (a copy of the example data/raw at
    data/mine, set as data.path as the README says for your own data): ingest takes it (it decodes),
    repro fails at validate, names the sample, and nothing downstream runs."""
    _need_repro(repro)
    raw = repro.root / "data/mine"
    shutil.copytree(repro.root / "data/raw", raw)
    bad = next(r for r in _rows(raw / "samples.jsonl") if r["split"] == "train")
    Image.new("RGB", (4, 4), "white").save(raw / bad["image"])
    params = _params(repro)
    params["data"]["path"] = "data/mine"
    _write_params(repro, params)
    model = repro.root / "runs/train/model/model.safetensors"
    model_before = _md5(model)
    lock_train = yaml.safe_load((repro.root / "dvc.lock").read_text())["stages"]["train"]

    done = _run(repro, "dvc", "repro")
    assert done.returncode != 0, _tail(done)
    assert "failed to reproduce 'validate'" in done.stdout, _tail(done)
    assert bad["id"] in done.stdout, f"the failure should name {bad['id']}:\n{_tail(done)}"
    ran = _ran(done.stdout)
    assert ran[:2] == ["data", "validate"] and not {"refine", "train", "evaluate", "register"} & set(ran), ran
    report = json.loads((repro.root / "reports/validation.json").read_text())
    assert report["success"] is False
    assert bad["id"] in {f["id"] for f in report["failures"]}, report["failures"]
    assert _md5(model) == model_before
    assert yaml.safe_load((repro.root / "dvc.lock").read_text())["stages"]["train"] == lock_train


def test_bad_row_stops_repro_at_ingest(repro: Clone) -> None:
    """An image that does not decode stops the data stage itself, with one line naming the row. (The
    stage tracks data.path as a param, not the folder: a source edited in place is re-ingested with
    `dvc repro --force data`, as the README says.)"""
    _need_repro(repro)
    raw = repro.root / "data/mine"
    if not (raw / "samples.jsonl").is_file() or _params(repro)["data"]["path"] != "data/mine":
        pytest.skip("needs data/mine as data.path (see test_validation_gate_stops_repro_before_train)")
    bad = [r for r in _rows(raw / "samples.jsonl") if r["split"] == "train"][-1]
    (raw / bad["image"]).write_bytes(b"\x00garbage, not a PNG\xff" * 8)
    model_before = _md5(repro.root / "runs/train/model/model.safetensors")
    done = _run(repro, "dvc", "repro", "--force", "data")
    assert done.returncode != 0, _tail(done)
    assert "failed to reproduce 'data'" in done.stdout, _tail(done)
    assert f"(id '{bad['id']}'): " in done.stdout and "cannot decode image" in done.stdout, _tail(done)
    assert "Traceback" not in done.stdout
    assert _ran(done.stdout) == ["data"]
    assert _md5(repro.root / "runs/train/model/model.safetensors") == model_before


def _png_bytes(color: str, size: tuple[int, int] = (48, 36)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _repro_on(repro: Clone, data_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Edit only data.path in params.yaml, run `dvc repro`; (the run, the ingest manifest)."""
    params = _params(repro)
    params["data"]["path"] = str(data_path)
    _write_params(repro, params)
    t0 = time.perf_counter()
    done = _run(repro, "dvc", "repro")
    TIMINGS[f"dvc repro on {data_path.name}"] = time.perf_counter() - t0
    _ok(done)
    assert _ran(done.stdout) == list(STAGES), _tail(done)
    assert not _dirty_stages(_status(repro))
    return done, json.loads((repro.root / "data/dataset/manifest.json").read_text())


def _check_downstream(root: Path, manifest: dict) -> None:
    rows = _dataset_rows(root)
    train_ids = sorted(r["id"] for r in rows if r["split"] == "train")
    assert sorted(r["id"] for r in _rows(root / "refined/targets.jsonl")) == train_ids
    assert json.loads((root / "reports/validation.json").read_text())["data_digest"] == manifest["digest"]
    metrics = json.loads((root / "reports/eval/metrics.json").read_text())
    assert metrics["n"] == manifest["rows_per_split"]["test"]
    assert json.loads((root / "reports/register.json").read_text())["version"] >= 1


def test_repro_on_a_hf_chartqa_parquet_folder(repro: Clone) -> None:
    """A local folder in the hub layout (data/<split>-*.parquet, ChartQA columns): the whole DAG runs."""
    _need_repro(repro)
    import datasets

    folder = repro.tmp / "ChartQA"
    features = datasets.Features({"query": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.Value("string")),
                                  "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
                                  "image": datasets.Image()})
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    (folder / "data").mkdir(parents=True)
    for split, n in {"train": 6, "val": 2, "test": 3}.items():
        records = {"query": [f"What is the {split} value {i}?" for i in range(n)],
                   "label": [[str(10 * i)] for i in range(n)], "human_or_machine": [i % 2 for i in range(n)],
                   "image": [{"bytes": _png_bytes(colors[i % 6]), "path": None} for i in range(n)]}
        datasets.Dataset.from_dict(records, features=features).to_parquet(
            str(folder / f"data/{split}-00000-of-00001.parquet"))
    done, manifest = _repro_on(repro, folder)
    assert manifest["format"] == "hf" and manifest["rows_per_split"] == {"train": 6, "val": 2, "test": 3}
    _check_downstream(repro.root, manifest)


def test_repro_on_a_dyme_json_file(repro: Clone) -> None:
    """An official-style DyME JSON training file (extra fields, numeric answers, one split): val and test
    are carved from it and the whole DAG runs."""
    _need_repro(repro)
    folder = repro.tmp / "dyme"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(20):
        (folder / f"images/{i}.png").write_bytes(_png_bytes(["red", "green", "blue", "gray"][i % 4]))
        rows.append({"question": f"What is the value of bar {i}? Answer with a number.",
                     "question_wo_prompt": f"What is the value of bar {i}?", "answer": i * 2,
                     "hint": f"The chart shows bar {i} at {i * 2}. So the answer is {i * 2}.",
                     "image": f"images/{i}.png", "human_or_machine": 0, "visual_fact": f"bar {i}: {i * 2}"})
    (folder / "chart_train.json").write_text(json.dumps(rows))
    done, manifest = _repro_on(repro, folder / "chart_train.json")
    assert manifest["format"] == "dyme_json" and manifest["carve"]["rows"] == {"test": 2, "val": 2}
    assert manifest["rows_per_split"] == {"train": 16, "val": 2, "test": 2}
    _check_downstream(repro.root, manifest)
    print(f"\n[dvc] timings: {', '.join(f'{k} {v:.1f} s' for k, v in TIMINGS.items())}")
