"""Layering (DESIGN.md section 5): dyme_core never imports kfp or dvc; only tracking.py imports mlflow, besides
serving.py, the registered MLflow model itself, which no module imports (tracking logs it by path)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "dyme_core"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_kfp_or_dvc_anywhere_and_mlflow_only_in_tracking() -> None:
    for path in PACKAGE.rglob("*.py"):
        found = _imports(path)
        assert not found & {"kfp", "dvc"}, f"{path} imports {found & {'kfp', 'dvc'}}"
        if path.relative_to(PACKAGE).as_posix() not in ("tracking.py", "serving.py"):
            assert "mlflow" not in found, f"{path} imports mlflow"
        text = path.read_text()
        assert "dyme_core.serving" not in text and "import serving" not in text, f"{path} imports serving.py"


def test_importing_the_library_loads_none_of_them() -> None:
    code = ("import sys, dyme_core.cli, dyme_core.trainer, dyme_core.evaluate, dyme_core.steps; "
            "print(sorted(m for m in ('kfp', 'dvc', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_library_imports_neither_pipelines_nor_components() -> None:
    # submission lives on the pipelines side (pipelines/submit.py, `dyme-submit`); the library never reaches up
    for path in PACKAGE.rglob("*.py"):
        found = _imports(path) & {"pipelines", "components"}
        assert not found, f"{path} imports {found}"
        text = path.read_text()
        assert "import_module(\"pipelines" not in text and "import_module('pipelines" not in text, path


def _environment_reads(path: Path) -> list[str]:
    """Where a module touches os.environ / os.getenv / os.putenv (or imports them by name)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "unsetenv"):
            hits.append(f"line {node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            hits += [f"line {node.lineno}: from os import {a.name}" for a in node.names
                     if a.name in ("environ", "getenv", "putenv")]
        elif isinstance(node, ast.Name) and node.id == "environ":
            hits.append(f"line {node.lineno}: environ")
    return hits


def test_tracking_reads_no_environment() -> None:
    # the CLI resolves MLFLOW_TRACKING_URI, DVC_ROOT and DVC_EXP_NAME into register.*; tracking takes arguments
    assert _environment_reads(PACKAGE / "tracking.py") == []
    # the check itself sees what it must
    assert _environment_reads(PACKAGE / "cli.py"), "cli.py reads the environment; the checker should see it"
