"""A lean greedy decoder for Whisper: static key/value buffers and one short loop per token.

transformers' `generate()` spends most of a small model's decoding step outside the matmuls:
its dynamic cache concatenates every layer's keys and values at every step, it rebuilds causal
masks, dispatches a logits-processor list and a stopping-criteria list, and returns model-output
objects. For Whisper tiny that overhead is larger than the decoder's arithmetic. This loop runs the
same modules of the same model (every linear, LayerNorm, embedding and the output projection are
called as they are, so QuantLinear layers and low-bit heads work unchanged) with:

- self-attention keys/values written in place into buffers allocated once per batch, of shape
  (batch, heads, prompt + max_new_tokens, head_dim), read through a view of the filled prefix;
- cross-attention keys/values computed once from the encoder output;
- the suppression masks of Whisper's generate() (suppress_tokens at every step, begin_suppress_tokens
  at the first generated position) built once;
- finished rows dropped from the batch (their caches are compacted), so a batch costs what its
  unfinished rows cost.

It reproduces what `WhisperForConditionalGeneration.generate()` does for short-form greedy
decoding without timestamps: the decoder prompt (start token, language and task tokens when the
model is multilingual, <|notimestamps|>), language detection when a multilingual model is given no
language, max_new_tokens capped at max_target_positions, and stopping at the EOS token. The
result is token-identical to generate() (tested on random and real checkpoints); generation
settings it does not implement (beam search, repetition penalties, ...) are reported by
`unsupported_generation_settings` so that callers can use generate() instead.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["WhisperGreedyDecoder", "whisper_prompt", "unsupported_generation_settings", "is_whisper"]


def is_whisper(model: Any) -> bool:
    """True for a transformers WhisperForConditionalGeneration (the models this decoder runs)."""
    return getattr(getattr(model, "config", None), "model_type", "") == "whisper" and hasattr(model, "proj_out")


# Generation-config fields that change greedy decoding and that this loop does not implement,
# with the value that means "off" (None always means off).
_NEUTRAL_SETTINGS = {"num_beams": 1, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                     "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                     "min_new_tokens": 0, "forced_eos_token_id": None, "sequence_bias": None,
                     "exponential_decay_length_penalty": None, "return_timestamps": False,
                     "num_return_sequences": 1}


def unsupported_generation_settings(generation_config: Any) -> list[str]:
    """The generation_config fields ("name=value") set to something the lean loop does not reproduce."""
    out = []
    for name, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != neutral:
            out.append(f"{name}={value!r}")
    return out


def whisper_prompt(generation_config: Any, language: str | None = None, task: str | None = None) -> list[int] | None:
    """The decoder prompt Whisper's generate() builds for short-form decoding without timestamps.

    [decoder_start_token_id] + (language token, task token when the model is multilingual and they
    are known) + [no_timestamps_token_id]. language: "en", "english" or "<|en|>"; task:
    "transcribe" or "translate". Returns None when a multilingual model (generation_config has
    lang_to_id) gets no language from the arguments, generation_config.language or
    forced_decoder_ids: generate() detects it per utterance then (WhisperGreedyDecoder.prompts).
    """
    gen = generation_config
    language = language if language is not None else getattr(gen, "language", None)
    task = task if task is not None else getattr(gen, "task", None)
    if (language is not None or task is not None) and getattr(gen, "is_multilingual", None) is False:
        raise ValueError("language and task cannot be set for an English-only model")
    tokens = [gen.decoder_start_token_id]
    if language is None and task is None:
        # Legacy forced ids at positions 1, 2, ... extend the prompt (a None language: detect).
        for i, (position, token) in enumerate(getattr(gen, "forced_decoder_ids", None) or [], start=1):
            if position != i:
                raise ValueError(f"forced_decoder_ids {gen.forced_decoder_ids} do not follow Whisper's prompt pattern")
            tokens.append(token)
    if language is not None:
        lang_id = _language_id(gen, language)
        if len(tokens) > 1:
            tokens[1] = lang_id
        else:
            tokens.append(lang_id)
    elif hasattr(gen, "lang_to_id") and (len(tokens) <= 1 or tokens[1] is None):
        return None
    task_ids = getattr(gen, "task_to_id", None) or {}
    if task is not None:
        if task not in task_ids:
            raise ValueError(f"task must be one of {sorted(task_ids)}, got {task!r}")
        tokens = [t for t in tokens if t not in task_ids.values()] + [task_ids[task]]
    elif language is not None and task_ids and not any(t in task_ids.values() for t in tokens):
        tokens.append(task_ids["transcribe"])
    no_timestamps = getattr(gen, "no_timestamps_token_id", None)
    if no_timestamps is not None and tokens[-1] != no_timestamps:
        tokens.append(no_timestamps)
    return [t for t in tokens if t is not None]


def _language_id(gen: Any, language: str) -> int:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    key = language.lower()
    if key in gen.lang_to_id:
        token = key
    elif key in TO_LANGUAGE_CODE:
        token = f"<|{TO_LANGUAGE_CODE[key]}|>"
    else:
        token = f"<|{key}|>"
    if token not in gen.lang_to_id:
        raise ValueError(f"language {language!r} is not one of this model's languages (generation_config.lang_to_id)")
    return gen.lang_to_id[token]


class WhisperGreedyDecoder:
    """Greedy decoding of a WhisperForConditionalGeneration with a static key/value cache.

    model: any Whisper model whose modules compute in one floating dtype (float32 or bfloat16
    activations); its linears may be nn.Linear, QuantLinear or other modules with the same call.
    """

    def __init__(self, model: Any):
        if not is_whisper(model):
            raise ValueError(f"WhisperGreedyDecoder needs a Whisper model, got {type(model).__name__}")
        self.model = model
        decoder = model.model.decoder
        self.decoder = decoder
        self.layers = list(decoder.layers)
        first = self.layers[0].self_attn
        self.heads, self.head_dim = first.num_heads, first.head_dim
        self.scaling = first.scaling
        self.max_positions = model.config.max_target_positions
        gen = model.generation_config
        self.eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id)[0]
        self.vocab = model.config.vocab_size
        # Read now: eval.decode's generate() setup clears them on the config while it runs.
        self.suppress_tokens = list(gen.suppress_tokens or [])
        self.begin_suppress_tokens = list(gen.begin_suppress_tokens or [])
        self._masks: dict[tuple, torch.Tensor] = {}

    # ---- masks -------------------------------------------------------------------------------

    def _mask(self, ids: Sequence[int] | None, width: int, device) -> torch.Tensor | None:
        if not ids:
            return None
        key = (tuple(ids), width, str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(width, dtype=torch.bool, device=device)
            mask[[i for i in ids if 0 <= i < width]] = True
            self._masks[key] = mask
        return mask

    # ---- one decoder pass --------------------------------------------------------------------

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def _cross_cache(self, encoder_hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) of the cross-attention, each (B, heads, frames, head_dim)."""
        out = []
        for layer in self.layers:
            attn = layer.encoder_attn
            k = self._split(attn.k_proj(encoder_hidden)).contiguous()
            v = self._split(attn.v_proj(encoder_hidden)).contiguous()
            out.append((k, v))
        return out

    def _forward(self, ids: torch.Tensor, start: int, self_cache: list, cross_cache: list) -> torch.Tensor:
        """Run tokens ids (B, T) at positions start..start+T-1; returns the last position's
        final hidden state (B, d_model). Writes the new keys/values into self_cache."""
        t = ids.shape[1]
        end = start + t
        x = self.decoder.embed_tokens(ids) + self.decoder.embed_positions.weight[start:end]
        causal = t > 1
        for layer, (k_buf, v_buf), (k_cross, v_cross) in zip(self.layers, self_cache, cross_cache):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q = self._split(attn.q_proj(h) * self.scaling)
            k_buf[:, :, start:end] = self._split(attn.k_proj(h))
            v_buf[:, :, start:end] = self._split(attn.v_proj(h))
            a = F.scaled_dot_product_attention(q, k_buf[:, :, :end], v_buf[:, :, :end], is_causal=causal, scale=1.0)
            x = x + attn.out_proj(a.transpose(1, 2).reshape(x.shape))
            cross = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            q = self._split(cross.q_proj(h) * self.scaling)
            a = F.scaled_dot_product_attention(q, k_cross, v_cross, scale=1.0)
            x = x + cross.out_proj(a.transpose(1, 2).reshape(x.shape))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        return self.decoder.layer_norm(x[:, -1])

    def _logits(self, ids: torch.Tensor, start: int, self_cache: list, cross_cache: list) -> torch.Tensor:
        """float32 (B, vocab) logits of the next token."""
        return self.model.proj_out(self._forward(ids, start, self_cache, cross_cache)).float()

    # ---- decoding ----------------------------------------------------------------------------

    def detect_language(self, encoder_hidden: torch.Tensor) -> list[int]:
        """The language token of each row, as generate() picks it: the start token alone, then
        the most likely of generation_config.lang_to_id's tokens. encoder_hidden: (B, frames, d)."""
        gen = self.model.generation_config
        lang_ids = sorted(gen.lang_to_id.values())
        b = encoder_hidden.shape[0]
        ids = torch.full((b, 1), gen.decoder_start_token_id, dtype=torch.long, device=encoder_hidden.device)
        cache = self._self_cache(b, 1, encoder_hidden)
        logits = self._logits(ids, 0, cache, self._cross_cache(encoder_hidden))
        keep = torch.full_like(logits, -float("inf"))
        keep[:, lang_ids] = 0.0
        return (logits + keep).argmax(-1).tolist()

    def _self_cache(self, batch: int, length: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.heads, length, self.head_dim)
        return [(like.new_empty(shape), like.new_empty(shape)) for _ in self.layers]

    def prompts(self, encoder_hidden: torch.Tensor, language: str | None = None,
                task: str | None = None) -> torch.Tensor:
        """int64 (B, P) decoder prompts of generate(): whisper_prompt(), with the language
        token detected per row for a multilingual model given no language."""
        gen = self.model.generation_config
        b = encoder_hidden.shape[0]
        prompt = whisper_prompt(gen, language, task)
        if prompt is not None:
            return torch.tensor([prompt] * b, dtype=torch.long, device=encoder_hidden.device)
        # generate() puts the detected language after the start token and adds a task token only
        # when one was asked for (no default "transcribe" as with a given language).
        task_ids = getattr(gen, "task_to_id", None) or {}
        tail = ([task_ids[task]] if task is not None else []) + [gen.no_timestamps_token_id]
        rows = [[gen.decoder_start_token_id, lang, *tail] for lang in self.detect_language(encoder_hidden)]
        return torch.tensor(rows, dtype=torch.long, device=encoder_hidden.device)

    @torch.inference_mode()
    def generate(self, encoder_hidden: torch.Tensor, prompt: torch.Tensor | None = None, max_new_tokens: int = 128,
                 language: str | None = None, task: str | None = None, temperature: float = 0.0,
                 generator: torch.Generator | None = None,
                 sum_logprobs: list[float] | None = None) -> list[list[int]]:
        """Greedy tokens of each row, without the prompt and without the final EOS.

        encoder_hidden: (B, frames, d_model) encoder output in the model's dtype.
        prompt: int64 (B, P) decoder prompt (all rows the same length), default `prompts()`.
        max_new_tokens: at most this many new tokens per row (EOS included), capped so that the
        prompt plus new tokens fit max_target_positions, as generate() does.
        temperature: 0 picks the most likely token (greedy); > 0 samples each token from
        softmax(logits / temperature) with `generator` (the temperature fallback's retries).
        sum_logprobs: if given, filled with each row's sum of log p(token) over its emitted tokens
        and its EOS (log-softmax of the suppressed logits at temperature 1, as openai-whisper
        scores a decoding).
        """
        if prompt is None:
            prompt = self.prompts(encoder_hidden, language, task)
        b, p = prompt.shape
        if b != encoder_hidden.shape[0]:
            raise ValueError(f"prompt has {b} rows, encoder_hidden {encoder_hidden.shape[0]}")
        if p >= self.max_positions:
            raise ValueError(f"the prompt ({p} tokens) leaves no room in max_target_positions={self.max_positions}")
        new = min(max_new_tokens, self.max_positions - p)
        suppress = self._mask(self.suppress_tokens, self.vocab, encoder_hidden.device)
        begin = self._mask(self.begin_suppress_tokens, self.vocab, encoder_hidden.device)

        self_cache = self._self_cache(b, p + new, encoder_hidden)
        cross_cache = self._cross_cache(encoder_hidden)
        out: list[list[int]] = [[] for _ in range(b)]
        scores = [0.0] * b
        rows = list(range(b))                      # original index of each live row
        ids, start = prompt, 0
        for step in range(new):
            logits = self._logits(ids, start, self_cache, cross_cache)
            start += ids.shape[1]
            if suppress is not None:
                logits.masked_fill_(suppress, -float("inf"))
            if step == 0 and begin is not None:
                logits.masked_fill_(begin, -float("inf"))
            if temperature > 0:
                tokens = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tokens = logits.argmax(-1)
            values = tokens.tolist()
            if sum_logprobs is not None:
                chosen = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
                for row, logprob in zip(rows, chosen):
                    scores[row] += logprob
            live = []
            for i, (row, token) in enumerate(zip(rows, values)):
                if token == self.eos:
                    continue
                out[row].append(token)
                live.append(i)
            if not live:
                break
            if len(live) < len(rows):
                keep = torch.tensor(live, device=tokens.device)
                self_cache = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self_cache]
                cross_cache = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in cross_cache]
                rows = [rows[i] for i in live]
                tokens = tokens.index_select(0, keep)
            ids = tokens[:, None]
        if sum_logprobs is not None:
            sum_logprobs[:] = scores
        return out
