"""Model families: one adapter per image-text-to-text family, the trainer's model seam (DESIGN.md section 4).

The trainer, `evaluate.generate_answers` and the registered pyfunc never branch on the model class; they ask
the adapter of the loaded model (`family_of(model.config)`, keyed by `config.model_type`) to

- encode prompts with the processor's chat template (`encode`) and keep, per prompt, the token ids and the
  text-aligned processor outputs the model needs besides `input_ids` (Qwen2-VL's `mm_token_type_ids`, which
  its multimodal RoPE reads; passed on whenever the processor returns it);
- keep the processor's image outputs (`PromptBatch.vision`) and hand the model the ones of a list of prompt
  rows (`vision_inputs`), repeated when a prompt owns several update rows:
  Idefics3 (SmolVLM): `pixel_values` (B, N, C, H, W) + `pixel_attention_mask`, indexed by prompt;
  LLaVA-OneVision: `pixel_values` (B, tiles, C, H, W) + `image_sizes` (B, 2) (+ `batch_num_images`), by prompt;
  Qwen2-VL / Qwen2.5-VL: flattened patches `pixel_values` (sum of patches, D) sliced per image by
  `image_grid_thw` (n_img, 3).
  rollouts need them once per prompt: `generation.complete` prefills each prompt once and repeats its KV cache
  K times (families with `prefill_once`); HF `generate(num_return_sequences=K)` (Qwen2-VL, whose multimodal RoPE
  positions come from its own generate hooks) expands them K times itself;
- run the frozen vision tower once per batch image (`merged_embeds`). Only Idefics3 has this cache: its
  image features are plain per-image tensors scattered into the image tokens. LLaVA-OneVision (anyres tiles
  with unpadding and newline tokens) and Qwen2-VL (windowed patches, multimodal RoPE from the grid) pass
  pixels on each forward: their vision tower runs once per row (a cache there would re-implement the
  models' feature merging, which changes between transformers releases).
- build the tiny random model of `dyme init-model` (`build_tiny`): a local BPE tokenizer with the family's
  special tokens and chat template, the family's PIL image processor and a processor without a video
  processor (torchvision, which every video processor imports, does not run beside the CPU torch here);
  `AutoProcessor` and `AutoModelForImageTextToText` reload the saved directory once this module is imported
  (`dyme_core.models.load_processor` imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from dyme_core.config import InitModelConfig


# ---------------------------------------------------------------- processors without a video processor
class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):  # noqa: N801 (the transformers class name)
    """Qwen2.5-VL's processor for images and text only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor for images and text only (its init arguments are saved and reloaded)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


class _ImageTextProcessors(PretrainedConfig):
    """Registration key only: AutoProcessor finds a registered processor class by the name saved with it."""

    model_type = "dyme_image_text_processors"


for _cls in (Qwen2VLImageTextProcessor, Qwen2_5_VLImageTextProcessor, LlavaOnevisionImageTextProcessor):
    AutoProcessor.register(type(f"_{_cls.__name__}Key", (_ImageTextProcessors,), {}), _cls, exist_ok=True)


# ---------------------------------------------------------------- chat templates of the tiny models
def _template(role_open: str, role_close: str, image: str, assistant: str) -> str:
    return (
        "{%- for message in messages -%}" + role_open +
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}" + image + "{%- else -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}" + role_close +
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + assistant + "{%- endif -%}"
    )


# SmolVLM style: "User:<image>question<end_of_utterance>\nAssistant:"
SMOLVLM_TEMPLATE = _template("{{ message['role'] | capitalize }}:", "<end_of_utterance>\n", "<image>", "Assistant:")
# ChatML (Qwen2 / LLaVA-OneVision's Qwen2 language model): "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n"
# (newlines as expressions: the whitespace control of the tags would strip literal ones)
_NL = "{{ '\\n' }}"
QWEN_VL_TEMPLATE = _template("<|im_start|>{{ message['role'] }}" + _NL, "<|im_end|>" + _NL,
                             "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant" + _NL)
LLAVA_OV_TEMPLATE = _template("<|im_start|>{{ message['role'] }}" + _NL, "<|im_end|>" + _NL, "<image>",
                              "<|im_start|>assistant" + _NL)


@dataclass
class PromptBatch:
    """Prompts of one batch as the model family needs them (no padding kept)."""

    prompt_ids: list[torch.Tensor]  # per prompt (P_i,)
    text_extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per prompt (P_i,)
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # the processor's image outputs, whole batch


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of half the head dimension (Qwen2-VL-7B: 128 -> [16, 24, 24])."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


