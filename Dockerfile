# syntax=docker/dockerfile:1
# The project image: the `dyme` CLI and library with kfp, mlflow and dvc. The distributed training
# job (k8s/), the Kubeflow pipeline components and the DVC stages all run this one image.
#
#   docker build -t ghcr.io/<you>/dyme:0.1.0 .
#
# torch: the GPU image installs the CUDA build from the PyTorch index below (torch==2.13.0 in
# constraints.txt also matches the local version 2.13.0+cu128). For another CUDA version pass its
# index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130; for a smaller
# CPU-only image (local clusters) pass https://download.pytorch.org/whl/cpu.

FROM python:3.11.7-slim-bookworm AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY dyme_core/ dyme_core/
COPY components/ components/
COPY pipelines/ pipelines/
# Everything at the exact versions of constraints.txt; only torch comes from TORCH_INDEX_URL.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt .
# The embedded default's base model (model.name_or_path: models/chart-base) comes from the repository's
# example DVC remote (models/chart-base.dvc names it: `remote: example`); DVC pulls it in a project without
# git (core.no_scm), so the build needs neither git nor the repository's history.
COPY .dvc/config .dvc/config
COPY models/chart-base.dvc models/chart-base.dvc
COPY dvc-store/ dvc-store/
RUN dvc config core.no_scm true && dvc pull -q models/chart-base.dvc

FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="dyme" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 dyme \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin dyme
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt params.yaml README.md ./
COPY dyme_core/ dyme_core/
COPY components/ components/
COPY pipelines/ pipelines/
# The base model, read-only beside the code; steps run in /home/dyme, where the relative default path
# models/chart-base resolves to it (models/ itself stays the runtime user's, for models a step builds).
COPY --from=build /src/models/chart-base /app/models/chart-base
RUN mkdir /home/dyme/models \
 && ln -s /app/models/chart-base /home/dyme/models/chart-base \
 && chown -h 1000:1000 /home/dyme/models /home/dyme/models/chart-base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_DISABLE_TELEMETRY=1
# Code and packages stay root-owned and read-only to the runtime user; steps run in its home, which it
# owns, so a relative path a step writes (a cache, a report) never hits the root-owned /app.
WORKDIR /home/dyme
USER 1000:1000
ENTRYPOINT ["dyme"]
CMD ["--help"]
