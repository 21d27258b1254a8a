"""lmps GPT <-> Hugging Face GPT-2 (`transformers.GPT2LMHeadModel`): parameter names and
layouts in one table, both directions, and the model config.

The architectures are the same network (nanoGPT copied GPT-2's layout and names): pre-LN
blocks, LayerNorm eps 1e-5, attention scaled by 1/sqrt(head size) under a causal mask, an
MLP of width 4C, biases everywhere, learned positions, a tied output head. What differs:

- GPT-2 stores every projection as a `Conv1D` whose weight is (in, out); lmps uses
  `nn.Linear`, (out, in). Those four weights per block are transposed (`TRANSPOSED`).
- The tied head: lmps' `named_parameters()` lists the shared matrix once, as
  `transformer.wte.weight`; GPT-2's state dict also has `lm_head.weight` (the same tensor,
  left out of its saved files).
- The activation: GPT-2 uses the tanh GELU; lmps' `GPTConfig.activation` names it
  "gelu_tanh" and computes it with torch's fused kernel, which transformers calls
  "gelu_pytorch_tanh" (`ACTIVATION_TO_HF`: exports are exact). GPT-2's own checkpoints say
  "gelu_new", the same formula written out in elementwise ops: imported as "gelu_tanh", equal
  up to rounding.
- Config keys: `block_size` is `n_positions`, one `dropout` is GPT-2's three `*_pdrop`.

A classifier (`GPTConfig.num_labels` >= 2, the `score` head) is a
`transformers.GPT2ForSequenceClassification`: the same trunk, the same bias-free
`score.weight` (num_labels, C), no `lm_head`. Its labels are config.json's `id2label` /
`label2id`, and `architectures` (["GPT2ForSequenceClassification"]) is what tells one apart
on import. Pooling:

- lmps' "last" feeds the text's ids followed by <|endoftext|> and reads the last position.
  GPT2ForSequenceClassification reads the rightmost position whose id is not
  `config.pad_token_id`, or simply the last one when that is None. Exports say None, so an
  unpadded input (text ids + EOT) gives `GPT.classify`'s logits exactly; transformers then
  refuses batches of more than one row ("Cannot handle batch sizes > 1 if no padding token
  is defined"). For batches, right-pad each row after its EOT with any id other than EOT's
  and set `model.config.pad_token_id` to that id: the rightmost non-pad position is then
  each row's EOT, and causal attention keeps padding from changing it (tested). Never pad
  with EOT itself (GPT-2's usual pad = eos): the row's own EOT would count as padding and
  the head would read the token before it. Left padding shifts the positions: not exact.
- lmps' "mean" has no GPT2ForSequenceClassification form: refused on export.
- An imported classifier's `pad_token_id` is not used: lmps always reads the EOT it
  appends, so a model fine-tuned in transformers with pad = eos (which read the last text
  token) is fine-tuned on from a slightly different pooled state.

Pure torch: `transformers` is imported only by `lmps.client.hf_io`, which reads and writes
the directories (`save_pretrained` / `from_pretrained`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lmps.core.model import Activation, GPTConfig

BLOCK_PARAMS: dict[str, bool] = {
    # name inside transformer.h.N (the same on both sides) -> transposed (Conv1D vs Linear)
    "ln_1.weight": False,
    "ln_1.bias": False,
    "attn.c_attn.weight": True,  # lmps (3C, C), GPT-2 (C, 3C)
    "attn.c_attn.bias": False,
    "attn.c_proj.weight": True,  # (C, C), transposed all the same
    "attn.c_proj.bias": False,
    "ln_2.weight": False,
    "ln_2.bias": False,
    "mlp.c_fc.weight": True,  # lmps (4C, C), GPT-2 (C, 4C)
    "mlp.c_fc.bias": False,
    "mlp.c_proj.weight": True,  # lmps (C, 4C), GPT-2 (4C, C)
    "mlp.c_proj.bias": False,
}
"""The one table: every per-block parameter and whether its layout differs."""

TRUNK_PARAMS = ("transformer.wte.weight", "transformer.wpe.weight")
FINAL_PARAMS = ("transformer.ln_f.weight", "transformer.ln_f.bias")
HEAD = "lm_head.weight"
SCORE = "score.weight"
"""The classification head: the same name and (num_labels, C) layout on both sides."""

LM_ARCHITECTURE = "GPT2LMHeadModel"
CLASSIFIER_ARCHITECTURE = "GPT2ForSequenceClassification"

HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers older GPT-2 checkpoints carry; not weights, ignored on import."""

ACTIVATION_TO_HF: dict[str, str] = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
"""lmps activation -> GPT2Config.activation_function computed by the same torch kernel
(`F.gelu(x)`, `F.gelu(x, approximate="tanh")`), so an exported model's logits are lmps'."""

ACTIVATION_FROM_HF: dict[str, Activation] = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
"""GPT2Config.activation_function values lmps can run, and what it calls them ("gelu_new"
and "gelu_fast" are the tanh formula in elementwise ops: equal to torch's up to rounding)."""

