"""bench/common.py's shapes of other families: built through the project's family builder at the shape's sizes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench import common  # noqa: E402
from dyme_core.config import InitModelConfig  # noqa: E402
from dyme_core.models import init_tiny_model  # noqa: E402

TEXTS = ["What is the Votes value for Navy?", "Navy = 67.", "The answer is 67."]


def test_a_llava_onevision_shape_has_its_sizes(tmp_path: Path) -> None:
    shape = dataclasses.replace(common.SHAPES["tiny-llava-ov"], vocab=8192)
    out = common.build_model(shape, tmp_path / "model", TEXTS)
    config = AutoConfig.from_pretrained(out)
    text = config.get_text_config()
    assert config.model_type == "llava_onevision"
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (128, 2, 4, 2, 256, 8192)
    assert (config.vision_config.hidden_size, config.vision_config.intermediate_size) == (64, 128)


def test_vocab_rows_pads_the_embedding_past_the_tokenizer(tmp_path: Path) -> None:
    """A published vocabulary's size even where the text at hand trains fewer tokens (the head's bytes count)."""
    cfg = InitModelConfig(family="llava_onevision", out_dir=str(tmp_path / "model"), vocab_size=300,
                          hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1,
                          image_size=32, patch_size=8)
    out = init_tiny_model(cfg, TEXTS, vocab_rows=1000)
    assert AutoConfig.from_pretrained(out).get_text_config().vocab_size == 1000
    assert len(AutoTokenizer.from_pretrained(out)) <= 300
