"""Hugging Face interop for classifiers, against the real `transformers` (nothing
downloaded): a model fine-tuned with `--task classify` exports to a
`GPT2ForSequenceClassification` folder that loads without missing or unexpected keys, with
its labels as id2label, and gives `GPT.classify`'s logits on the text's ids + EOT; batches
follow the documented padding rule; mean pooling is refused in one line; `--init-from
hf:DIR` gives the classifier back (task, labels, score)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lmps.client import hf_io, model_io
from lmps.core import hf
from lmps.core.data import EOT
from lmps.core.model import GPT, GPTConfig
from tests.hf_models import (
    assert_no_loading_issues,
    close,
    far_lmps_model,
    hf_logits,
    load_quietly,
    make_hf_dir,
    report_logits_diffs,  # noqa: F401 (autouse: prints the worst differences)
)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2ForSequenceClassification  # noqa: E402

LABELS = ("negative", "neutral", "positive")
SENTENCES = [
    "The for statement is used to iterate over the elements of a sequence",
    "while",
    "unicode: über café 🦊 and a with statement",
    "The try statement specifies exception handlers and/or cleanup code",
]


def classifier(
    tie: bool = True, activation: str = "gelu_tanh", pooling: str = "last"
) -> model_io.TrainedModel:
    """A small random classifier as `--task classify` leaves it, weights far from the init."""
    trained = far_lmps_model(
        7,
        block_size=64,
        tie_embeddings=tie,
        activation=activation,
        num_labels=len(LABELS),
        pooling=pooling,
    )
    return dataclasses.replace(trained, task="classify", labels=LABELS)


def lmps_ids(trained: model_io.TrainedModel, text: str) -> list[int]:
    """What lmps feeds the head: the text's ids, then EOT."""
    assert trained.tokenizer is not None
    eot = trained.tokenizer.token_to_id(EOT)
    assert eot is not None
    return [*trained.tokenizer.encode(text).ids, eot]


