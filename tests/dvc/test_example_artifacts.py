"""examples/artifacts.py: the example remote's artifacts as the integrator replaces them and the pipeline
fetches them. Runs on a copy of examples/ and dvc-store/ (the script finds the remote beside itself), so
the repository's remote is never touched. A few seconds (each step runs DVC in a scratch project)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _artifacts(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "examples/artifacts.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _objects(store: Path) -> set[str]:
    return {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}


def test_replace_then_fetch_the_base_model(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for folder in ("examples", "dvc-store"):
        shutil.copytree(REPO / folder, root / folder)
    store, tracking = root / "dvc-store", root / "examples/chart-base.yaml"
    before = _objects(store)
    old_md5 = yaml.safe_load(tracking.read_text())["outs"][0]["md5"]

    new_base = tmp_path / "base"
    new_base.mkdir()
    (new_base / "config.json").write_text('{"model_type": "idefics3"}\n')
    (new_base / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    done = _artifacts(root, "add", str(tracking), str(new_base))
    assert done.returncode == 0, done.stderr

    pinned = yaml.safe_load(tracking.read_text())["outs"][0]
    assert pinned["md5"] != old_md5 and pinned["nfiles"] == 2 and pinned["path"] == "chart-base"
    after = _objects(store)
    # the old placeholder's folder listing is gone (dvc-store is committed: nothing piles up), the example
    # dataset's objects are all kept
    assert f"files/md5/{old_md5[:2]}/{old_md5[2:]}" in before - after
    raw_md5 = yaml.safe_load((root / "examples/data-raw.yaml").read_text())["outs"][0]["md5"]
    assert f"files/md5/{raw_md5[:2]}/{raw_md5[2:]}" in after

    dest = tmp_path / "fetched/chart-base"
    done = _artifacts(root, "fetch", str(tracking), str(dest))
    assert done.returncode == 0, done.stderr
    assert _files(dest) == _files(new_base)
    raw = tmp_path / "fetched/raw"
    assert _artifacts(root, "fetch", str(root / "examples/data-raw.yaml"), str(raw)).returncode == 0
    assert (raw / "samples.jsonl").is_file()


@pytest.mark.parametrize("args, message", [
    (["add", "examples/chart-base.yaml", "no/such/folder"], "no such file or folder: no/such/folder"),
    (["fetch", "examples/missing.yaml", "out"], "cannot read tracking file examples/missing.yaml"),
    (["fetch", "dvc-store", "out"], "cannot read tracking file dvc-store"),
])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "examples", root / "examples")
    done = _artifacts(root, *args)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {message}"), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
