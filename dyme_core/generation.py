"""Sampling K completions per prompt from one prefill: the decode loop of rollouts and evaluation (DESIGN.md
section 7; issue 11, item 5).

`complete(model, ...)` is what `model.generate(num_return_sequences=k, ...)` does with this project's settings,
written out so that each prompt is prefilled once instead of K times:

1. prefill: one forward over the B prompts (the family's image inputs or the merged prompt embeddings),
   keeping only the last position's logits (as `generate` does with `logits_to_keep=1`), with the positions
   `generate` gives (counted over each row's real tokens; 1-D, so families whose positions are multimodal
   RoPE, Qwen2-VL, keep `generate`: `Family.prefill_once`);
2. the KV cache, the last logits and the attention mask are repeated K times, sample-major (rows
   b*K .. b*K+K-1 belong to prompt b), the order `generate` expands its inputs in; the cache's layers are
   preallocated for the whole completion (`PreallocatedLayer`: one position written per step, no copy of the
   whole cache per token);
3. decode: per token, the logits processors `generate` builds for these arguments and in its order
   (suppressed tokens, then temperature, top-k, top-p), then one `softmax` + `torch.multinomial` over
   all rows (the same random draws as `generate`'s) or the arg-max when greedy; a finished row gets the
   pad token; the loop stops when every row has emitted eos or after `max_new_tokens`.

It leaves out `generate`'s per-step work the trainer does not need (generation-config merging, stopping
criteria objects, input re-slicing, kwargs rebuilding) and runs under `torch.inference_mode`. Settings from a
model's own `generation_config.json` (e.g. a repetition penalty in a hub model's file) are not applied: a
rollout is sampled from exactly the distribution the update's log-probs score (temperature only).

For a fixed seed the tokens equal `generate`'s and each step's logits agree up to float rounding: not bit for
bit, since a prefill of B rows runs the BLAS on other matrix shapes than generate's B*K rows and may round a
sum differently in the last bit (about 1e-7 in a logit), so a draw could differ only where it falls within
that distance of a token boundary. tests/core/test_generation.py checks tokens and logits against `generate`
for sampled rollouts and greedy evaluation; BENCHMARKS.md (CPU) has what it saves.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import (
    DynamicCache,
    DynamicLayer,
    LogitsProcessorList,
    PreTrainedModel,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class PreallocatedLayer(DynamicLayer):
    """A layer of the KV cache whose keys and values live in buffers sized for the whole completion.

    `DynamicLayer` appends a token with `torch.cat`, which copies the layer's whole cache at every step: on the
    CPU that copy was half of a decode step of the ~20M-parameter shape (bench/results/cpu-profile). Here a
    token is written in place and the layer hands attention a view of the filled part: the same values and
    shapes as the dynamic cache, so attention computes the same numbers, without attending over empty slots
    as a static cache does.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device = key_states.device
            b, h, _, d = key_states.shape
            self._keys = key_states.new_empty((b, h, self.capacity, d))  # (B, H, capacity, D)
            self._values = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.is_initialized = True
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full ({self.length} + {n})")
        self._keys[:, :, self.length: self.length + n] = key_states
        self._values[:, :, self.length: self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


def preallocated_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """The model's dynamic cache with its full-attention layers preallocated for `capacity` positions."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def logits_processors(suppress_tokens: Sequence[int], do_sample: bool, temperature: float, top_k: int,
                      top_p: float, device: torch.device) -> LogitsProcessorList:
    """The processors `generate` builds for these arguments, in its order."""
    procs = LogitsProcessorList()
    if suppress_tokens:
        procs.append(SuppressTokensLogitsProcessor(list(suppress_tokens), device=device))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    return procs


def complete(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    k: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_tokens: Sequence[int] = (),
    inputs_embeds: torch.Tensor | None = None,
    text_inputs: dict[str, torch.Tensor] | None = None,
    **vision_inputs: torch.Tensor,
) -> torch.Tensor:
    """New tokens of k completions per prompt: (B*K, T) sample-major, T <= max_new_tokens, pad after eos.

    input_ids, attention_mask: (B, P) left-padded prompts. inputs_embeds: (B, P, D) prompt embeddings with the
    images merged in (then `vision_inputs` are not needed). text_inputs: extras aligned with input_ids, such
    as Qwen2-VL's `mm_token_type_ids` (B, P); new tokens are text (0), as `generate` extends them.
    vision_inputs: the family's image inputs of the B prompts, used by the prefill only.
    """
    with torch.inference_mode():
        out = _complete(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, k, do_sample,
                        logits_processors(suppress_tokens, do_sample, temperature, top_k, top_p, input_ids.device),
                        inputs_embeds, text_inputs or {}, vision_inputs)
    return out.clone()  # a normal tensor: the update embeds these ids under autograd


def _complete(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              eos_token_id: int, pad_token_id: int, k: int, do_sample: bool, processors: LogitsProcessorList,
              inputs_embeds: torch.Tensor | None, text_inputs: dict[str, torch.Tensor],
              vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    n, prompt_len = input_ids.shape
    device = input_ids.device
    # repeated K times after the prefill, then one position written per step (PreallocatedLayer)
    cache = preallocated_cache(model, prompt_len + max_new_tokens)
    # transformers renamed the forward's cache argument (`past_key_values` -> `cache`; the old name is accepted,
    # with a warning, until 5.40); the GPU machine's release knows only the old one
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefill = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids,
                                                                                  **vision_inputs}
    # positions as `generate` gives them: counted over each row's real tokens, so left padding shifts nothing
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, P)
    out = model(**prefill, **text_inputs, attention_mask=attention_mask, position_ids=positions,
                **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()  # (B, V)
    del out
    rows = n * k
    if k > 1:
        cache.batch_repeat_interleave(k)
        logits = logits.repeat_interleave(k, dim=0)  # (B*K, V)
        attention_mask = attention_mask.repeat_interleave(k, dim=0)
        positions = positions.repeat_interleave(k, dim=0)
    position = positions[:, -1:]  # (B*K, 1)
    # the mask of the whole completion, the prompt's then ones: step t reads the first prompt_len + t columns
    mask = attention_mask.new_ones((rows, prompt_len + max_new_tokens))
    mask[:, :prompt_len] = attention_mask
    # the whole sequence so far, for processors that read it (none of those above does)
    seqs = torch.empty((rows, prompt_len + max_new_tokens), dtype=input_ids.dtype, device=device)
    seqs[:, :prompt_len] = input_ids.repeat_interleave(k, dim=0) if k > 1 else input_ids
    step_extras = {name: torch.zeros((rows, 1), dtype=t.dtype, device=device) for name, t in text_inputs.items()}
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    pad = torch.tensor(pad_token_id, dtype=input_ids.dtype, device=device)
    new = 0
    while True:
        scores = processors(seqs[:, : prompt_len + new], logits)
        if do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(unfinished, tokens, pad)
        seqs[:, prompt_len + new] = tokens
        new += 1
        unfinished &= tokens != eos_token_id
        if new == max_new_tokens or not bool(unfinished.any()):
            break
        position = position + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask[:, : prompt_len + new], position_ids=position,
                    **{cache_arg: cache}, use_cache=True, logits_to_keep=1, **step_extras)
        logits = out.logits[:, -1].float()
        del out
    return seqs[:, prompt_len: prompt_len + new]
