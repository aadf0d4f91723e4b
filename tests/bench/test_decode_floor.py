"""The decode-step bandwidth floor (bench/common.py, BENCHMARKS.md section 1): what it counts as read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench.common import decode_floor  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 500


def tiny_idefics3(vision_layers: int = 1, tied: bool = False) -> torch.nn.Module:
    cfg = Idefics3Config(
        text_config={"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                     "num_key_value_heads": KV_HEADS, "intermediate_size": 128, "vocab_size": VOCAB,
                     "tie_word_embeddings": tied},
        vision_config={"hidden_size": 32, "num_hidden_layers": vision_layers, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        scale_factor=2, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return Idefics3ForConditionalGeneration(cfg).to(torch.bfloat16)


def test_floor_counts_the_text_decoder_head_and_kv_cache_not_the_vision_tower() -> None:
    small, big = tiny_idefics3(vision_layers=1), tiny_idefics3(vision_layers=3)
    a = decode_floor(small, rows=8, prompt_len=20, new_tokens=10, max_cache_len=128, bandwidth=1e12)
    b = decode_floor(big, rows=8, prompt_len=20, new_tokens=10, max_cache_len=128, bandwidth=1e12)
    assert a["weight_bytes"] == b["weight_bytes"]  # the vision tower does not run in a decode step
    # K and V, every layer, KV heads x head dim, bf16, every row
    assert a["kv_bytes_per_position"] == 2 * LAYERS * KV_HEADS * (HIDDEN // HEADS) * 2 * 8
    assert a["mean_cache_len"] == 25
    assert a["floor_ms"] == pytest.approx((a["weight_bytes"] + a["kv_bytes_per_position"] * 25) / 1e12 * 1e3)
    assert a["floor_static_ms"] > a["floor_ms"]  # the whole static cache is longer than the mean length
    # twice the bandwidth halves the floor
    c = decode_floor(small, rows=8, prompt_len=20, new_tokens=10, max_cache_len=128, bandwidth=2e12)
    assert c["floor_ms"] == pytest.approx(a["floor_ms"] / 2)


def test_floor_reads_the_lm_head_once_whether_tied_or_not() -> None:
    untied, tied = tiny_idefics3(tied=False), tiny_idefics3(tied=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    u = decode_floor(untied, rows=4, prompt_len=8, new_tokens=8, max_cache_len=128, bandwidth=1e12)
    t = decode_floor(tied, rows=4, prompt_len=8, new_tokens=8, max_cache_len=128, bandwidth=1e12)
    # the head (VOCAB x HIDDEN, bf16) is read either way; the input embedding only one row per sequence
    assert u["weight_bytes"] == t["weight_bytes"]
    text_bytes = sum(p.numel() * 2 for n, p in untied.named_parameters() if "vision" not in n and "connector" not in n)
    table, rows_read = VOCAB * HIDDEN * 2, 4 * HIDDEN * 2
    assert u["weight_bytes"] == text_bytes - table + rows_read  # of the input table only the rows looked up