def lmps_classify(model: GPT, rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    idx = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model.eval().classify(idx, torch.tensor([len(r) for r in rows]))


@pytest.mark.parametrize(
    ("tie", "activation"), [(True, "gelu_tanh"), (True, "gelu"), (False, "gelu_tanh")]
)
def test_export_is_a_gpt2_sequence_classifier_with_lmps_logits(
    tmp_path: Path, tie: bool, activation: str
) -> None:
    trained = classifier(tie, activation)
    out = tmp_path / "hf"
    hf_io.save(trained, out)
    loaded, info, said = load_quietly(GPT2ForSequenceClassification, out)
    assert_no_loading_issues(info)
    assert said == []
    assert "lm_head.weight" not in loaded.state_dict()
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"]
    assert saved["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert saved["label2id"] == {name: i for i, name in enumerate(LABELS)}
    assert saved.get("pad_token_id") is None
    assert loaded.config.num_labels == len(LABELS)
    assert loaded.config.id2label == dict(enumerate(LABELS))
    torch.testing.assert_close(loaded.score.weight, trained.model.score.weight)  # type: ignore[union-attr]
    auto = AutoTokenizer.from_pretrained(str(out))
    for text in SENTENCES:
        ids = lmps_ids(trained, text)
        # transformers' tokenizer gives the same ids when the text ends in <|endoftext|>.
        assert list(auto(text + EOT)["input_ids"]) == ids
        close(
            f"export classify ({activation}, tied {tie})",
            hf_logits(loaded, torch.tensor([ids])),
            lmps_classify(trained.model, [ids]),
        )


def test_batches_follow_the_padding_rule(tmp_path: Path) -> None:
    """pad_token_id None: one row at a time, exact. Batches: right-pad after each row's EOT
    with any id but EOT's and name it pad_token_id. Padding with EOT reads the wrong token."""
    trained = classifier()
    hf_io.save(trained, tmp_path / "hf")
    loaded = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
    rows = [lmps_ids(trained, text) for text in SENTENCES]
    want = lmps_classify(trained.model, rows)
    width = max(map(len, rows))
    with pytest.raises(ValueError, match="batch sizes > 1"):
        hf_logits(loaded, torch.tensor([r + [5] * (width - len(r)) for r in rows]))
    eot = trained.tokenizer.token_to_id(EOT)  # type: ignore[union-attr]
    for pad in (5, trained.config.vocab_size - 1):  # any id but EOT's, even one in the texts
        assert pad != eot
        loaded.config.pad_token_id = pad
        idx = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        close("batched, right-padded", hf_logits(loaded, idx), want)
        mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
        with torch.no_grad():
            masked = loaded.eval()(idx, attention_mask=mask).logits
        close("batched, right-padded, attention_mask", masked, want)
    loaded.config.pad_token_id = eot  # GPT-2's habit (pad = eos): skips the row's own EOT
    idx = torch.tensor([r + [eot] * (width - len(r)) for r in rows])
    assert not torch.allclose(hf_logits(loaded, idx), want)


def test_mean_pooling_has_no_hugging_face_form(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        hf_io.save(classifier(pooling="mean"), tmp_path / "o")
    text = str(err.value)
    assert "\n" not in text
    assert "cannot export to Hugging Face" in text and "'mean'" in text, text
    assert "--format lmps" in text, text
    assert not (tmp_path / "o").exists()


def test_labels_that_do_not_fit_the_head_are_refused(tmp_path: Path) -> None:
    trained = classifier()
    trained.labels = ("a", "b")
    with pytest.raises(ValueError, match="needs 3 distinct labels, got 2") as err:
        hf_io.save(trained, tmp_path / "o")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()
    # No labels recorded: transformers' default names.
    trained.labels = ()
    hf_io.save(trained, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


@pytest.mark.parametrize("tie", [True, False])
def test_init_from_an_exported_classifier_gives_it_back(tmp_path: Path, tie: bool) -> None:
    trained = classifier(tie)
    hf_io.save(trained, tmp_path / "hf")
    back = model_io.load_init(f"hf:{tmp_path / 'hf'}")
    assert back.task == "classify"
    assert back.labels == LABELS
    assert back.config == trained.config
    mine = dict(trained.model.named_parameters())
    theirs = dict(back.model.named_parameters())
    assert set(theirs) == set(mine)
    for name, value in mine.items():
        if name != "lm_head.weight":  # a classifier folder has no LM head
            assert torch.equal(theirs[name], value), name
    if not tie:  # the untied LM head classify never uses starts as the embedding
        assert torch.equal(theirs["lm_head.weight"], theirs["transformer.wte.weight"])
    rows = [lmps_ids(trained, text) for text in SENTENCES]
    close("import back", lmps_classify(back.model, rows), lmps_classify(trained.model, rows))
    # And on as an lmps run folder: task.json keeps task and labels.
    model_io.save(back, tmp_path / "run")
    again = model_io.load(tmp_path / "run")
    assert (again.task, again.labels) == ("classify", LABELS)


def test_init_from_a_transformers_classifier_gives_its_logits(tmp_path: Path) -> None:
    """A GPT2ForSequenceClassification built and saved by transformers (random weights,
    GPT-2-style tokenizer with EOT last): lmps' classify equals its logits."""
    path = make_hf_dir(
        tmp_path / "m", activation="gelu_pytorch_tanh", dropout=0.0, n_positions=64, seed=3
    )
    fields = json.loads((path / "config.json").read_text())
    config = transformers.GPT2Config(
        **{**fields, "architectures": ["GPT2ForSequenceClassification"]},
        id2label={0: "ham", 1: "spam"},
        label2id={"ham": 0, "spam": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = GPT2ForSequenceClassification(config)
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
    reference.save_pretrained(str(path))
    trained = model_io.load_init(f"hf:{path}")
    assert (trained.task, trained.labels, trained.config.num_labels) == (
        "classify",
        ("ham", "spam"),
        2,
    )
    for text in SENTENCES:
        ids = lmps_ids(trained, text)
        close(
            "import transformers' classifier",
            lmps_classify(trained.model, [ids]),
            hf_logits(reference, torch.tensor([ids])),
        )


def test_only_the_architecture_makes_a_classifier() -> None:
    """Every config.json has id2label (transformers 4 wrote LABEL_0/LABEL_1 into language
    models' too): architectures decides. A one-class head (regression) is refused."""
    lm = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=300).to_dict()
    lm.update(id2label={"0": "LABEL_0", "1": "LABEL_1"}, architectures=["GPT2LMHeadModel"])
    assert hf.from_hf_config(lm).num_labels == 0
    assert hf.labels_from_hf(lm) == ()
    cls = {**lm, "architectures": ["GPT2ForSequenceClassification"]}
    assert hf.from_hf_config(cls).num_labels == 2
    assert hf.labels_from_hf(cls) == ("LABEL_0", "LABEL_1")
    for bad, needle in (
        ({"0": "x"}, "regression"),
        ({"0": "x", "2": "y"}, "not 0 .. 1"),
        ({"a": "x", "b": "y"}, "not an integer"),
    ):
        with pytest.raises(ValueError, match=needle):
            hf.from_hf_config({**cls, "id2label": bad})


def test_the_table_names_a_classifiers_parameters() -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, num_labels=4)
    assert set(hf.param_layout(config)) == {n for n, _ in GPT(config).named_parameters()}
    hf_model = GPT2ForSequenceClassification(
        transformers.GPT2Config(**hf.to_hf_config(config, labels=("a", "b", "c", "d")))
    )
    converted = hf.to_hf(dict(GPT(config).named_parameters()), config)
    assert {n: tuple(t.shape) for n, t in converted.items()} == {
        n: tuple(t.shape) for n, t in hf_model.state_dict().items()
    }
    assert hf.architecture(config) == "GPT2ForSequenceClassification"