class Family:
    """What one model family needs; subclasses override only where their processor or model differs."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    image_keys: ClassVar[tuple[str, ...]]  # processor outputs that belong to the images
    text_keys: ClassVar[tuple[str, ...]] = ()  # processor outputs aligned with input_ids (besides the mask)
    special_tokens: ClassVar[list[str]]  # of the tiny model's tokenizer, after pad and bos
    eos_token: ClassVar[str]
    chat_template: ClassVar[str]
    # `generation.complete` (one prefill per prompt, 1-D positions) samples for this family; False: HF `generate`
    prefill_once: ClassVar[bool] = True

    # ------------------------------------------------------------ prompts
    def prompt(self, processor: ProcessorMixin, question: str, style: str) -> str:
        from dyme_core.models import build_prompt

        return build_prompt(processor, question, style)

    def encode(self, processor: ProcessorMixin, questions: Sequence[str], images: Sequence[Image.Image],
               style: str) -> PromptBatch:
        """One image per prompt: the processor's outputs split into per-prompt ids and batch image tensors."""
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images: one image per question")
        prompts = [self.prompt(processor, q, style) for q in questions]
        enc = processor(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True)
        mask = enc["attention_mask"].bool()
        n = len(prompts)
        return PromptBatch(
            prompt_ids=[enc["input_ids"][i][mask[i]] for i in range(n)],
            text_extras={k: [enc[k][i][mask[i]] for i in range(n)] for k in self.text_keys if k in enc},
            vision={k: enc[k] for k in self.image_keys if k in enc},
        )

    # ------------------------------------------------------------ model inputs
    def vision_inputs(self, batch: PromptBatch, prompts: Sequence[int], device: torch.device,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Image inputs of the rows whose prompts are `prompts` (a prompt may repeat): index by prompt."""
        idx = torch.tensor(list(prompts), dtype=torch.long)
        out = {k: v[idx].to(device) for k, v in batch.vision.items()}
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    def text_inputs(self, batch: PromptBatch, prompts: Sequence[int], completion_lengths: Sequence[int],
                    width: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Text-aligned extras of rows (prompt + completion), left-padded to `width` like the ids.

        Completion tokens are text: 0, as the processor marks text tokens.
        """
        out = {}
        for key, per_prompt in batch.text_extras.items():
            t = torch.zeros((len(prompts), width), dtype=per_prompt[0].dtype)
            for i, (p, n_new) in enumerate(zip(prompts, completion_lengths, strict=True)):
                row = per_prompt[p]
                t[i, width - n_new - len(row): width - n_new] = row
            out[key] = t.to(device)
        return out

    def merged_embeds(self, model: PreTrainedModel, base: PreTrainedModel, batch: PromptBatch,
                      prompts: Sequence[int], ids: torch.Tensor, cache: dict, device: torch.device
                      ) -> torch.Tensor | None:
        """Input embeddings with image features merged in, from a cached frozen-encoder output; None when
        this family has no such cache (the caller passes `vision_inputs`)."""
        return None

    # ------------------------------------------------------------ the tiny random model
    def build_tiny(self, cfg: InitModelConfig, tokenizer: PreTrainedTokenizerFast
                   ) -> tuple[ProcessorMixin, PreTrainedModel]:
        raise NotImplementedError

    def _text_config(self, cfg: InitModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        return {
            "vocab_size": len(tokenizer), "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size or cfg.hidden_size * 2,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False,
        }

    def _vision_heads(self, cfg: InitModelConfig) -> int:
        return max(1, cfg.vision_hidden_size // 32)

    def _vision_mlp(self, cfg: InitModelConfig) -> int:
        return cfg.vision_intermediate_size or cfg.vision_hidden_size * 2


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    image_keys = ("pixel_values", "pixel_attention_mask")
    special_tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
    ]
    eos_token = "<end_of_utterance>"
    chat_template = SMOLVLM_TEMPLATE

    def merged_embeds(self, model, base, batch, prompts, ids, cache, device):
        """Idefics3 with a frozen vision encoder: the encoder runs once per batch image, without grad, and is
        cached; the trainable connector runs with grad on every call. Same computation as
        Idefics3Model.get_image_features + inputs_merger (all-zero padding images are dropped), built from
        `inputs_embeds`, which every transformers 5.x release accepts."""
        inner = base.model
        vision = inner.vision_model
        if any(p.requires_grad for p in vision.parameters()):
            return None  # a trained encoder needs its gradient per row
        pixel_values, pixel_mask = batch.vision["pixel_values"], batch.vision.get("pixel_attention_mask")
        # train mode differs from eval only through dropout: one forward serves generation and update
        # unless the vision tower has active dropout
        stochastic = vision.training and (getattr(vision.config, "attention_dropout", 0.0) > 0 or any(
            isinstance(mod, torch.nn.Dropout) and mod.p > 0 for mod in vision.modules()))
        key = (id(vision), stochastic)
        if key not in cache:
            b, n = pixel_values.shape[:2]
            pixels = pixel_values.to(device, inner.dtype).flatten(0, 1)  # (B*N, C, H, W)
            real = (pixels == 0.0).sum(dim=(-1, -2, -3)) != pixels.shape[1:].numel()  # (B*N,)
            counts = real.view(b, n).sum(dim=1).cpu()  # real images per prompt
            pixels = pixels[real].contiguous()
            if pixel_mask is None:
                pmask = torch.ones((pixels.shape[0], *pixels.shape[2:]), dtype=torch.bool, device=device)
            else:
                pmask = pixel_mask.to(device).flatten(0, 1)[real].contiguous()
            ps = base.config.vision_config.patch_size
            patch_mask = pmask.unfold(1, ps, ps).unfold(2, ps, ps).sum(dim=(-1, -2)) > 0  # (n_img, H/ps, W/ps)
            with torch.no_grad():
                states = vision(pixel_values=pixels, patch_attention_mask=patch_mask)[0]
            cache[key] = (states, counts)  # states: (n_img, patches, D_vision)
        states, counts = cache[key]
        starts = (counts.cumsum(0) - counts).tolist()
        sel = [i for p in prompts for i in range(starts[p], starts[p] + int(counts[p]))]  # row-major images
        feats = inner.connector(states[torch.tensor(sel, device=device)])  # (n_sel, S, D), per image
        embeds = model.get_input_embeddings()(ids)  # (N, L, D)
        image_mask = (ids == base.config.image_token_id).unsqueeze(-1)
        if int(image_mask.sum()) * embeds.shape[-1] != feats.numel():
            raise ValueError(f"image tokens ({int(image_mask.sum())}) do not match image features {tuple(feats.shape)}")
        return embeds.masked_scatter(image_mask, feats.to(inner.dtype).to(embeds.dtype))

    def build_tiny(self, cfg, tokenizer):
        from transformers import Idefics3ForConditionalGeneration

        image_processor = Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": cfg.image_size},
            max_image_size={"longest_edge": cfg.image_size},
        )
        image_seq_len = (cfg.image_size // cfg.patch_size) ** 2 // cfg.scale_factor**2
        processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len,
                                      chat_template=self.chat_template)
        text = LlamaConfig(**{**self._text_config(cfg, tokenizer), "tie_word_embeddings": False})
        vision = {
            "hidden_size": cfg.vision_hidden_size, "intermediate_size": self._vision_mlp(cfg),
            "num_hidden_layers": cfg.vision_layers, "num_attention_heads": self._vision_heads(cfg),
            "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        }
        config = Idefics3Config(text_config=text.to_dict(), vision_config=vision, scale_factor=cfg.scale_factor,
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                pad_token_id=tokenizer.pad_token_id)
        return processor, Idefics3ForConditionalGeneration(config)


class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    image_keys = ("pixel_values", "image_sizes", "batch_num_images")
    special_tokens = ["<|im_end|>", "<image>", "<video>"]
    eos_token = "<|im_end|>"
    chat_template = LLAVA_OV_TEMPLATE

    def build_tiny(self, cfg, tokenizer):
        from transformers import LlavaOnevisionForConditionalGeneration

        s = cfg.image_size
        # anyres with a small grid: a square image takes one tile (+ the base image), a wide or tall one two
        pinpoints = [[s, s], [s, 2 * s], [2 * s, s]]
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                                          image_grid_pinpoints=pinpoints)
        processor = LlavaOnevisionImageTextProcessor(
            image_processor, tokenizer, num_image_tokens=(s // cfg.patch_size) ** 2,
            vision_feature_select_strategy="full", chat_template=self.chat_template)
        text = {**self._text_config(cfg, tokenizer), "model_type": "qwen2"}
        vision = {
            "model_type": "siglip_vision_model", "hidden_size": cfg.vision_hidden_size,
            "intermediate_size": self._vision_mlp(cfg), "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": self._vision_heads(cfg), "image_size": s, "patch_size": cfg.patch_size,
        }
        config = LlavaOnevisionConfig(
            text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
            vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False)
        return processor, LlavaOnevisionForConditionalGeneration(config)


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    image_keys = ("pixel_values", "image_grid_thw")
    text_keys = ("mm_token_type_ids",)
    # multimodal RoPE: the 3-D positions of every step come from the model's own generate hooks
    prefill_once = False
    special_tokens = ["<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    eos_token = "<|im_end|>"
    chat_template = QWEN_VL_TEMPLATE

    def vision_inputs(self, batch, prompts, device, dtype):
        """Flattened patches: image i owns rows [start_i, start_i + t*h*w) of pixel_values."""
        thw = batch.vision["image_grid_thw"]  # (n_img, 3), one image per prompt
        sizes = thw.prod(dim=1)
        starts = (sizes.cumsum(0) - sizes).tolist()
        rows = torch.cat([torch.arange(starts[p], starts[p] + int(sizes[p])) for p in prompts])
        return {"pixel_values": batch.vision["pixel_values"][rows].to(device, dtype),
                "image_grid_thw": thw[torch.tensor(list(prompts))].to(device)}

    def _processor(self, cfg: InitModelConfig, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        factor = cfg.patch_size * cfg.scale_factor
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=cfg.patch_size, merge_size=cfg.scale_factor, temporal_patch_size=2,
            size={"shortest_edge": factor * factor, "longest_edge": cfg.image_size * cfg.image_size})
        return Qwen2VLImageTextProcessor(image_processor, tokenizer, chat_template=self.chat_template)

    def _config_kwargs(self, cfg: InitModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        text = {**self._text_config(cfg, tokenizer), "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": mrope_section(cfg.hidden_size // cfg.num_heads)}}
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        return {"text_config": text, "tie_word_embeddings": False, **ids}

    def build_tiny(self, cfg, tokenizer):
        from transformers import Qwen2VLForConditionalGeneration

        ratio, rest = divmod(self._vision_mlp(cfg), cfg.vision_hidden_size)
        if rest:  # Qwen2-VL's vision config takes an integer MLP ratio
            raise ValueError(f"qwen2_vl: init_model.vision_intermediate_size={cfg.vision_intermediate_size} must be "
                             f"a multiple of init_model.vision_hidden_size={cfg.vision_hidden_size}")
        vision = {"depth": cfg.vision_layers, "embed_dim": cfg.vision_hidden_size, "hidden_size": cfg.hidden_size,
                  "num_heads": self._vision_heads(cfg), "mlp_ratio": ratio, "patch_size": cfg.patch_size,
                  "spatial_merge_size": cfg.scale_factor, "temporal_patch_size": 2}
        config = Qwen2VLConfig(vision_config=vision, **self._config_kwargs(cfg, tokenizer))
        return self._processor(cfg, tokenizer), Qwen2VLForConditionalGeneration(config)


class Qwen2_5_VLFamily(Qwen2VLFamily):  # noqa: N801 (mirrors the transformers class name)
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _processor(self, cfg, tokenizer):
        qwen2 = super()._processor(cfg, tokenizer)
        return Qwen2_5_VLImageTextProcessor(qwen2.image_processor, tokenizer, chat_template=self.chat_template)

    def build_tiny(self, cfg, tokenizer):
        from transformers import Qwen2_5_VLForConditionalGeneration

        vision = {"depth": cfg.vision_layers, "hidden_size": cfg.vision_hidden_size,
                  "intermediate_size": self._vision_mlp(cfg), "out_hidden_size": cfg.hidden_size,
                  "num_heads": self._vision_heads(cfg), "patch_size": cfg.patch_size,
                  "spatial_merge_size": cfg.scale_factor, "temporal_patch_size": 2,
                  # windows of 2x2 merged patches; the last block attends over the whole image
                  "window_size": cfg.patch_size * cfg.scale_factor * 2,
                  "fullatt_block_indexes": [cfg.vision_layers - 1]}
        config = Qwen2_5_VLConfig(vision_config=vision, **self._config_kwargs(cfg, tokenizer))
        return self._processor(cfg, tokenizer), Qwen2_5_VLForConditionalGeneration(config)


FAMILIES: dict[str, Family] = {f.name: f for f in (Idefics3Family(), LlavaOnevisionFamily(), Qwen2VLFamily(),
                                                      Qwen2_5_VLFamily())}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_of(config: PretrainedConfig) -> Family:
    """The adapter of a model's config (`config.model_type`); a clear error for any other family."""
    family = _BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise ValueError(f"model type {config.model_type!r} is not supported; supported model types: "
                         f"{', '.join(sorted(_BY_MODEL_TYPE))}")
    return family


def get_family(name: str) -> Family:
    """The adapter named `name` (init_model.family)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
