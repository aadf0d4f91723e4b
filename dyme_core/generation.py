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

On a GPU that loop is launch-bound (a decode step of ~1,300 small kernels, each launched from Python, plus a host
sync per token). `complete_static` (issue 11, item 1; `train.cuda_graph_decode`) decodes the same tokens with one
step function free of host syncs, replayed as a CUDA graph:
- the KV cache lives at fixed addresses (`SlotLayer`: (rows, H, capacity, D) buffers, capacity = prompt +
  completion rounded up to CAPACITY_STEP), the step's token is written at a slot given by a device tensor and
  attention reads the whole buffer under a full-length 4-D mask (one graph serves every step);
- rows are rounded up to a bucket (BUCKET_ROWS); padding rows copy the last real row, start finished and are
  dropped;
- logits processing and sampling run on the device: `sample_tokens` is `torch.multinomial`'s own one-draw
  algorithm without its host-side checks (same draws for the same seed); a finished row gets pad on the device;
- "every row finished" is read on the host only every `check_every` tokens; the output is trimmed to the steps a
  row was still live in, so it equals the eager loop's;
- graphs are captured once per (model, bucket, capacity, sampling settings), kept (LRU, MAX_GRAPHS) and replayed;
  `captured_decodes(model)` reports their capture seconds. Optionally (`compile_step`, `train.compile_decode`) the
  step's forward goes through torch.compile before the capture, with sdpa attention that reads each KV head once
  (`grouped_sdpa_attention`: transformers copies the keys and values per query head under torch.compile).
The same `decode_step` runs uncaptured on the CPU, where tests/core/test_decode_graph.py checks it against this
loop and `generate`. Qwen2-VL (multimodal RoPE, no `prefill_once`) keeps HF `generate`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    DynamicCache,
    DynamicLayer,
    LogitsProcessorList,
    PreTrainedModel,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

