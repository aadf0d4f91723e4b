"""The artifacts kept in the repository's example DVC remote (`dvc-store/`): fetch them, replace them.

The example remote holds what a fresh clone needs to run the default pipeline offline: the example
dataset (`data/raw`) and the base model (`models/chart-base`). Each has a tracking file in this folder,
`examples/<name>.yaml`: the `.dvc` file that `dvc add` wrote for it (content hash, size, file count).
They are deliberately not `*.dvc` files of the project: the `examples` stage of dvc.yaml runs `fetch`
and owns `data/raw` and `models/chart-base` as its outputs, so the first `dvc repro` puts them in the
DVC cache and `dvc exp apply` or `dvc checkout` in a fresh clone find them there (the data of a project
`.dvc` file stays outside the cache until someone runs `dvc pull`). Both commands run DVC itself in a
scratch project whose remote is `dvc-store/`, so the remote keeps DVC's own layout.

    python examples/artifacts.py fetch examples/chart-base.yaml models/chart-base   # the stage's command
    python examples/artifacts.py add examples/chart-base.yaml /path/to/base-folder  # replace an artifact

`add` stores the folder in `dvc-store/`, rewrites the tracking file and removes the objects no tracking
file names any more (`dvc-store/` is committed to git, so replaced artifacts must not pile up). Then
run `dvc repro` (the `examples` stage fetches the new content) and commit `examples/`, `dvc-store/` and
`dvc.lock`. DESIGN.md section 5 (layout) and the README's DVC section describe where this fits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "dvc-store"  # the example remote; also `remote "example"` of .dvc/config
HEADER = ("# Tracking file of an artifact kept in the example remote (dvc-store/); the `examples` stage of\n"
          "# dvc.yaml fetches it. Written by `python examples/artifacts.py add`; see that file.\n")


class ArtifactError(RuntimeError):
    """A fetch or add that cannot complete: one line naming what is wrong."""


def _dvc(cwd: Path, *args: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        raise ArtifactError(f"dvc {' '.join(args)}: {errors[-1]}")


def _scratch(tmp: Path) -> Path:
    """A throw-away DVC project (no git) whose default remote is the example remote."""
    _dvc(tmp, "init", "--no-scm", "-q")
    _dvc(tmp, "remote", "add", "-d", "example", str(STORE))
    return tmp


def _name(tracking: Path) -> str:
    """The artifact's name inside its tracking file (`outs[0].path`)."""
    try:
        outs = yaml.safe_load(tracking.read_text())["outs"]
        return str(outs[0]["path"])
    except OSError as e:
        raise ArtifactError(f"cannot read tracking file {tracking}: {e.strerror}") from None
    except (yaml.YAMLError, TypeError, KeyError, IndexError):
        raise ArtifactError(f"{tracking} is not a tracking file (a .dvc file's `outs` list)") from None


def fetch(tracking: Path, dest: Path) -> None:
    """Materialise the artifact that `tracking` names at `dest` (replacing what is there)."""
    name = _name(tracking)
    with tempfile.TemporaryDirectory(prefix="dyme-artifact-") as tmp:
        scratch = _scratch(Path(tmp))
        (scratch / f"{name}.dvc").write_text(tracking.read_text())
        _dvc(scratch, "pull", "-q", f"{name}.dvc")
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(scratch / name, dest)
    print(f"fetched {tracking.name} -> {dest}")


def add(tracking: Path, src: Path) -> None:
    """Store the folder (or file) `src` in the example remote as the artifact `tracking` names."""
    if not src.exists():
        raise ArtifactError(f"no such file or folder: {src}")
    name = _name(tracking) if tracking.exists() else tracking.stem
    with tempfile.TemporaryDirectory(prefix="dyme-artifact-") as tmp:
        scratch = _scratch(Path(tmp))
        copy = shutil.copytree if src.is_dir() else shutil.copy2
        copy(src, scratch / name)
        _dvc(scratch, "add", "-q", name)
        _dvc(scratch, "push", "-q", f"{name}.dvc")
        text = (scratch / f"{name}.dvc").read_text()
    tracking.write_text(HEADER + text)
    prune()
    print(f"stored {src} as {tracking}; now `dvc repro` and commit examples/, dvc-store/ and dvc.lock")


def prune() -> None:
    """Remove from the example remote every object that no examples/*.yaml tracking file names."""
    with tempfile.TemporaryDirectory(prefix="dyme-artifact-") as tmp:
        scratch = _scratch(Path(tmp))
        for tracking in sorted(Path(__file__).parent.glob("*.yaml")):
            (scratch / f"{_name(tracking)}.dvc").write_text(tracking.read_text())
        _dvc(scratch, "fetch", "-q")  # a folder's file list lives in the cache: gc needs it to see the files
        _dvc(scratch, "gc", "--workspace", "--cloud", "--force", "-q")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("fetch", "materialise an artifact at DEST"), ("add", "store SRC as the artifact")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("tracking", type=Path, help="the tracking file, examples/<name>.yaml")
        p.add_argument("path", type=Path, metavar="DEST" if command == "fetch" else "SRC")
    args = parser.parse_args(argv)
    try:
        (fetch if args.command == "fetch" else add)(args.tracking, args.path)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
