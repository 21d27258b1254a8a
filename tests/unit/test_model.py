"""Unit tests for lmps.core.model: config validation, presets, forward, init (generation and
the KV cache: test_generation.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmps.core.model import (
    GPT,
    MLP,
    PRESETS,
    GPTConfig,
    decay_mask,
    init_model,
    preset,
)

# Small enough that every test runs in milliseconds.
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- GPTConfig ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layer": 0}, "n_layer must be a positive int"),
        ({"n_head": -1}, "n_head must be a positive int"),
        ({"n_embd": 0}, "n_embd must be a positive int"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"n_layer": 2.0}, "n_layer must be a positive int"),
        ({"n_layer": True}, "n_layer must be a positive int"),
        ({"n_embd": 30, "n_head": 4}, r"n_embd \(30\) must be divisible by n_head \(4\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"activation": "relu"}, r"activation must be one of gelu, gelu_tanh, got 'relu'"),
    ],
)
def test_config_rejects_invalid_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **changes)  # type: ignore[arg-type]


def test_config_is_frozen_and_has_defaults() -> None:
    assert (CFG.dropout, CFG.bias, CFG.tie_embeddings) == (0.0, True, True)
    assert CFG.head_size == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.n_layer = 3  # type: ignore[misc]


# --- Presets -----------------------------------------------------------------------------


def test_presets_expected_shapes() -> None:
    shapes = {name: (c.n_layer, c.n_head, c.n_embd, c.block_size) for name, c in PRESETS.items()}
    assert shapes == {
        "tiny": (2, 4, 128, 128),
        "mini": (4, 4, 256, 256),
        "small": (6, 6, 384, 256),
        "gpt2": (12, 12, 768, 1024),
    }
    assert PRESETS["gpt2"].vocab_size == 50304


def test_preset_fills_in_vocab_size_without_touching_the_table() -> None:
    config = preset("tiny", 1000)
    assert config.vocab_size == 1000
    assert config == dataclasses.replace(PRESETS["tiny"], vocab_size=1000)
    assert PRESETS["tiny"].vocab_size != 1000
    assert preset("gpt2") == PRESETS["gpt2"]


def test_activation_defaults_to_exact_gelu_except_for_the_gpt2_preset() -> None:
    assert {name: c.activation for name, c in PRESETS.items()} == {
        "tiny": "gelu",
        "mini": "gelu",
        "small": "gelu",
        "gpt2": "gelu_tanh",  # GPT-2's own, so that it exports to Hugging Face exactly
    }
    assert CFG.activation == "gelu"


def test_activation_is_the_mlp_nonlinearity() -> None:
    x = torch.linspace(-4, 4, 101)
    for name, want in (
        ("gelu", torch.nn.functional.gelu(x)),
        ("gelu_tanh", torch.nn.functional.gelu(x, approximate="tanh")),
    ):
        mlp = MLP(dataclasses.replace(CFG, activation=name))  # type: ignore[arg-type]
        assert torch.equal(mlp.act(x), want), name
    # Same weights, the other activation: different logits (the option is wired in); the
    # state dict is the same (an activation has no parameters).
    exact = init_model(CFG, seed=3)
    tanh = init_model(dataclasses.replace(CFG, activation="gelu_tanh"), seed=3)
    assert exact.state_dict().keys() == tanh.state_dict().keys()
    with torch.no_grad():
        for p in (*exact.parameters(), *tanh.parameters()):
            p.mul_(20)  # large pre-activations, where the two GELUs differ most
    idx = torch.arange(16).view(1, 16)
    assert not torch.allclose(exact(idx)[0], tanh(idx)[0])


def test_preset_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*gpt2, mini, small, tiny"):
        preset("huge", 100)


def test_preset_invalid_vocab_size_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        preset("tiny", 0)


def test_gpt2_preset_has_124m_parameters() -> None:
    # The meta device allocates no storage, so building GPT-2 costs nothing here.
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    # 124,475,904 with tied embeddings and the padded 50304 vocabulary (nanoGPT's number).
    assert model.num_params() == 124_475_904


def test_tiny_preset_parameter_count_matches_formula() -> None:
    c = preset("tiny", 2048)
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd  # attn + mlp weights and biases + 2 LNs
    expected = (c.vocab_size + c.block_size) * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    with torch.device("meta"):
        assert GPT(c).num_params() == expected == 675_328


# --- Forward -----------------------------------------------------------------------------


def test_forward_shapes_and_loss_at_init_is_about_ln_vocab() -> None:
    model = init_model(CFG, seed=0)
    idx = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator())
    logits, loss = model(idx)
    assert logits.shape == (4, CFG.block_size, CFG.vocab_size)
    assert loss is None
    logits, loss = model(idx, torch.roll(idx, -1, dims=1))
    assert loss is not None and loss.shape == ()
    # Small init => nearly uniform predictions => cross-entropy close to ln(V).
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1


def test_forward_accepts_int32_and_matches_int64() -> None:
    model = init_model(CFG, seed=0)
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    logits64, loss64 = model(idx, idx)
    logits32, loss32 = model(idx.int(), idx.int())
    torch.testing.assert_close(logits32, logits64)
    assert loss32 is not None and loss64 is not None
    torch.testing.assert_close(loss32, loss64)


def test_forward_rejects_sequences_longer_than_block_size() -> None:
    model = init_model(CFG, seed=0)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))


def test_attention_is_causal() -> None:
    model = init_model(CFG, seed=0)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % CFG.vocab_size
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=0)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_dropout_active_only_in_training() -> None:
    model = init_model(dataclasses.replace(CFG, dropout=0.5), seed=0)
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


# --- Initialisation ----------------------------------------------------------------------


def test_init_model_is_deterministic_and_seed_dependent() -> None:
    a, b, c = _params(init_model(CFG, 1)), _params(init_model(CFG, 1)), _params(init_model(CFG, 2))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_init_model_ignores_and_preserves_global_rng() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _params(init_model(CFG, 7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # a different global state must not change the weights
    second = _params(init_model(CFG, 7))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_init_follows_gpt2_scheme() -> None:
    config = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=512)
    params = dict(init_model(config, seed=0).named_parameters())
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(p == 1), name
        elif name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


def test_tied_weights_listed_once() -> None:
    tied = init_model(CFG, seed=0)
    names = [name for name, _ in tied.named_parameters()]
    assert len(names) == len(set(names))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert tied.lm_head.weight is tied.transformer.wte.weight

    untied = init_model(dataclasses.replace(CFG, tie_embeddings=False), seed=0)
    untied_names = [name for name, _ in untied.named_parameters()]
    assert "lm_head.weight" in untied_names
    assert untied.num_params() == tied.num_params() + CFG.vocab_size * CFG.n_embd


def test_no_bias_config_has_no_biases() -> None:
    model = init_model(dataclasses.replace(CFG, bias=False), seed=0)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, CFG.vocab_size)


def test_decay_mask_selects_matrices_only() -> None:
    model = init_model(CFG, seed=0)
    decayed = {name for name, p in model.named_parameters() if decay_mask(name, p)}
    assert "transformer.wte.weight" in decayed
    assert "transformer.wpe.weight" in decayed
    assert "transformer.h.0.attn.c_attn.weight" in decayed
    assert "transformer.h.0.attn.c_attn.bias" not in decayed
    assert "transformer.ln_f.weight" not in decayed
    assert all(p.ndim >= 2 for name, p in model.named_parameters() if name in decayed)


# --- Training ----------------------------------------------------------------------------


def test_adamw_overfits_a_tiny_batch() -> None:
    model = init_model(CFG, seed=0)
    data = torch.randint(0, CFG.vocab_size, (2, CFG.block_size + 1), generator=torch.Generator())
    x, y = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(x, y)
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5
    assert losses[-1] < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_like_on_cpu() -> None:
    model = init_model(CFG, seed=0)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    cpu_logits, cpu_loss = model(idx, idx)
    cuda_model = init_model(CFG, seed=0).cuda()
    logits, loss = cuda_model(idx.cuda(), idx.cuda())
    torch.testing.assert_close(logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    assert loss is not None and cpu_loss is not None
    loss.backward()
