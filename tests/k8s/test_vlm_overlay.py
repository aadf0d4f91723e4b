"""k8s/overlays/gpu-vlm: the LLM server serves the vision model that `refine.facts_from: vlm` asks for.

The overlay renders and validates strictly with every other overlay (test_manifests.py discovers it);
this checks what the refine step relies on: the model `refine.facts_model` names, images accepted one per
prompt, the Service and port the config points at unchanged.

Run: `bash k8s/ci-install.sh && .venv/bin/python -m pytest tests/k8s -q`
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dyme_core.config import RefineConfig

ROOT = Path(__file__).resolve().parents[2]


def _render(target: Path) -> list[dict[str, Any]]:
    beside = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside) if beside.is_file() else shutil.which("kubectl") or "kubectl"
    proc = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def test_vlm_overlay_serves_the_facts_model_with_one_image_per_prompt() -> None:
    docs = _render(ROOT / "k8s/overlays/gpu-vlm")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "dyme-llm"]
    (vllm,) = deployment["spec"]["template"]["spec"]["containers"]
    args = vllm["args"]
    assert vllm["command"] == ["vllm", "serve"]
    assert args[0] == RefineConfig().facts_model
    assert json.loads(_flag(args, "--limit-mm-per-prompt")) == {"image": 1, "video": 0}
    assert json.loads(_flag(args, "--mm-processor-kwargs"))["max_pixels"] > 0
    assert _flag(args, "--port") == "8000" and vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # everything else is the gpu overlay's: only the server's args and resources differ
    gpu = _render(ROOT / "k8s/overlays/gpu")
    (base,) = [d for d in gpu if d["kind"] == "Deployment" and d["metadata"]["name"] == "dyme-llm"]
    for doc in (deployment, base):
        container = doc["spec"]["template"]["spec"]["containers"][0]
        container.pop("args"), container.pop("resources")
    assert deployment == base
    assert [d for d in docs if d["metadata"]["name"] != "dyme-llm" or d["kind"] != "Deployment"] == \
        [d for d in gpu if d["metadata"]["name"] != "dyme-llm" or d["kind"] != "Deployment"]
