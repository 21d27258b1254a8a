"""`lmps train --task classify | sft` on the client (`lmps.client.finetune`): the rows built
from --data, the splits, the head of an --init-from model, how the results read."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

from lmps.client import finetune, preflight
from lmps.client.model_io import TrainedModel
from lmps.client.train import build_spec
from lmps.client.train_options import TrainOptions
from lmps.core import task_data, tasks
from lmps.core.data import train_tokenizer
from lmps.core.model import GPTConfig, init_model
from lmps.rpc import codec

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=300)


def write_jsonl(path: Path, rows: Sequence[Mapping[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def labelled(tmp_path: Path, n: int = 40) -> str:
    rows = [
        {"text": f"example number {i} is {'odd' if i % 2 else 'even'}", "label": i % 2}
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "labelled.jsonl", rows)


def chats(tmp_path: Path, n: int = 30) -> str:
    rows = [{"prompt": f"What is {i} plus one?", "completion": f"{i + 1}."} for i in range(n)]
    return write_jsonl(tmp_path / "chats.jsonl", rows)


def test_classify_rows_split_deterministically_with_the_train_labels(tmp_path: Path) -> None:
    opts = TrainOptions(task="classify", data=labelled(tmp_path), eval_fraction=0.25)
    first = finetune.prepare(opts, block_size=16, tokenizer=None, vocab_size=300)
    again = finetune.prepare(opts, block_size=16, tokenizer=None, vocab_size=300)
    assert torch.equal(first.train, again.train) and torch.equal(first.eval, again.eval)
    assert first.labels == ("0", "1")  # numeric labels, in numeric order
    assert (first.train_examples, first.eval_examples) == (30, 10)
    rows = first.train.view(-1, 17)
    config = GPTConfig(**{**CONFIG.__dict__, "block_size": 16, "num_labels": 2})
    tasks.TASKS["classify"].check(rows, config)  # the wire's layout, as the coordinator checks
    assert sum(first.eval_counts) == 10
    assert first.baseline == max(first.eval_counts) / 10
    assert "30 train / 10 eval examples, 2 classes" in first.summary


def test_classify_refuses_one_class_and_an_eval_label_not_in_train(tmp_path: Path) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "a"} for i in range(9)])
    with pytest.raises(ValueError, match=f"^--data {one} \\(train split\\): .*at least 2 classes"):
        finetune.prepare(TrainOptions(task="classify", data=one), 16, None, 300)
    texts = [f"text {i}" for i in range(20)]
    labels = ["ab"[i % 2] for i in range(20)]
    # A lone "c" whose text hashes into the eval split (the split depends on the text only).
    rare = next(
        t
        for t in (f"the only c, take {k}" for k in range(1000))
        if task_data.split_labelled([*texts, t], [*labels, "c"], 0.5)[3].count("c")
    )
    rows = [{"text": t, "label": y} for t, y in zip([*texts, rare], [*labels, "c"], strict=True)]
    source = write_jsonl(tmp_path / "rare.jsonl", rows)
    opts = TrainOptions(task="classify", data=source, eval_fraction=0.5)
    with pytest.raises(
        ValueError, match=re.escape(f"--data {source} (eval split): label(s) ['c']")
    ):
        finetune.prepare(opts, 16, None, 300)


def test_sft_rows_mask_the_prompt_and_split_deterministically(tmp_path: Path) -> None:
    opts = TrainOptions(task="sft", data=chats(tmp_path), eval_fraction=0.2)
    data = finetune.prepare(opts, block_size=32, tokenizer=None, vocab_size=300)
    assert (data.train_examples, data.eval_examples) == (24, 6)
    rows = data.train.view(-1, 33)
    config = GPTConfig(**{**CONFIG.__dict__, "vocab_size": data.tokenizer.get_vocab_size()})
    tasks.TASKS["sft"].check(rows, config)
    assert bool((rows < 0).any()) and bool((rows[:, 1:] >= 0).any(dim=1).all())
    assert torch.equal(finetune.prepare(opts, 32, None, 300).eval, data.eval)
    assert "24 train / 6 eval conversations" in data.summary


def test_init_from_keeps_the_backbone_and_draws_the_head_from_the_seed() -> None:
    base_model = init_model(CONFIG, seed=0)
    tok = train_tokenizer(["some text"], 300)
    base = TrainedModel(base_model, CONFIG, tok)
    opts = TrainOptions(task="classify", data="x.jsonl")
    spec = build_spec(opts, 300, "", labels=("a", "b", "c"), config=CONFIG)
    config = codec.model_from_proto(spec.model)
    init, how = finetune.initial_weights(base, config, ("a", "b", "c"), seed=5)
    again, _ = finetune.initial_weights(base, config, ("a", "b", "c"), seed=5)
    other, _ = finetune.initial_weights(base, config, ("a", "b", "c"), seed=6)
    expected = {n for n, _ in init_model(config, 0).named_parameters()}
    assert set(init) == expected  # every parameter: the coordinator requires them all
    for name, p in base_model.named_parameters():
        assert torch.equal(init[name], p.detach()), name
    head = init["score.weight"]
    assert head.shape == (3, CONFIG.n_embd) and "new 3-class head" in how
    assert torch.equal(head, again["score.weight"]) and not torch.equal(head, other["score.weight"])
    assert 0.01 < float(head.std()) < 0.04  # N(0, 0.02)
    # A classifier trained on the same classes keeps its head; an LM job drops it.
    classifier = TrainedModel(
        init_model(config, 1), config, tok, task="classify", labels=("a", "b", "c")
    )
    kept, how = finetune.initial_weights(classifier, config, ("a", "b", "c"), seed=5)
    assert torch.equal(kept["score.weight"], classifier.model.score.weight.detach())  # type: ignore[union-attr]
    assert "own head" in how
    lm = finetune.task_config(config, TrainOptions(), ())
    dropped, how = finetune.initial_weights(classifier, lm, (), seed=5)
    assert "score.weight" not in dropped and how == ""
    # Without --pooling, a classifier keeps its own pooling.
    mean = GPTConfig(**{**config.__dict__, "pooling": "mean"})
    assert finetune.task_config(mean, opts, ("a", "b", "c")).pooling == "mean"


def test_results_read_accuracy_against_the_majority_baseline() -> None:
    confusion = [5, 1, 0, 2, 0, 2, 0, 0, 0]  # rows: true a (6), b (4), c (0)
    results = finetune.Results("classify", ("a", "b", "c"))
    assert finetune.majority_baseline(confusion, results.labels) == 0.6
    text = results.eval_text(0.5, 1.6, 0.7, 0.55, confusion)
    assert (
        text
        == "eval loss 0.5000 per example, accuracy 70.0% (majority class 60.0%), macro-F1 0.550"
    )
    fields = results.fields(0.7, 0.55, confusion)
    assert fields["eval_confusion"] == {
        "labels": ["a", "b", "c"],
        "rows": [[5, 1, 0], [2, 0, 2], [0, 0, 0]],
    }
    assert fields["majority_baseline"] == 0.6
    assert (
        finetune.Results("sft").eval_text(1.0, 2.7)
        == "eval loss 1.0000 over response tokens (ppl 2.7)"
    )
    assert finetune.Results("sft").fields(0, 0, ()) == {}
    with pytest.raises(ValueError, match="9 counts for 2 classes"):
        finetune.confusion_rows(confusion, ("a", "b"))
    table = finetune.confusion_table(confusion, results.labels)
    assert [c.header for c in table.columns] == ["true class", "0", "1", "2", "recall"]


def test_check_corpus_counts_examples_for_row_tasks() -> None:
    opts = TrainOptions(task="classify", data="x.jsonl", batch_size=4)
    spec = build_spec(opts, 300, "", labels=("a", "b"), config=CONFIG)
    width = CONFIG.block_size + 1
    preflight.check_corpus(opts, spec, torch.zeros(4 * width, dtype=torch.int32))
    too_few = r"^--data x\.jsonl has 3 training examples, too few"
    with pytest.raises(preflight.Refused, match=too_few):
        preflight.check_corpus(opts, spec, torch.zeros(3 * width, dtype=torch.int32))