LAYER_NORM_EPS = 1e-5
"""lmps' LayerNorm eps (torch's default), which is also GPT-2's."""

HF_DEFAULTS: dict[str, Any] = {
    # GPT2Config's defaults for the keys read here, for a config.json that leaves them out.
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "vocab_size": 50257,
}


def param_layout(config: GPTConfig) -> dict[str, bool]:
    """Every lmps parameter name (as `named_parameters()` lists them) -> transposed on the
    GPT-2 side; `lm_head.weight` only when the head is not tied, `score.weight` only for a
    classifier."""
    names = dict.fromkeys(TRUNK_PARAMS, False)
    for i in range(config.n_layer):
        names.update({f"transformer.h.{i}.{n}": t for n, t in BLOCK_PARAMS.items()})
    names.update(dict.fromkeys(FINAL_PARAMS, False))
    if not config.tie_embeddings:
        names[HEAD] = False
    if config.num_labels:
        names[SCORE] = False
    return names


def architecture(config: GPTConfig) -> str:
    """The transformers class of the model's Hugging Face form: `GPT2ForSequenceClassification`
    for a classifier, `GPT2LMHeadModel` otherwise."""
    return CLASSIFIER_ARCHITECTURE if config.num_labels else LM_ARCHITECTURE


def to_hf(params: Mapping[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """lmps parameters (`named_parameters()` or `state_dict()`) -> the state dict of
    `architecture(config)`: a `GPT2LMHeadModel`'s with `lm_head.weight` (the wte matrix when
    tied), or a classifier's `GPT2ForSequenceClassification` one: the trunk and
    `score.weight`, no LM head (a classifier never uses it; an untied one is left out).
    Raises ValueError when the model has no GPT-2 form (no biases, mean pooling) or a name
    is missing."""
    if not config.bias:
        raise ValueError(
            "the model has no biases (bias false): GPT-2 has them in every layer, so it has "
            "no Hugging Face GPT-2 form"
        )
    if config.num_labels and config.pooling != "last":
        raise ValueError(
            f"the classifier pools by {config.pooling!r}: {CLASSIFIER_ARCHITECTURE} reads the "
            "last token only, so it has no Hugging Face form (train with --pooling last, or "
            "export with --format lmps)"
        )
    layout = param_layout(config)
    missing = sorted(set(layout) - set(params))
    if missing:
        raise ValueError(f"parameters missing: {', '.join(missing[:3])}")
    out = {n: _layout(params[n], t) for n, t in layout.items()}
    if config.num_labels:
        out.pop(HEAD, None)
    else:
        out[HEAD] = out[HEAD] if HEAD in out else out["transformer.wte.weight"]
    return out


def from_hf(state: Mapping[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """A `GPT2LMHeadModel` (or `GPT2Model`: no `transformer.` prefix) state dict, or for a
    classifier config a `GPT2ForSequenceClassification` one -> lmps parameters by name, fp32,
    in lmps' layout. A classifier has no LM head: an untied lmps one (never used by
    classify) starts as a copy of the token embedding. Raises ValueError naming the first
    missing, unexpected or misshapen tensor."""
    state = {
        n if n.startswith(("transformer.", HEAD, SCORE)) else f"transformer.{n}": v
        for n, v in state.items()
        if not n.endswith(HF_BUFFERS)
    }
    layout = param_layout(config)
    optional = {HEAD} if config.num_labels else set()
    missing = sorted(set(layout) - set(state) - optional)
    extra = sorted(set(state) - set(layout) - {HEAD})
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else ""
        what += ("; " if what else "") + (f"unexpected {', '.join(extra[:3])}" if extra else "")
        raise ValueError(f"not a GPT-2 state dict of this shape: {what}")
    out = {n: _layout(state[n], t).float() for n, t in layout.items() if n in state}
    if HEAD in layout and HEAD not in out:
        out[HEAD] = out["transformer.wte.weight"].clone()
    want = expected_shapes(config)
    for name, value in out.items():
        if tuple(value.shape) != want[name]:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} where the config implies {want[name]}"
            )
    return out


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """lmps parameter name -> its shape, from the config alone (no model built)."""
    C, V = config.n_embd, config.vocab_size
    block = {
        "ln_1.weight": (C,),
        "ln_1.bias": (C,),
        "attn.c_attn.weight": (3 * C, C),
        "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C),
        "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,),
        "ln_2.bias": (C,),
        "mlp.c_fc.weight": (4 * C, C),
        "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (C, 4 * C),
        "mlp.c_proj.bias": (C,),
    }
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (config.block_size, C),
        "transformer.ln_f.weight": (C,),
        "transformer.ln_f.bias": (C,),
        HEAD: (V, C),
    }
    if config.num_labels:
        shapes[SCORE] = (config.num_labels, C)
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{n}": s for n, s in block.items()})
    return shapes


def _layout(t: Tensor, transposed: bool) -> Tensor:
    return t.detach().t().contiguous() if transposed else t.detach()


def to_hf_config(
    config: GPTConfig, eot_id: int | None = None, labels: Sequence[str] = ()
) -> dict[str, Any]:
    """`transformers.GPT2Config` keyword arguments for `config`; `eot_id` (the tokenizer's
    <|endoftext|>) becomes bos and eos, as in GPT-2. A classifier's `labels` (class names,
    index = class id; empty: transformers' LABEL_0, LABEL_1, ...) become id2label and
    label2id, and its pad_token_id is None (see the module docstring). ValueError when the
    labels do not fit the head."""
    fields: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, lmps' MLP width
        "activation_function": ACTIVATION_TO_HF[config.activation],
        # lmps has one dropout probability for all three places GPT-2 names.
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "architectures": [architecture(config)],
    }
    if config.num_labels:
        names = list(labels) or [f"LABEL_{i}" for i in range(config.num_labels)]
        if len(names) != config.num_labels or len(set(names)) != len(names):
            raise ValueError(
                f"the {config.num_labels}-class head needs {config.num_labels} distinct labels, "
                f"got {len(names)} ({len(set(names))} distinct)"
            )
        fields.update(
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            problem_type="single_label_classification",
            # The last position is always the EOT lmps appends: no padding to skip.
            pad_token_id=None,
        )
    return fields


