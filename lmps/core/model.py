"""A GPT-style decoder-only Transformer language model, nanoGPT-style, in one file.

References:
1) GPT-2: Radford et al., "Language Models are Unsupervised Multitask Learners", OpenAI 2019:
   pre-LayerNorm blocks with a final LayerNorm, GELU MLPs of width 4C, learned position
   embeddings, N(0, 0.02) init with residual projections scaled by 1/sqrt(2 * n_layer).
2) Weight tying: Press & Wolf, "Using the Output Embedding to Improve Language Models",
   EACL 2017: the output head shares the token embedding matrix (`tie_embeddings`).
3) nanoGPT (Karpathy, github.com/karpathy/nanoGPT, model.py): the layout and the parameter
   names (`transformer.wte`, `h.N.attn.c_attn`, ...), which are also Hugging Face GPT-2's.

Pure torch: no knowledge of gRPC, parameter servers or devices. Workers build a replica with
`init_model` (the same seed gives the same weights on every machine), move it wherever they
like, and exchange its `named_parameters()` with the parameter servers by name. `KVCache`
lets a decoding step feed only its new tokens; the decoding loop and the samplers are in
`lmps.core.generation`.

Shape legend used in the comments:
    B batch, T sequence length (<= block_size), C n_embd, nh n_head, hs head size (C // nh),
    V vocab_size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["gelu", "gelu_tanh"]
"""Names of the MLP nonlinearities in `ACTIVATIONS`."""

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    # Exact GELU, x * Phi(x) (Hendrycks & Gimpel 2016).
    "gelu": nn.GELU,
    # The tanh approximation GPT-2 was trained with (Hugging Face calls it "gelu_new"); a
    # GPT-2 checkpoint gives its own logits only with this one.
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}
"""Activation name -> a factory of the module; `GPTConfig.activation` picks one."""

Pooling = Literal["last", "mean"]
"""How the classification head sees a sequence (`GPT.classify`): the final LayerNorm's output
at the last token ("last": under causal attention the only position that saw them all, GPT-2
and Hugging Face's GPT2ForSequenceClassification choice) or its mean over the tokens."""
POOLINGS: tuple[str, ...] = ("last", "mean")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT model; mirrors `lmps.v1.ModelConfig` field for field."""

    n_layer: int
    """Number of Transformer blocks."""
    n_head: int
    """Attention heads per block; must divide `n_embd`."""
    n_embd: int
    """Width of the residual stream (embedding size)."""
    block_size: int
    """Longest context in tokens; sizes the position embedding."""
    vocab_size: int
    """Number of token ids the model accepts and predicts."""
    dropout: float = 0.0
    """Dropout probability while training (0 gives exact, reproducible gradients)."""
    bias: bool = True
    """Biases in the Linear and LayerNorm layers (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head (GPT-2 does)."""
    activation: Activation = "gelu"
    """The MLP's nonlinearity, a key of `ACTIVATIONS`: exact "gelu" (the default, and what a
    config.json without the key means) or GPT-2's "gelu_tanh"."""
    num_labels: int = 0
    """Classes of the sequence-classification head `score` (n_embd -> num_labels, no bias);
    0: no head, a language model only."""
    pooling: Pooling = "last"
    """What `score` sees of a sequence (`Pooling`); ignored without a head."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is surely a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if (
            not isinstance(self.num_labels, int)
            or isinstance(self.num_labels, bool)
            or not 0 <= self.num_labels <= MAX_LABELS
        ):
            raise ValueError(
                f"GPTConfig.num_labels must be an int in [0, {MAX_LABELS}], got {self.num_labels!r}"
            )
        if self.num_labels == 1:
            raise ValueError("GPTConfig.num_labels must be 0 (no head) or at least 2 classes")
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"GPTConfig.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"
            )

    @property
    def head_size(self) -> int:
        """Width of one attention head (n_embd // n_head)."""
        return self.n_embd // self.n_head


MAX_LABELS = 10_000
"""Most classes a head may have (a larger number is a data mistake, not a task)."""


# vocab_size here is a placeholder default: the real one comes from the tokenizer, see `preset`.
PRESETS: dict[str, GPTConfig] = {
    # The CPU demo: 675k parameters at vocab 2048 (129k tokens of builtin:pydoc); an epoch
    # takes seconds on 2 cores.
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=2048),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192),
    # GPT-2 small (124M), with its tanh GELU so that it exports to Hugging Face exactly;
    # 50304 = 50257 padded up to a multiple of 64 for faster matmuls.
    "gpt2": GPTConfig(
        n_layer=12,
        n_head=12,
        n_embd=768,
        block_size=1024,
        vocab_size=50304,
        activation="gelu_tanh",
    ),
}


