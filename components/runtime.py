"""What every component does before calling its step: build the one Config, and the LLM client.

Imported inside the component bodies, so it runs in the project image (where this package is
installed) or, under `kfp.local`, in the current environment. Like the CLI, this is an entry point:
it may read the environment (the LLM API key); `dyme_core` never does.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dyme_core.config import Config, LLMConfig, load_config
from dyme_core.llm import ChatClient


def step_config(params: str, overrides: list[str], paths: dict[str, str]) -> Config:
    """params.yaml text -> user overrides -> artifact paths (last, so they win), validated once.

    Path values are written as JSON strings so that no path is read back as another YAML type.
    """
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(params)
        pinned = [f"{key}={json.dumps(str(value))}" for key, value in paths.items()]
        return load_config(params_file, [*overrides, *pinned])


def llm_client(cfg: LLMConfig, needed: bool) -> ChatClient | None:
    """The refiner/judge client when the config uses one; the key comes from `cfg.api_key_env`."""
    return ChatClient(cfg, api_key=os.environ.get(cfg.api_key_env)) if needed else None
