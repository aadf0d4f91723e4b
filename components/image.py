"""The one place the project image is named for Kubeflow Pipelines (built from the repo's Dockerfile).

Bump it together with the `version` in pyproject.toml, then recompile: `python -m pipelines.dyme_pipeline`.
"""

PROJECT_IMAGE = "ghcr.io/dyme-project/dyme:0.1.0"