log = logging.getLogger(__name__)
_UNCAPTURABLE: weakref.WeakSet = weakref.WeakSet()  # models whose decode could not be captured (warned once)


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
    cuda_graph: bool = False,
    compile_step: bool = False,
    **vision_inputs: torch.Tensor,
) -> torch.Tensor:
    """New tokens of k completions per prompt: (B*K, T) sample-major, T <= max_new_tokens, pad after eos.

    input_ids, attention_mask: (B, P) left-padded prompts. inputs_embeds: (B, P, D) prompt embeddings with the
    images merged in (then `vision_inputs` are not needed). text_inputs: extras aligned with input_ids, such
    as Qwen2-VL's `mm_token_type_ids` (B, P); new tokens are text (0), as `generate` extends them.
    vision_inputs: the family's image inputs of the B prompts, used by the prefill only.
    cuda_graph: on a CUDA model, decode with `complete_static(capture=True)` (the step replayed as a CUDA graph);
    ignored on the CPU, where the loop below is the faster one (it attends only over the filled cache).
    compile_step: with cuda_graph, the captured step's forward is compiled first (`complete_static`).
    """
    if cuda_graph and input_ids.device.type == "cuda" and model not in _UNCAPTURABLE:
        if static_decode_supported(model):
            try:
                return complete_static(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, k=k,
                                       do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                       suppress_tokens=suppress_tokens, inputs_embeds=inputs_embeds,
                                       text_inputs=text_inputs, capture=True, compile_step=compile_step,
                                       **vision_inputs)
            except RuntimeError as e:  # a capture that failed (an op that syncs): this model decodes eagerly
                log.warning("decode not captured (%s: %s); this model decodes eagerly from now on",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        else:
            log.warning("decode not captured: %s attention takes no 4-D mask (sdpa or eager do); this model "
                        "decodes eagerly", model.config._attn_implementation)
        _UNCAPTURABLE.add(model)  # warned once per model, not once per batch
    with torch.inference_mode():
        out = _complete(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, k, do_sample,
                        logits_processors(suppress_tokens, do_sample, temperature, top_k, top_p, input_ids.device),
                        inputs_embeds, text_inputs or {}, vision_inputs)
    return out.clone()  # a normal tensor: the update embeds these ids under autograd


def _cache_arg(model: PreTrainedModel) -> str:
    """The forward's cache argument: transformers renamed it (`past_key_values` -> `cache`; the old name is accepted,
    with a warning, until 5.40); the GPU machine's release knows only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model: PreTrainedModel, cache: DynamicCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             inputs_embeds: torch.Tensor | None, text_inputs: dict[str, torch.Tensor],
             vision_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the B prompts into `cache`: (the last position's logits (B, V), the positions (B, P))."""
    prompt = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids,
                                                                                 **vision_inputs}
    # positions as `generate` gives them: counted over each row's real tokens, so left padding shifts nothing
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, P)
    out = model(**prompt, **text_inputs, attention_mask=attention_mask, position_ids=positions,
                **{_cache_arg(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), positions


def _complete(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              eos_token_id: int, pad_token_id: int, k: int, do_sample: bool, processors: LogitsProcessorList,
              inputs_embeds: torch.Tensor | None, text_inputs: dict[str, torch.Tensor],
              vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    n, prompt_len = input_ids.shape
    device = input_ids.device
    # repeated K times after the prefill, then one position written per step (PreallocatedLayer)
    cache = preallocated_cache(model, prompt_len + max_new_tokens)
    cache_arg = _cache_arg(model)
    logits, positions = _prefill(model, cache, input_ids, attention_mask, inputs_embeds, text_inputs, vision_inputs)
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


# ------------------------------------------------------------------------------------ the static, captured decode
# Rows of a captured decode step come in buckets (multiples of BUCKET_ROWS) and its KV cache in multiples of
# CAPACITY_STEP positions, so that one graph serves every batch of a run whose prompt lengths differ by a few tokens.
BUCKET_ROWS = 8
CAPACITY_STEP = 64
MAX_GRAPHS = 8  # captured graphs kept per model (least recently used dropped): each holds its own KV buffers


def bucket_size(rows: int) -> int:
    """Rows of the decode step's bucket: `rows` rounded up to a multiple of BUCKET_ROWS."""
    return -(-rows // BUCKET_ROWS) * BUCKET_ROWS


def cache_capacity(prompt_len: int, max_new_tokens: int) -> int:
    """Positions of the static KV cache: prompt + completion rounded up to a multiple of CAPACITY_STEP."""
    return -(-(prompt_len + max_new_tokens) // CAPACITY_STEP) * CAPACITY_STEP


class SlotLayer(DynamicLayer):
    """A KV-cache layer of fixed address: keys and values (rows, H, capacity, D) allocated once, the decode step's
    token written at slot `write` (a one-element device tensor shared by all layers, advanced by the step), and
    attention handed the whole buffer (the step's mask hides the slots not written yet). No shape or Python value
    changes between steps, so a CUDA graph of the step replays for every token."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.write = keys, values, write
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.write, key_states)  # key_states: (rows, H, 1, D)
        self.values.index_copy_(2, self.write, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class DecodeState:
    """The buffers one decode step reads and writes in place (fixed addresses), for `bucket` rows.

    Per step: sample a token per row from `logits` (pad for finished rows), store it in `out[:, step]`, write its
    KV at slot `write`, unmask that slot, and compute the next `logits` at `position`.
    """

    def __init__(self, model: PreTrainedModel, prefill: DynamicCache, bucket: int, capacity: int,
                 vocab: int, text_keys: Sequence[str], device: torch.device):
        self.bucket, self.capacity = bucket, capacity
        self.write = torch.zeros(1, dtype=torch.long, device=device)  # the KV slot of the step's token
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # its column in `out`
        self.live = torch.zeros((), dtype=torch.long, device=device)  # steps taken while some row was unfinished
        self.position = torch.zeros((bucket, 1), dtype=torch.long, device=device)  # position id of the step's token
        self.mask = torch.zeros((bucket, capacity), dtype=torch.bool, device=device)  # slots attended
        self.unfinished = torch.zeros(bucket, dtype=torch.bool, device=device)
        self.logits = torch.zeros((bucket, vocab), dtype=torch.float32, device=device)  # (bucket, V)
        self.out = torch.zeros((bucket, capacity), dtype=torch.long, device=device)  # sampled tokens
        self.extras = {name: torch.zeros((bucket, 1), dtype=torch.long, device=device) for name in text_keys}
        self.cache = DynamicCache(config=model.config)
        layers = []
        for layer in prefill.layers:
            if type(layer) is not DynamicLayer:
                raise RuntimeError(f"the static decode supports full-attention KV layers only, not {type(layer)}")
            b, h, _, d = layer.keys.shape
            layers.append(SlotLayer(layer.keys.new_zeros((bucket, h, capacity, d)),
                                    layer.values.new_zeros((bucket, h, capacity, layer.values.shape[-1])), self.write))
        self.cache.layers = layers

    def load(self, prefill: DynamicCache, logits: torch.Tensor, attention_mask: torch.Tensor,
             positions: torch.Tensor, rows: int, k: int, pad_token_id: int) -> None:
        """Start a generation: the B prompts' prefill repeated K times (sample-major) into the first `rows` rows;
        the bucket's padding rows copy the last real row (finite values everywhere) and start finished."""
        prompt_len = attention_mask.shape[1]
        src = torch.arange(self.bucket, device=logits.device).clamp(max=rows - 1) // k  # bucket row -> prompt
        for slot, layer in zip(self.cache.layers, prefill.layers, strict=True):
            slot.keys[:, :, :prompt_len].copy_(layer.keys.index_select(0, src))
            slot.values[:, :, :prompt_len].copy_(layer.values.index_select(0, src))
        self.logits.copy_(logits.index_select(0, src))
        self.mask.zero_()
        self.mask[:, :prompt_len] = attention_mask.index_select(0, src).bool()
        self.position.copy_(positions[:, -1:].index_select(0, src))
        self.unfinished.copy_(torch.arange(self.bucket, device=logits.device) < rows)
        self.out.fill_(pad_token_id)
        self.write.fill_(prompt_len)
        self.step.zero_()
        self.live.zero_()


def sample_tokens(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """One token per row: (rows, V) -> (rows,). Sampled: `torch.multinomial(softmax(scores), 1)`'s own algorithm
    for one draw (the arg-max of p / q with q ~ Exp(1), drawn from the default generator over the whole
    (rows, V) tensor), written out because `torch.multinomial` first checks the probabilities on the host (a
    device sync, which a CUDA graph cannot capture). Same seed, same tokens as `torch.multinomial`."""
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def decode_step(model: PreTrainedModel, state: DecodeState, processors: LogitsProcessorList, do_sample: bool,
                eos_token_id: int, pad_token_id: int, cache_arg: str, additive_mask: bool) -> None:
    """One token for every row of `state`, in place, with no host sync: the function a CUDA graph captures (and
    the CPU runs as is). The forward runs on every step, the last included (its logits are not used)."""
    scores = processors(state.out, state.logits)  # none of these processors reads the ids (no repetition penalty)
    tokens = torch.where(state.unfinished, sample_tokens(scores, do_sample), pad_token_id)  # (bucket,)
    state.live.add_(state.unfinished.any().long())
    state.out.index_copy_(1, state.step, tokens[:, None])
    state.step.add_(1)
    state.unfinished.logical_and_(tokens != eos_token_id)
    state.mask.index_fill_(1, state.write, True)
    state.position.add_(1)
    # a 4-D mask goes to attention as is (no mask building, which syncs): sdpa takes booleans, eager adds floats
    mask = state.mask[:, None, None, :]  # (bucket, 1, 1, capacity)
    if additive_mask:
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(model.dtype).min)
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=state.position,
                **{cache_arg: state.cache}, use_cache=True, logits_to_keep=1, **state.extras)
    state.logits.copy_(out.logits[:, -1])
    state.write.add_(1)


GROUPED_SDPA = "dyme_grouped_sdpa"


def grouped_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except for a one-token query of a grouped-query model (fewer KV heads than query
    heads) under a mask shared by the heads: its query heads are grouped per KV head, (rows, H, 1, D) -> (rows, H_kv,
    H / H_kv, D), and attend to the keys and values as they are, so each KV head is read once. transformers' own sdpa
    does the same only outside torch.compile; compiled, it copies the keys and values once per query head
    (`repeat_kv`), which in a decode step is most of the bytes moved. The compiled decode step uses this function
    (`CapturedDecode` with compile_step). Everything else goes to transformers' sdpa unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.shape[2] != 1 or kwargs.get("position_bias") is not None
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(rows, heads // groups, groups, dim), key, value, attn_mask=attention_mask, dropout_p=dropout,
        scale=scaling)  # (rows, H_kv, groups, D_v): query head g*groups + i is row i of group g, as repeat_kv orders
    return out.reshape(rows, heads, 1, out.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


@contextlib.contextmanager
def grouped_attention(model: PreTrainedModel) -> Iterator[None]:
    """While inside, the text decoder's sdpa attention is `grouped_sdpa_attention` (its config's implementation is
    switched, and switched back on the way out); a decoder on another implementation is left as it is."""
    config = model.config.get_text_config()
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class CapturedDecode:
    """`decode_step` over one DecodeState, captured in a CUDA graph (replayed per token) or run as is.

    compile_step: the model's forward inside the step goes through `torch.compile` (fused kernels: fewer and
    larger launches inside the graph) before the capture, with `grouped_sdpa_attention` (no copy of the KV cache
    per query head); sampling stays eager, so its draws are unchanged, but the logits may differ from eager ones
    in the last bits of bf16. A compile that fails falls back to the eager forward with a warning."""

    def __init__(self, model: PreTrainedModel, state: DecodeState, processors: LogitsProcessorList,
                 do_sample: bool, eos_token_id: int, pad_token_id: int, capture: bool, compile_step: bool = False):
        self.state, self.processors = state, processors  # the graph reads their memory: keep them alive
        cache_arg = _cache_arg(model)
        additive = model.config._attn_implementation == "eager"

        def step_with(runner: torch.nn.Module) -> Callable[[], None]:
            def step() -> None:
                # compiled: traced (and run, when not captured) with the grouped attention; eager transformers
                # already groups a one-token query's heads itself
                with grouped_attention(model) if runner is not model else contextlib.nullcontext():
                    decode_step(runner, state, processors, do_sample, eos_token_id, pad_token_id, cache_arg,
                                additive)
            return step

        self._step = step_with(torch.compile(model, dynamic=False) if compile_step else model)
        self.compiled = compile_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s = 0.0
        self.replays = 0
        if capture:
            try:
                self._capture(state.write.device)
            except Exception as e:
                if not compile_step:
                    raise
                log.warning("decode step: torch.compile failed (%s: %s); capturing the eager step",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self._step, self.compiled = step_with(model), False
                self._capture(state.write.device)
            self._step = None  # replays need only the graph: no reference back to the model (weakly cached by it)

    def _capture(self, device: torch.device) -> None:
        """Warm up (lazy allocations, kernel choices) on a side stream, then capture one step. Neither the warm-up's
        draws nor the capture move the caller's random state: the generator is forked around them."""
        t0 = time.perf_counter()
        s = self.state
        s.mask.zero_()
        s.mask[:, 0] = True  # a finite warm-up: every row attends to one slot
        with torch.random.fork_rng(devices=[device]):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    s.step.zero_()
                    s.write.fill_(1)
                    self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            s.step.zero_()
            s.write.fill_(1)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (reward or refiner workers) do not break this capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._step()
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - t0
        log.info("captured the decode step: %d rows, %d cache positions, %.2f s", s.bucket, s.capacity,
                 self.capture_s)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
        else:
            self._step()


# captured decodes per model: (bucket, capacity, sampling settings, autocast) -> CapturedDecode
_GRAPHS: weakref.WeakKeyDictionary[PreTrainedModel, OrderedDict] = weakref.WeakKeyDictionary()


def captured_decodes(model: PreTrainedModel) -> list[dict]:
    """What the captured decodes of `model` cost: rows, cache positions, capture seconds, replays."""
    return [{"bucket": g.state.bucket, "capacity": g.state.capacity, "compiled": g.compiled, "capture_s": g.capture_s,
             "replays": g.replays} for g in _GRAPHS.get(model, {}).values()]


def static_decode_supported(model: PreTrainedModel) -> bool:
    """The static decode hands attention a 4-D mask: sdpa and eager attention take one, flash attention does not."""
    return model.config._attn_implementation in ("sdpa", "eager")


def complete_static(
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
    capture: bool = False,
    compile_step: bool = False,
    bucket: int | None = None,
    capacity: int | None = None,
    check_every: int = 16,
    **vision_inputs: torch.Tensor,
) -> torch.Tensor:
    """`complete` with a static KV cache and the decode step at fixed addresses; same arguments and output.

    capture: replay the step as a CUDA graph (CUDA only), cached per (model, bucket, cache capacity, sampling
    settings) and reused by later calls; False runs the same `decode_step` eagerly (the CPU, tests).
    compile_step: the step's model forward goes through `torch.compile` (before the capture, when captured; a
    compiled step is cached with the graph, an uncaptured one is compiled per call: tests).
    bucket: rows of the step (default `bucket_size(B*K)`); padding rows are computed and dropped.
    capacity: positions of the static KV cache (default `cache_capacity(P, max_new_tokens)`); a larger one lets one
    graph serve several prompt or completion lengths.
    check_every: tokens between two checks of "every row finished" (the only host syncs of the loop).
    Draws: with rows == bucket, the tokens of `complete` / `generate` for the same seed; padding rows draw their
    noise too (the (bucket, V) tensor of `sample_tokens`), so a padded batch draws what `generate` draws for the
    same rows plus the padding rows (on the CPU, where draws are taken in element order), not what an unpadded
    run draws.
    """
    if capture and input_ids.device.type != "cuda":
        raise ValueError(f"a captured decode needs a CUDA model, not {input_ids.device}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, not {check_every}")
    rows = input_ids.shape[0] * k
    bucket = bucket or bucket_size(rows)
    if bucket < rows:
        raise ValueError(f"a bucket of {bucket} rows cannot hold {rows} rows")
    capacity = capacity or cache_capacity(input_ids.shape[1], max_new_tokens)
    if capacity < input_ids.shape[1] + max_new_tokens:
        raise ValueError(f"a KV cache of {capacity} positions cannot hold a prompt of {input_ids.shape[1]} and "
                         f"{max_new_tokens} new tokens")
    if not static_decode_supported(model):
        raise ValueError(f"the static decode needs sdpa or eager attention, not {model.config._attn_implementation}")
    procs = logits_processors(suppress_tokens, do_sample, temperature, top_k, top_p, input_ids.device)
    with torch.inference_mode():
        out = _complete_static(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, k,
                               do_sample, procs, (tuple(suppress_tokens), temperature, top_k, top_p), inputs_embeds,
                               text_inputs or {}, vision_inputs, capture, compile_step, bucket, capacity,
                               check_every)
    return out.clone()


def _complete_static(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, eos_token_id: int, pad_token_id: int, k: int, do_sample: bool,
                     processors: LogitsProcessorList, sampling: tuple, inputs_embeds: torch.Tensor | None,
                     text_inputs: dict[str, torch.Tensor], vision_inputs: dict[str, torch.Tensor], capture: bool,
                     compile_step: bool, bucket: int, capacity: int, check_every: int) -> torch.Tensor:
    n, prompt_len = input_ids.shape
    rows = n * k
    device = input_ids.device
    prefill = DynamicCache(config=model.config)
    logits, positions = _prefill(model, prefill, input_ids, attention_mask, inputs_embeds, text_inputs, vision_inputs)
    key = (bucket, capacity, do_sample, sampling, eos_token_id, pad_token_id, tuple(sorted(text_inputs)),
           torch.is_autocast_enabled(device.type), compile_step)
    graphs = _GRAPHS.setdefault(model, OrderedDict()) if capture else OrderedDict()
    decode = graphs.get(key)
    if decode is None:
        state = DecodeState(model, prefill, bucket, capacity, logits.shape[-1], list(text_inputs), device)
        decode = CapturedDecode(model, state, processors, do_sample, eos_token_id, pad_token_id, capture,
                                compile_step)
        graphs[key] = decode
        while len(graphs) > MAX_GRAPHS:
            graphs.popitem(last=False)
    graphs.move_to_end(key)
    state = decode.state
    state.load(prefill, logits, attention_mask, positions, rows, k, pad_token_id)
    del prefill, logits
    for t in range(1, max_new_tokens + 1):
        decode()
        if t % check_every == 0 and t < max_new_tokens and not bool(state.unfinished.any()):
            break
    return state.out[:rows, : int(state.live)]