def is_classifier(fields: Mapping[str, Any]) -> bool:
    """Whether a GPT-2 config.json (as a dict) is a `GPT2ForSequenceClassification`'s (its
    `architectures`; every config has id2label, language models too)."""
    architectures = fields.get("architectures") or []
    return isinstance(architectures, list) and CLASSIFIER_ARCHITECTURE in architectures


def labels_from_hf(fields: Mapping[str, Any]) -> tuple[str, ...]:
    """A classifier config.json's class names in id order (its id2label; absent:
    transformers' default, LABEL_0 and LABEL_1); () for a language model. ValueError
    unless the ids are 0 .. n-1 and there are at least two."""
    if not is_classifier(fields):
        return ()
    id2label = fields.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"}
    if not isinstance(id2label, Mapping):
        raise ValueError("id2label is not an object of class id -> name")
    try:
        by_id = {int(i): str(name) for i, name in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError("id2label has a class id that is not an integer") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"id2label's class ids are not 0 .. {len(by_id) - 1}")
    if len(by_id) < 2:
        raise ValueError(
            f"id2label has {len(by_id)} class (regression?): lmps classifies into 2 or more"
        )
    return tuple(by_id[i] for i in range(len(by_id)))


def from_hf_config(fields: Mapping[str, Any]) -> GPTConfig:
    """A GPT-2 config.json (as a dict) -> GPTConfig; ValueError naming the first setting
    lmps' model cannot reproduce. Dropout is the largest of GPT-2's three. A
    GPT2ForSequenceClassification's gets its num_labels (`labels_from_hf`), pooling last."""
    model_type = fields.get("model_type")
    if model_type != "gpt2":
        raise ValueError(
            f"model_type {model_type!r} is not GPT-2: lmps imports GPT-2-family models "
            "(model_type gpt2) only"
        )

    def get(key: str) -> Any:
        value = fields.get(key, HF_DEFAULTS[key])
        return HF_DEFAULTS[key] if value is None and key != "n_inner" else value

    n_embd = int(get("n_embd"))
    activation = get("activation_function")
    refusals = {
        "activation_function": (
            activation not in ACTIVATION_FROM_HF,
            f"{activation!r} (lmps runs {', '.join(ACTIVATION_FROM_HF)})",
        ),
        "n_inner": (
            get("n_inner") not in (None, 4 * n_embd),
            f"{get('n_inner')} (lmps' MLP is 4 * n_embd = {4 * n_embd} wide)",
        ),
        "layer_norm_epsilon": (
            not math.isclose(float(get("layer_norm_epsilon")), LAYER_NORM_EPS, rel_tol=1e-6),
            f"{get('layer_norm_epsilon')} (lmps uses {LAYER_NORM_EPS})",
        ),
        "scale_attn_weights": (not get("scale_attn_weights"), "false (lmps scales by 1/sqrt(hs))"),
        "scale_attn_by_inverse_layer_idx": (
            bool(get("scale_attn_by_inverse_layer_idx")),
            "true (lmps does not scale by layer)",
        ),
        "add_cross_attention": (bool(get("add_cross_attention")), "true (lmps is decoder-only)"),
    }
    for key, (bad, why) in refusals.items():
        if bad:
            raise ValueError(f"{key} {why}: lmps cannot run this model exactly")
    dropout = max(float(get(k)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
    labels = labels_from_hf(fields)
    return GPTConfig(
        n_layer=int(get("n_layer")),
        n_head=int(get("n_head")),
        n_embd=n_embd,
        block_size=int(get("n_positions")),
        vocab_size=int(get("vocab_size")),
        dropout=dropout,
        bias=True,
        tie_embeddings=bool(get("tie_word_embeddings")),
        activation=ACTIVATION_FROM_HF[activation],
        num_labels=len(labels),  # 0: a language model
        pooling="last",
    )
