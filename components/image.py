"""The one place the project image is named for Kubeflow Pipelines (built from the repo's Dockerfile).

Override it at compile time (`python -m pipelines.dyme_pipeline --image REPO:TAG`) or submit time
(`dyme-submit --image REPO:TAG`); the committed pipeline YAML carries this default, and
tests/pipelines checks that k8s/base/kustomization.yaml names the same image for the manifests.
Bump it together with the `version` in pyproject.toml, then recompile.
"""

PROJECT_IMAGE = "ghcr.io/dyme-project/dyme:0.1.0"
