"""Small Hugging Face GPT-2 folders built here, from random weights and a tokenizer trained
on a few lines of text (nothing is downloaded): what a user's `save_pretrained` GPT-2 looks
like, at test size; a small lmps model to export; and the checks the Hugging Face tests
share (logits compared and their worst difference reported, `from_pretrained` with every
warning it gave). Needs `transformers` (the `hf` extra)."""

from __future__ import annotations

import logging
import math
import pydoc_data.topics
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmps.client import model_io
from lmps.core.data import EOT, train_tokenizer
from lmps.core.model import GPTConfig, init_model

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


def far_lmps_model(seed: int, **fields: Any) -> model_io.TrainedModel:
    """A small random lmps model (2 layers, 2 heads, 32 wide, the other `GPTConfig` fields
    as given) with lmps' own tokenizer trained on TEXT (EOT is id 0), its weights times 10:
    away from the small init, where the GELUs would hardly differ."""
    tokenizer = train_tokenizer(TEXT.splitlines(), 300)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, vocab_size=tokenizer.get_vocab_size(), **fields
    )
    model = init_model(config, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    return model_io.TrainedModel(model, config, tokenizer)


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


WORST: dict[str, float] = {}
"""Largest |logits difference| per check of the running test module (`close`), printed at
its end (`pytest -s`) by `report_logits_diffs`."""


@pytest.fixture(scope="module", autouse=True)
def report_logits_diffs() -> Iterator[None]:
    """Autouse in a test module that imports it: prints `WORST` after the module's tests,
    then empties it for the next module."""
    yield
    for name, diff in WORST.items():
        print(f"\nmax abs logits diff, {name}: {diff:.3e}")
    WORST.clear()


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """assert_close at fp32 tolerances, keeping the worst difference under `name`."""
    torch.testing.assert_close(got, want)  # fp32 tolerances
    WORST[name] = max(WORST.get(name, 0.0), float((got - want).abs().max()))


def hf_logits(model: Any, idx: torch.Tensor) -> torch.Tensor:
    """A transformers model's logits for `idx` (B, T), in eval mode, without gradients."""
    with torch.no_grad():
        out: torch.Tensor = model.eval()(idx).logits
    return out


def load_quietly(model_class: Any, path: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """`model_class.from_pretrained(path)` with loading info, and every warning transformers
    logged or raised."""
    import transformers

    logger = logging.getLogger("transformers")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    transformers.logging.set_verbosity_warning()  # hf_io quietens it; listen here
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = model_class.from_pretrained(str(path), output_loading_info=True)
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity_error()
    return model, info, seen + [str(w.message) for w in caught]


def assert_no_loading_issues(info: dict[str, Any]) -> None:
    """`from_pretrained`'s loading info: no missing, unexpected or mismatched key, no error."""
    assert {k: list(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