def preset(name: str, vocab_size: int | None = None) -> GPTConfig:
    """The preset called `name`, with `vocab_size` filled in (None keeps the preset's default)."""
    try:
        config = PRESETS[name]
    except KeyError:
        choices = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown model preset {name!r}; choose one of: {choices}") from None
    if vocab_size is None:
        return config
    return dataclasses.replace(config, vocab_size=vocab_size)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # q, k and v for all heads in one matmul.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """`x` (B, T, C) -> (B, T, C). With `cache`, `x` holds the T positions after the
        `cache.length` ones already cached: their keys and values are appended to it and the
        queries attend to every cached position as well."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # Heads become a batch dimension: (B, nh, T, hs).
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, past + T, hs)
        mask = None
        if past and T > 1:
            # Query t (at position past + t) sees keys 0..past + t: a causal mask shifted
            # right by `past` (is_causal would align it top-left, as if past were 0).
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        # Fused attention (flash / memory-efficient kernels where available); is_causal
        # applies the lower-triangular mask without materialising a (T, T) buffer. One new
        # query (a decoding step) sees every key: no mask at all.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0 and T > 1,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network with a 4x hidden expansion."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()  # no parameters: not in the state dict
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """One Transformer block; pre-LayerNorm keeps the residual stream an identity path."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class Transformer(nn.Module):
    """The trunk: embeddings, blocks and the final LayerNorm (nanoGPT's `transformer`
    ModuleDict, as a class so every attribute has a static type)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)


