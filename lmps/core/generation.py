"""Autoregressive decoding from a `GPT`: the sampling settings, the logit filters as plain
functions, and a loop that yields one token per step, feeding the model only the new token
while the sequence fits its `KVCache`.

References:
1) Top-k sampling: Fan et al., "Hierarchical Neural Story Generation", ACL 2018.
2) Top-p (nucleus) sampling: Holtzman et al., "The Curious Case of Neural Text
   Degeneration", ICLR 2020: sample from the smallest set of tokens whose probability
   mass reaches p.
3) Repetition penalty: Keskar et al., "CTRL: A Conditional Transformer Language Model for
   Controllable Generation", 2019, section 4.1, in Hugging Face's form (which also handles
   negative logits): the logit of a token already in the sequence is divided by the penalty
   when positive and multiplied by it when negative, so it always becomes less likely.

The order of the filters is Hugging Face's: repetition penalty on the raw logits, then
temperature, top-k, top-p. Temperature 0 is greedy decoding (argmax of the penalised
logits). Pure torch, like `lmps.core.model`; text (tokenizers, stop strings, streaming to a
terminal) is the client's business (`lmps.client.generation`).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmps.core.model import GPT, KVCache


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token; validated once, here. Every ValueError message starts
    with the field's name."""

    max_new_tokens: int = 100
    """Tokens to generate (fewer when the caller stops early: stop strings, end of text)."""
    temperature: float = 1.0
    """Divides the logits before sampling: < 1 sharpens, > 1 flattens; 0 is greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens only; None keeps every token."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches
    top_p, in (0, 1]; 1 keeps every token, a tiny value keeps only the most likely one."""
    repetition_penalty: float = 1.0
    """CTRL's penalty (>= 1; 1 is off) on every token already in the sequence, the prompt's
    included. Applies to greedy decoding too."""
    seed: int | None = None
    """Seeds a fresh torch.Generator for sampling (reproducible runs); None draws from
    torch's global RNG. Ignored when the caller passes its own generator."""
    use_cache: bool = True
    """Feed only the new token each step (KV cache) while the sequence fits block_size; off,
    every step recomputes the whole context. The tokens are the same either way."""

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: object) -> bool:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return ok and math.isfinite(value)  # type: ignore[arg-type]

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not is_real(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None (no limit), got {self.top_k!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not is_real(self.repetition_penalty) or self.repetition_penalty < 1:
            raise ValueError(
                f"repetition_penalty must be a number >= 1 (1 = off), "
                f"got {self.repetition_penalty!r}"
            )
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """`logits` (B, V) with every `seen` (B, V, bool) token's logit divided by `penalty` if
    positive, multiplied by it if not (CTRL, in Hugging Face's form)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """`logits` (B, V) with all but the k largest of each row at -inf (ties with the k-th
    stay in)."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """`logits` (B, V) with each row cut to its nucleus: the most likely tokens, in order,
    up to and including the first at which their probability mass reaches `p`; the rest at
    -inf. The most likely token always stays."""
    ranked, order = logits.sort(dim=-1, descending=True, stable=True)  # (B, V) each
    probs = F.softmax(ranked, dim=-1)
    # A token goes when the tokens ranked above it already have mass >= p.
    drop_ranked = probs.cumsum(dim=-1) - probs >= p
    drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked)  # vocab order
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: Tensor,
    settings: SamplingSettings,
    *,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token (B,) int64 from the last position's `logits` (B, V): the filters of
    `settings` in Hugging Face's order, then argmax (temperature 0) or a draw from
    `generator`. `seen` (B, V, bool) marks the tokens the repetition penalty applies to."""
    logits = logits.float()
    if seen is not None and settings.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    if settings.top_p < 1:
        logits = top_p_filter(logits, settings.top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def cached_steps(prompt_len: int, new_tokens: int, block_size: int) -> int:
    """How many of `new_tokens` decoding steps after a `prompt_len`-token prompt read the KV
    cache (the first one fills it): the steps whose context still fits `block_size`."""
    return max(0, min(new_tokens, block_size - prompt_len + 1))


@torch.no_grad()
def generate_tokens(
    model: GPT,
    idx: Tensor,
    settings: SamplingSettings,
    *,
    generator: torch.Generator | None = None,
) -> Generator[Tensor, None, None]:
    """Yield the next token of every sequence of the prompt `idx` (B, T), (B,) int64, up to
    `settings.max_new_tokens` times; stop iterating to stop early (streaming, stop strings).

    With `settings.use_cache` the first step runs the prompt through the model into a
    `KVCache` and each later one feeds only the token before it, while the sequence fits
    `block_size`. Past that (or for a longer prompt) every step runs the last block_size
    tokens uncached: the learned positions of that window shift by one each step, so no
    cached key stays valid. Either way the model sees exactly the context an uncached model
    sees, so greedy decoding gives the same tokens with and without the cache.

    The model runs in eval mode (no dropout) and is put back in its previous mode when the
    iterator ends or is closed.
    """
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt must have at least one token")
    block = model.config.block_size
    if generator is None and settings.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(settings.seed)
    seen = None
    if settings.repetition_penalty != 1:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=idx.device)
        seen.scatter_(1, idx.long(), True)
    cache = KVCache(model.config) if settings.use_cache else None
    tokens = idx.long()
    rows = torch.arange(B, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(settings.max_new_tokens):
            if cache is not None and tokens.size(1) <= block:
                fed = tokens[:, cache.length :]  # the whole prompt, then one token a step
            else:
                cache = None
                fed = tokens[:, -block:]  # (B, <= block_size)
            logits, _ = model(fed, cache=cache)
            token = next_token(logits[:, -1, :], settings, seen=seen, generator=generator)
            if seen is not None:
                seen[rows, token] = True
            tokens = torch.cat((tokens, token[:, None]), dim=1)  # (B, T + 1)
            yield token
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    idx: Tensor,
    settings: SamplingSettings,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`idx` (B, T) extended by `settings.max_new_tokens` tokens: (B, T + max_new_tokens),
    the dtype of `idx`. See `generate_tokens`."""
    new = list(generate_tokens(model, idx, settings, generator=generator))
    if not new:
        return idx
    return torch.cat((idx, torch.stack(new, dim=1).to(idx.dtype)), dim=1)
