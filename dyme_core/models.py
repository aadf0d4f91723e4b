"""Models: load any image-text-to-text model through the Auto classes, and build the tiny default.

`load_model` / `load_processor` take a hub id or a local directory (SmolVLM/Idefics3, LLaVA-OneVision,
Qwen2-VL families), load safetensors only, and run hub code only when `model.trust_remote_code` is set.
A hub id is asked of the hub first (`dyme_core.hub`): a bad id or no network is one line within seconds.
`init_tiny_model` builds a random model (tests, family trials; DESIGN.md section 4) of one family
(`init_model.family`: SmolVLM/Idefics3 by default, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL; the family
adapters of `families.py` own each family's processor and config) with a byte-level BPE tokenizer
trained on the dataset's text, saved with `save_pretrained` so that the same `load_model` path reloads it.

Prompts are built with the processor's chat template, so the tiny model and a hub model take the
same code path (`build_prompt`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from dyme_core.config import InitModelConfig, ModelConfig
from dyme_core.hub import hub_access

log = logging.getLogger(__name__)

ANSWER_FLAG = "Answer:"
REASON_INSTRUCTION = (
    "Think step by step about the image, then give the final answer on a new line starting with 'Answer:'."
)
DIRECT_INSTRUCTION = "Answer with a single word or number."

# Parameter-name fragments of vision towers across the supported families.
VISION_MODULE_NAMES = ("vision_model", "vision_tower", "visual")


# Attention kernels on GPU. cuDNN's (first in PyTorch's order on Hopper) builds an execution plan for
# every new shape, about 1.5-2 ms of host time a call on an H200 and two calls per layer per forward and
# backward; training and evaluation batches change shape all the time (prompt lengths, kept rows).
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(backends: list[SDPBackend] | None) -> contextlib.AbstractContextManager:
    """`torch.nn.attention.sdpa_kernel(backends)`, or nothing when `backends` is None (CPU)."""
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _local_files_only(name_or_path: str) -> bool:
    """False for a local folder or a hub id the hub has (download as usual), True for one to read from the
    local cache; a bad id, or an unreachable hub without a cached copy, is a one-line HubError within seconds."""
    return not Path(name_or_path).is_dir() and hub_access(name_or_path, "model.name_or_path")


def load_processor(cfg: ModelConfig) -> ProcessorMixin:
    import dyme_core.families  # noqa: F401 (registers the image-text processors of the tiny models)

    processor = AutoProcessor.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                              local_files_only=_local_files_only(cfg.name_or_path))
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return processor


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> PreTrainedModel:
    """Load weights (safetensors only), freeze the vision tower and wrap LoRA as configured."""
    device = torch.device(device)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.name_or_path,
        dtype=resolve_dtype(cfg.dtype, device),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        attn_implementation=cfg.attn_implementation,
        local_files_only=_local_files_only(cfg.name_or_path),
    ).to(device)
    if cfg.freeze_vision:
        for name, param in model.named_parameters():
            if any(part in name for part in VISION_MODULE_NAMES):
                param.requires_grad_(False)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = "|".join(cfg.lora_target_modules)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            # language model only: the same projection names exist in the vision tower
            target_modules=rf"^(?!.*({'|'.join(VISION_MODULE_NAMES)})).*\.({targets})$",
        )
        model = get_peft_model(model, lora)
    return model


def save_model(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | Path) -> Path:
    """Save a plain HF directory (LoRA merged) with its processor: what evaluate and register load."""
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model.merge_and_unload() if isinstance(model, PeftModel) else model
    to_save.save_pretrained(out, safe_serialization=True)
    # from_pretrained records the hub's offline switch (HF_HUB_OFFLINE) among the tokenizer's init kwargs:
    # how this process found the files, not part of the model, and it would make the saved bytes depend on
    # the environment (docs/DESIGN.md, "Reproducible outputs")
    processor.tokenizer.init_kwargs.pop("local_files_only", None)
    processor.save_pretrained(out)
    return out


def suppressed_token_ids(model: PreTrainedModel, processor: ProcessorMixin) -> list[int]:
    """Special tokens a completion must never contain (image placeholders and the like): all but eos.

    A weak policy samples them, and an image token inside a completion would break the next forward.
    """
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    keep = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    return sorted(set(tok.all_special_ids) - keep)


def user_text(question: str, style: str) -> str:
    return f"{question}\n{REASON_INSTRUCTION if style == 'reason' else DIRECT_INSTRUCTION}"


def build_prompt(processor: ProcessorMixin, question: str, style: str = "reason") -> str:
    """The chat-formatted prompt (with the image placeholder) that generation continues."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(question, style)}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def train_tokenizer(texts: list[str], vocab_size: int, family: str = "idefics3") -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the dataset's own text, with the family's special tokens."""
    from dyme_core.families import get_family

    fam = get_family(family)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", *fam.special_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token=fam.eos_token,
        additional_special_tokens=fam.special_tokens,
        padding_side="left",
    )


def init_tiny_model(cfg: InitModelConfig, texts: list[str], device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, vocab_rows: int = 0) -> Path:
    """Build, save and return the directory of a random model of family `cfg.family` (tiny by default; the
    benchmarks build published shapes with it, initialised on `device` and saved in `dtype`). vocab_rows: rows of
    the embedding and head when more than the trained tokenizer has (a published vocabulary's size)."""
    from dyme_core.families import get_family

    family = get_family(cfg.family)
    torch.manual_seed(cfg.seed)
    prompt_texts = [REASON_INSTRUCTION, DIRECT_INSTRUCTION, ANSWER_FLAG, "User:", "Assistant:", "user", "assistant"]
    tokenizer = train_tokenizer(sorted(set(texts)) + prompt_texts, cfg.vocab_size, family.name)
    with torch.device(device):
        processor, model = family.build_tiny(cfg, tokenizer)
        if vocab_rows > len(tokenizer):
            model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = save_model(model, processor, cfg.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("saved tiny %s model (%s, %.2fM params, vocab %d) to %s", family.name, type(model).__name__,
             n_params / 1e6, len(tokenizer), out)
    return out
