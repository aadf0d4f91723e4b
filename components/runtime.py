"""What every component does before calling its step: build the one Config, and the LLM client.

Imported inside the component bodies, so it runs in the project image (where this package is
installed) or, under `kfp.local`, in the current environment. Like the CLI, this is an entry point:
it reads the environment (the LLM API key, MLFLOW_TRACKING_URI from the ConfigMap) through the CLI's
`resolve_tracking`; `dyme_core` never does.

A component receives only the params sections its step reads (as the DVC stage declares them), so
KFP's cache key changes exactly when DVC would rerun the step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from dyme_core.cli import quiet_libraries, resolve_tracking
from dyme_core.config import Config, LLMConfig, load_config
from dyme_core.llm import ChatClient

DVC_PREFIX = "dvc+"  # data_path = dvc+<git repo URL>#<path in the repo>[?rev=<git rev>]


def step_config(sections: dict[str, dict[str, Any]], paths: dict[str, Any]) -> Config:
    """params sections -> artifact paths and run values (last, so they win), validated once.

    Pinned values are written as JSON so that no path is read back as another YAML type. Also holds the
    chatty third-party loggers above INFO, as the CLI does (KFP's executor logs at INFO).
    """
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(sections, sort_keys=False))
        pinned = [f"{key}={json.dumps(value if isinstance(value, dict) else str(value))}"
                  for key, value in paths.items()]
        return resolve_tracking(load_config(params_file, pinned))


def llm_client(cfg: LLMConfig, needed: bool) -> ChatClient | None:
    """The refiner/judge client when the config uses one; the key comes from `cfg.api_key_env`."""
    return ChatClient(cfg, api_key=os.environ.get(cfg.api_key_env)) if needed else None


def fetch_data(data_path: str, workdir: str | Path) -> str:
    """What `data.path` the ingest step reads for the pipeline input `data_path`.

    Empty -> `synthetic`; a hub id or a path on the data volume -> unchanged (ingest detects which);
    `dvc+<repo URL>#<path>[?rev=<rev>]` -> `dvc get` of that DVC-tracked path into `workdir`.
    """
    if not data_path:
        return "synthetic"
    if not data_path.startswith(DVC_PREFIX):
        return data_path
    from dvc.repo import Repo

    url = urlsplit(data_path[len(DVC_PREFIX):])
    if not url.fragment:
        raise ValueError(f"data_path {data_path!r}: name the path inside the repo after '#'")
    repo = url._replace(query="", fragment="").geturl()
    rev = parse_qs(url.query).get("rev", [None])[0]
    out = Path(workdir) / Path(url.fragment).name
    Repo.get(repo, url.fragment, out=str(out), rev=rev)
    return str(out)
