"""Small Hugging Face GPT-2 folders built here, from random weights and a tokenizer trained
on a few lines of text (nothing is downloaded): what a user's `save_pretrained` GPT-2 looks
like, at test size. Needs `transformers` (the `hf` extra)."""

from __future__ import annotations

import math
import pydoc_data.topics
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmps.core.data import EOT

TOPICS = pydoc_data.topics.topics
TEXT = "\n\n".join(TOPICS[k] for k in ("for", "while", "if", "with", "try"))
"""~15 KB of English and code from the Python docs every interpreter carries."""

TEXTS = [
    "Hello world, the for statement",
    " leading space, two  spaces and\nnew lines\n\n",
    "unicode: über café 🦊 — done",
    f"two documents{EOT}joined by the end-of-text token",
    "",
]
"""Strings whose token ids every tokenizer pair must agree on."""


def gpt2_style_tokenizer(text: str = TEXT, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE like GPT-2's own: its pre-tokenizer, decoder and post-processor, and
    <|endoftext|> as the last id (50256 in GPT-2; lmps' own tokenizers put it at 0)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens([EOT])
    return tokenizer


def make_hf_dir(
    path: Path,
    *,
    activation: str = "gelu_new",
    tie: bool = True,
    dropout: float = 0.1,
    n_positions: int = 16,
    seed: int = 0,
    text: str = TEXT,
) -> Path:
    """`path` as `GPT2LMHeadModel.save_pretrained` + `GPT2TokenizerFast.save_pretrained`
    leave it. The embedding has more rows than the tokenizer has tokens (GPT-2 style
    padding), and weights far from the N(0, 0.02) init (larger activations show up any
    layout or activation mismatch)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = gpt2_style_tokenizer(text)
    eot = tokenizer.token_to_id(EOT)
    config = GPT2Config(
        vocab_size=8 * math.ceil((tokenizer.get_vocab_size() + 1) / 8),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        activation_function=activation,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=tie,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
    model.save_pretrained(str(path))
    GPT2TokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(path))
    return path
