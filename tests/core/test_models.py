"""Model loading: Auto classes for the supported families, frozen vision tower, LoRA, safe saving."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dyme_core.config import ModelConfig
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