class LayerCache:
    """One attention layer's keys and values for the positions seen so far.

    The buffers hold `capacity` positions (the model's block_size) and are allocated on the
    first `update`, with the batch size, device and dtype of its keys: appending a decoding
    step copies one position, not the whole past (as `torch.cat` would).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        """Positions cached so far."""
        self.keys: Tensor | None = None  # (B, nh, capacity, hs)
        self.values: Tensor | None = None  # (B, nh, capacity, hs)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append `k`, `v` (B, nh, T, hs) at positions length .. length + T - 1; returns the
        keys and values of every position so far, (B, nh, length + T, hs) each."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"{end} positions exceed the cache's {self.capacity}")
        if self.keys is None or self.values is None:
            self.keys = k.new_empty(B, nh, self.capacity, hs)
            self.values = v.new_empty(B, nh, self.capacity, hs)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Past keys and values of every layer, so that a decoding step feeds the model only its
    new token: `model(idx[:, cache.length:], cache=cache)` (the "KV cache" of Pope et al.,
    "Efficiently Scaling Transformer Inference", 2022; Hugging Face's `past_key_values`).

    Positions are absolute (learned position embeddings), so a cache holds at most
    `block_size` positions: past that, every position of a block_size window shifts by one
    each step and no cached key stays valid. `lmps.core.generation` then recomputes the
    last block_size tokens each step, exactly what an uncached model sees.
    """

    def __init__(self, config: GPTConfig) -> None:
        self.layers = [LayerCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Positions cached so far (the same in every layer)."""
        return self.layers[0].length


class GPT(nn.Module):
    """Token ids in, next-token logits (and optionally the loss) out.

    Parameter names follow nanoGPT / GPT-2 (`transformer.wte.weight`,
    `transformer.h.0.attn.c_attn.weight`, ...). With tied embeddings `lm_head.weight` *is*
    `transformer.wte.weight`, so `named_parameters()` lists it once, under the wte name.
    The constructor draws initial weights from torch's global RNG; use `init_model` for
    reproducible weights.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # The same Parameter object: one tensor, one gradient (the sum of both uses).
            self.lm_head.weight = self.transformer.wte.weight
        # Sequence classification (Radford et al. 2018, GPT-1's task heads; Hugging Face's
        # GPT2ForSequenceClassification.score): a bias-free Linear over a pooled hidden state.
        # Created last, so a model without it draws the same initial weights as before.
        self.score = (
            nn.Linear(config.n_embd, config.num_labels, bias=False) if config.num_labels else None
        )
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual projections
        scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with
        depth (each block adds two projections to it)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # With tied embeddings lm_head (visited after wte) redraws the shared matrix from the
        # same N(0, 0.02): harmless, and the result is still a pure function of the RNG state.

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """The trunk's output, the final LayerNorm's (B, T, C), for token ids `idx` (B, T)
        (with `cache`: as in `forward`)."""
        _, T = idx.shape
        start = 0 if cache is None else cache.length
        if self.config.block_size < start + T:
            what = f"sequence length {T}" + (f" after {start} cached" if start else "")
            raise ValueError(f"{what} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        out: Tensor = self.transformer.ln_f(x)  # (B, T, C)
        return out

    def classify(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Class logits (B, num_labels) of the sequences `idx` (B, T), right-padded: row b's
        tokens are idx[b, :lengths[b]] (1 <= lengths[b] <= T). Padding never changes the
        result: under causal attention no real token sees a later position."""
        if self.score is None:
            raise ValueError("this model has no classification head (num_labels is 0)")
        h = self.hidden(idx)  # (B, T, C)
        B, T, _ = h.shape
        lengths = lengths.to(device=h.device, dtype=torch.long)
        if self.config.pooling == "last":
            pooled = h[torch.arange(B, device=h.device), lengths - 1]  # (B, C)
        else:
            keep = torch.arange(T, device=h.device) < lengths[:, None]  # (B, T)
            pooled = (h * keep[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        logits: Tensor = self.score(pooled)  # (B, num_labels)
        return logits

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for token ids `idx` (B, T); with `targets` (B, T) also the mean
        token cross-entropy (a scalar), else None.

        With `cache`, `idx` continues the sequence the cache holds: its tokens take positions
        `cache.length` .. `cache.length + T - 1`, attend to the cached keys and values too,
        and are added to the cache. The logits equal those of the same positions in an
        uncached forward of the whole sequence (up to rounding)."""
        B, T = idx.shape
        x = self.hidden(idx, cache)  # (B, T, C)
        logits: Tensor = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        # cross_entropy wants int64 class indices; data arrives as int32 to halve its size.
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T).long())
        return logits, loss


def init_model(config: GPTConfig, seed: int) -> GPT:
    """A new CPU model whose weights depend only on `config` and `seed`.

    Runs on a forked CPU RNG, so the caller's global RNG state is left exactly as it was.
    """
    with torch.random.fork_rng(devices=[]):
        # default_generator rather than torch.manual_seed: the latter also reseeds CUDA,
        # whose state fork_rng(devices=[]) would not restore.
        torch.default_generator.manual_seed(seed)
        return GPT(config)


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy), capped so that a diverged loss gives a huge finite
    number instead of an OverflowError (exp(700) ~ 1e304 still fits a double)."""
    return math.exp(min(loss, 700.0))


def decay_mask(name: str, param: Tensor) -> bool:
    """Whether weight decay applies: matrices and embeddings (ndim >= 2) yes; biases and
    LayerNorm gains no (nanoGPT's convention). `name` is accepted for future rules."""
    del name
    return param.ndim >= 2
