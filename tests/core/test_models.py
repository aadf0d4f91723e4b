"""Model loading: Auto classes for the supported families, frozen vision tower, LoRA, safe saving, and a hub id
that cannot be had (bad id, hub unreachable, offline) failing at once in one line that names it."""

import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dyme_core.config import ModelConfig
from dyme_core.hub import HubError
from dyme_core.models import VISION_MODULE_NAMES, load_model, load_processor, save_model


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_tiny_model_reloads_with_processor(tiny_setup: dict) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_setup["model"]))
    model, processor = load_model(cfg), load_processor(cfg)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    trainable = _trainable(model)
    assert trainable and not any(v in n for n in trainable for v in VISION_MODULE_NAMES)


def test_lora_trains_adapters_of_the_language_model_only(tiny_setup: dict, tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_setup["model"]), lora_r=4)
    model = load_model(cfg)
    trainable = _trainable(model)
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(v in n for n in trainable for v in VISION_MODULE_NAMES)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # make the adapters non-zero so merging changes the weights
    out = save_model(model, load_processor(cfg), tmp_path / "merged")
    merged = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in merged)  # a plain HF directory: evaluate/register load it as is
    base = load_file(Path(tiny_setup["model"]) / "model.safetensors")
    assert any(not torch.equal(base[k], merged[k]) for k in base if "q_proj" in k and "text_model" in k)


def test_qwen2_vl_family_through_auto_classes(tmp_path: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    model = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    trainable = _trainable(model)
    assert trainable and not any("visual" in n for n in trainable)


def test_remote_code_is_refused_unless_configured(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"model_type": "custom", "auto_map": {"AutoConfig": "configuration.CustomConfig", '
        '"AutoModelForImageTextToText": "modeling.Custom"}}'
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_unknown_families_are_refused_with_the_supported_ones_named() -> None:
    from transformers import BertConfig

    from dyme_core.config import ConfigError, load_config
    from dyme_core.families import family_of, get_family

    with pytest.raises(ValueError, match="qwen2_vl"):
        get_family("llava")
    with pytest.raises(ValueError, match="'bert' is not supported"):
        family_of(BertConfig())
    with pytest.raises(ConfigError, match="init_model.family"):
        load_config(None, ["init_model.family=llava"])


# --- a hub id that cannot be had fails within seconds, in one line naming the id (dyme_core.hub) ---


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: a connection is refused at once, as on a machine offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoSuchRepo(BaseHTTPRequestHandler):
    """The hub's answer to a repository it does not have (or a private one, unauthenticated)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_hub_id_with_the_hub_unreachable_is_one_error_naming_the_id(closed_port: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    for load in (load_model, load_processor):
        with pytest.raises(HubError) as raised:
            load(ModelConfig(name_or_path="dyme-test/no-such-model"))
        assert str(raised.value).startswith("model.name_or_path 'dyme-test/no-such-model': not a local folder and "
                                            "the Hugging Face hub is unreachable (offline?")


def test_a_hub_id_the_hub_does_not_have_is_named_as_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(HubError, match=r"^model.name_or_path 'dyme-test/no-such-model': not a local folder and "
                                           r"not found on the hub"):
            load_model(ModelConfig(name_or_path="dyme-test/no-such-model"))
    finally:
        server.shutdown()


def test_offline_mode_reads_only_the_cache(monkeypatch: pytest.MonkeyPatch, closed_port: int) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(HubError, match=r"'dyme-test/no-such-model': not a local folder and not in the local "
                                       r"Hugging Face cache \(HF_HUB_OFFLINE is set\)"):
        load_processor(ModelConfig(name_or_path="dyme-test/no-such-model"))
    with pytest.raises(HubError, match=r"'no/such/model': neither a local folder nor a valid hub id"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        load_model(ModelConfig(name_or_path="no/such/model"))


def test_a_cached_model_loads_while_the_hub_is_unreachable(tiny_setup: dict, tmp_path: Path,
                                                           closed_port: int) -> None:
    # the hub cache's layout: models--<owner>--<name>/refs/main names the snapshot holding the files
    repo = tmp_path / "hub" / "models--dyme-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_setup["model"], repo / "snapshots" / ("0" * 40))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}
    env.pop("HF_HUB_OFFLINE", None)
    code = ("from dyme_core.config import ModelConfig; from dyme_core.models import load_model, load_processor; "
            "cfg = ModelConfig(name_or_path='dyme-test/tiny'); load_processor(cfg); "
            "print(type(load_model(cfg)).__name__)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "Idefics3ForConditionalGeneration"
    assert "hub (http://127.0.0.1" in done.stderr and "loading the copy in the local cache" in done.stderr
