"""Issue 11, generation: the KV cache gives the uncached model's logits and greedy tokens
(also past block_size), the samplers do what their papers say (top-k, top-p, CTRL's
repetition penalty, checked on hand-made logits), a seed reproduces a sample, and on the
client side stop strings cut the text, which streams in pieces that add up to it."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer

from lmps.client.generation import TextStream, generate_text, held_back, unescape
from lmps.client.model_io import TrainedModel, sample
from lmps.core.data import EOT, train_tokenizer
from lmps.core.generation import (
    SamplingSettings,
    apply_repetition_penalty,
    cached_steps,
    generate,
    generate_tokens,
    next_token,
    top_k_filter,
    top_p_filter,
)
from lmps.core.model import GPT, GPTConfig, KVCache, init_model

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
GREEDY = SamplingSettings(max_new_tokens=24, temperature=0)
INF = float("inf")


def prompts(*lengths: int, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (batch, n), generator=g) for n in lengths]


# --- KV cache ------------------------------------------------------------------------------


def test_cached_forward_gives_the_uncached_logits_of_the_same_positions() -> None:
    model = init_model(CFG, seed=0).eval()
    (idx,) = prompts(CFG.block_size, batch=3)
    with torch.no_grad():
        full, _ = model(idx)  # (3, 16, V)
        cache = KVCache(CFG)
        # A prompt, a chunk of 3 after it (the shifted causal mask), then one token a step.
        pieces = [(0, 5), (5, 8), *((t, t + 1) for t in range(8, CFG.block_size))]
        for start, end in pieces:
            assert cache.length == start
            logits, _ = model(idx[:, start:end], cache=cache)
            torch.testing.assert_close(logits, full[:, start:end])
    assert cache.length == CFG.block_size


def test_a_full_cache_refuses_another_position() -> None:
    model = init_model(CFG, seed=0).eval()
    cache = KVCache(CFG)
    (idx,) = prompts(CFG.block_size)
    with torch.no_grad():
        model(idx, cache=cache)
        with pytest.raises(ValueError, match="after 16 cached exceeds block_size 16"):
            model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("length", [1, 5, CFG.block_size - 1, CFG.block_size, 21])
def test_greedy_tokens_are_the_same_with_and_without_the_cache(length: int) -> None:
    # 24 new tokens always run past block_size 16; 21 is a prompt longer than the context.
    model = init_model(CFG, seed=1)
    for idx in prompts(length, batch=3, seed=length):
        cached = generate(model, idx, GREEDY)
        uncached = generate(
            model, idx, SamplingSettings(max_new_tokens=24, temperature=0, use_cache=False)
        )
        assert cached.shape == (3, length + 24)
        assert torch.equal(cached, uncached)
        assert torch.equal(cached[:, :length], idx)
        # Greedy: each new token is the argmax of an uncached forward over its context.
        for t in range(length, length + 24):
            logits, _ = model(cached[:, max(0, t - CFG.block_size) : t])
            assert torch.equal(logits[:, -1].argmax(-1), cached[:, t])


def test_seeded_sampling_is_the_same_with_and_without_the_cache() -> None:
    model = init_model(CFG, seed=2)
    (idx,) = prompts(3)
    settings = SamplingSettings(max_new_tokens=30, temperature=1.3, top_p=0.9, seed=5)
    no_cache = SamplingSettings(
        max_new_tokens=30, temperature=1.3, top_p=0.9, seed=5, use_cache=False
    )
    assert torch.equal(generate(model, idx, settings), generate(model, idx, no_cache))


def test_cached_steps_counts_the_steps_that_fit_the_block() -> None:
    assert cached_steps(prompt_len=4, new_tokens=10, block_size=16) == 10
    assert cached_steps(prompt_len=4, new_tokens=30, block_size=16) == 13  # contexts 4..16
    assert cached_steps(prompt_len=16, new_tokens=5, block_size=16) == 1  # the prompt's step
    assert cached_steps(prompt_len=20, new_tokens=5, block_size=16) == 0


# --- the samplers ----------------------------------------------------------------------------


def test_repetition_penalty_follows_the_formula_on_a_hand_made_example() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    # Seen: 2 / 2 = 1, -1 * 2 = -2, 0 stays 0; unseen logits unchanged.
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0]]))


def test_repetition_penalty_sees_the_prompt_and_what_was_generated() -> None:
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    prompt_seen = torch.tensor([[True, False, False]])
    settings = SamplingSettings(temperature=0, repetition_penalty=1.5)
    assert next_token(logits, settings, seen=prompt_seen).item() == 1  # 3 / 1.5 < 2.9
    assert next_token(logits, SamplingSettings(temperature=0)).item() == 0

    # In the loop: with a strong penalty greedy decoding never repeats a token while unseen
    # ones are left (a random model's logits are small, so 1e3 always wins over them).
    model = init_model(CFG, seed=3)
    (idx,) = prompts(2, batch=1)
    out = generate(
        model, idx, SamplingSettings(max_new_tokens=20, temperature=0, repetition_penalty=1e3)
    )
    assert len(set(out[0].tolist())) == 22


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[-INF, 4.0, 3.0, -INF]]))
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_that_reaches_p() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    logits = probs.log()
    kept = {
        0.4: [1],  # 0.5 alone reaches 0.4
        0.5: [1],
        0.7: [1, 2],  # 0.5 + 0.3 = 0.8 >= 0.7
        0.85: [0, 1, 2],
        1e-9: [1],
    }
    for p, tokens in kept.items():
        out = top_p_filter(logits, p)
        assert torch.isfinite(out[0]).nonzero().flatten().tolist() == tokens, p
        torch.testing.assert_close(out[0, tokens], logits[0, tokens])


def test_top_p_near_zero_and_top_k_one_are_greedy_whatever_the_seed() -> None:
    model = init_model(CFG, seed=0)
    (idx,) = prompts(3, batch=4)
    greedy = generate(model, idx, GREEDY)
    for seed in range(3):
        top_p = SamplingSettings(max_new_tokens=24, temperature=1.5, top_p=1e-6, seed=seed)
        top_k = SamplingSettings(max_new_tokens=24, temperature=2.0, top_k=1, seed=seed)
        assert torch.equal(generate(model, idx, top_p), greedy)
        assert torch.equal(generate(model, idx, top_k), greedy)


def test_top_k_and_top_p_restrict_the_draws() -> None:
    model = init_model(CFG, seed=0)
    idx = torch.zeros(512, 1, dtype=torch.long)  # 512 independent one-token samples
    logits, _ = model(idx[:1])
    ranked = logits[0, -1].softmax(-1).sort(descending=True)
    drawn_k = generate(model, idx, SamplingSettings(max_new_tokens=1, top_k=3, seed=0))
    assert set(drawn_k[:, -1].tolist()) == set(ranked.indices[:3].tolist())
    # The nucleus of mass 0.1: the top tokens up to the one whose cumulative mass reaches it.
    n = int((ranked.values.cumsum(0) < 0.1).sum()) + 1
    drawn_p = generate(model, idx, SamplingSettings(max_new_tokens=1, top_p=0.1, seed=0))
    assert set(drawn_p[:, -1].tolist()) == set(ranked.indices[:n].tolist())


def test_a_seed_reproduces_a_sample_and_another_seed_does_not() -> None:
    model = init_model(CFG, seed=0)
    (idx,) = prompts(2, batch=2)

    def draw(seed: int) -> torch.Tensor:
        return generate(model, idx, SamplingSettings(max_new_tokens=20, seed=seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    # An explicit generator is used as given, and the global RNG is not touched.
    state = torch.random.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(
        generate(model, idx, SamplingSettings(max_new_tokens=20), generator=gen), draw(0)
    )
    assert torch.equal(torch.random.get_rng_state(), state)


def test_generation_restores_the_training_mode_and_can_stop_early() -> None:
    model = init_model(CFG, seed=0)
    model.train()
    tokens = generate_tokens(model, torch.zeros(1, 1, dtype=torch.long), GREEDY)
    next(tokens)
    assert not model.training  # eval while generating: no dropout
    tokens.close()
    assert model.training
    assert torch.equal(
        generate(model, torch.ones(1, 3, dtype=torch.long), SamplingSettings(max_new_tokens=0)),
        torch.ones(1, 3, dtype=torch.long),
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an int"),
        ({"temperature": -0.1}, "temperature must be a number >= 0"),
        ({"temperature": math.nan}, "temperature must be a number"),
        ({"top_k": 0}, "top_k must be an int >= 1 or None"),
        ({"top_k": True}, "top_k must be an int"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"repetition_penalty": 0.9}, "repetition_penalty must be a number >= 1"),
        ({"seed": "1"}, "seed must be an int or None"),
    ],
)
def test_settings_reject_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        SamplingSettings(**changes)  # type: ignore[arg-type]


# --- text: stop strings, streaming ---------------------------------------------------------

CORPUS = "the parameter server holds shards. every worker pulls them; ✓ done\n" * 40


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS.split("\n"), 300)


def stream_of(
    tokenizer: Tokenizer, text: str, stops: tuple[str, ...]
) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    pieces = []
    for token in tokenizer.encode(text).ids:
        pieces.append(stream.push(token))
        if stream.stopped_by is not None:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_held_back_is_the_longest_tail_that_starts_a_stop_string() -> None:
    assert held_back("the serv", ["server", "xyz"]) == 4
    assert held_back("the se", ["server", "e."]) == 2  # "se" beats "e"
    assert held_back("the server", ["server"]) == 0  # a whole stop string is found, not held
    assert held_back("abc", []) == 0


def test_stop_strings_cut_the_text_and_are_never_shown(tokenizer: Tokenizer) -> None:
    text = "the parameter server holds shards. every worker pulls them"
    for stop, expected in [
        (". ev", "the parameter server holds shards"),  # spans tokens
        ("arame", "the p"),  # inside a token
        ("them", "the parameter server holds shards. every worker pulls "),
        ("nowhere", text),
    ]:
        pieces, stream = stream_of(tokenizer, text, (stop, "zzz"))
        assert "".join(pieces) == expected, stop
        assert stream.stopped_by == (None if stop == "nowhere" else stop)
        assert not any(stop in p for p in pieces)
    # Several stop strings: the first in the text wins.
    pieces, stream = stream_of(tokenizer, text, ("worker", "holds"))
    assert "".join(pieces) == "the parameter server " and stream.stopped_by == "holds"


def test_the_stream_hands_out_text_as_it_comes(tokenizer: Tokenizer) -> None:
    text = "the parameter server holds shards. every worker pulls them; ✓ done"
    pieces, _ = stream_of(tokenizer, text, ())
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 5  # not all at the end
    assert not any("\ufffd" in p for p in pieces)  # never half a UTF-8 character
    # A stop string's possible start waits until the next tokens rule it out.
    pieces, _ = stream_of(tokenizer, "the parameter server", ("serverless",))
    assert "".join(pieces[:-1]) == "the parameter " and pieces[-1] == "server"


def test_generate_text_streams_the_continuation_and_stops(tokenizer: Tokenizer) -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=300)
    trained = TrainedModel(init_model(config, seed=0), config, tokenizer)
    settings = SamplingSettings(max_new_tokens=40, temperature=0)
    full = generate_text(trained.model, trained.tokenizer, "the parameter", settings)
    assert full.tokens == 40 and full.stopped_by is None
    # The context fits block_size 32 for the steps that start from 32 - n + 1 tokens or less.
    n = len(tokenizer.encode("the parameter").ids)
    assert full.cached_steps == 32 - n + 1
    assert (
        sample(trained, "the parameter", max_tokens=40, temperature=0)
        == "the parameter" + full.text
    )
    stop = full.text[10:13]
    got: list[str] = []
    cut = generate_text(
        trained.model,
        trained.tokenizer,
        "the parameter",
        settings,
        stops=[stop],
        on_text=got.append,
    )
    assert cut.text == full.text[: full.text.index(stop)] == "".join(got)
    assert cut.stopped_by == stop and cut.tokens < 40


class EndsAtOnce(GPT):
    """A GPT whose likeliest next token is always the end-of-text token."""

    eot = 0

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss = super().forward(idx, targets, cache=cache)
        logits[..., self.eot] += 100.0
        return logits, loss


def test_generate_text_can_stop_at_the_end_of_text_token(tokenizer: Tokenizer) -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=300)
    model = EndsAtOnce(config)
    eot = tokenizer.token_to_id(EOT)
    assert eot is not None
    model.eot = eot
    trained = TrainedModel(model, config, tokenizer)
    settings = SamplingSettings(max_new_tokens=10, temperature=0)
    kept_on = generate_text(trained.model, trained.tokenizer, "the", settings)
    assert kept_on.tokens == 10 and kept_on.text == ""  # EOT decodes to nothing
    done = generate_text(trained.model, trained.tokenizer, "the", settings, stop_at_eot=True)
    assert done.stopped_by == EOT and done.tokens == 1 and done.text == ""


def test_unescape_turns_shell_escapes_into_characters() -> None:
    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape("Q:") == "Q:"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_runs_on_cuda_with_and_without_the_cache() -> None:
    model = init_model(CFG, seed=0).cuda()
    (idx,) = prompts(4)
    cached = generate(model, idx.cuda(), GREEDY)
    assert cached.device.type == "cuda" and cached.shape == (2, 28)
    assert torch.equal(
        cached,
        generate(
            model, idx.cuda(), SamplingSettings(max_new_tokens=24, temperature=0, use_cache=False)
        ),
    )
    drawn = generate(model, idx.cuda(), SamplingSettings(max_new_tokens=8, top_k=5, seed=0))
    assert torch.equal(
        drawn, generate(model, idx.cuda(), SamplingSettings(max_new_tokens=8, top_k=5, seed=0))
    )
