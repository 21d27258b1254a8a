"""`lmps predict` and `lmps chat` without a terminal or a cluster, on tiny random models
saved and loaded as `lmps train --out` does: the probabilities are a distribution whose
argmax is the label, equal to `GPT.classify` on the rows training builds; a chat's second
prompt holds its first turn, the oldest turns go when the window is full, and a reply stops
at end-of-text and at the next role marker. (The real `lmps` processes:
tests/service/test_predict_chat_cli.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer

from lmps.client import model_io
from lmps.client.chat import Chat, Trimmed, check_chat_model, fit, reply_budget, session
from lmps.client.model_io import TrainedModel
from lmps.client.predict import (
    Text,
    check_classifier,
    check_texts,
    encode,
    predict,
    probabilities,
    show,
    texts_from_lines,
    to_json,
)
from lmps.core.data import EOT, train_tokenizer
from lmps.core.generation import SamplingSettings
from lmps.core.model import GPT, GPTConfig, KVCache, init_model
from lmps.core.task_data import Message, classify_rows, prompt_ids

CORPUS = [
    "a fine film with a warm heart and a clever plot",
    "dull and long; the plot goes nowhere and the actors look bored",
    "the parameter server holds shards; workers pull and push gradients",
] * 20
LABELS = ("negative", "neutral", "positive")
TEXTS = [
    "a fine film",
    "dull and long",
    "x",
    "the parameter server holds shards of every tensor " * 6,  # longer than block_size
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS, 300)


def tiny(tokenizer: Tokenizer, **kw: object) -> GPTConfig:
    fields: dict[str, object] = dict(
        n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.get_vocab_size()
    )
    fields.update(kw)
    return GPTConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def classifier(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """A random 3-class classifier, saved and loaded back."""
    config = tiny(tokenizer, num_labels=3)
    out = tmp_path_factory.mktemp("predict") / "model"
    trained = TrainedModel(init_model(config, 1), config, tokenizer, task="classify", labels=LABELS)
    model_io.save(trained, out)
    loaded = model_io.load(out)
    assert loaded.task == "classify" and loaded.labels == LABELS
    return loaded


def test_probabilities_are_a_distribution_and_the_label_their_argmax(
    classifier: TrainedModel,
) -> None:
    result = predict(classifier, [Text(t, f"text {i}") for i, t in enumerate(TEXTS)])
    found = result.items
    assert result.truncated == 1  # the long one, cut as training cuts it
    probs = probabilities(classifier, encode(classifier, TEXTS).rows)
    assert probs.shape == (len(TEXTS), 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(TEXTS)))
    for p, row in zip(found, probs, strict=True):
        assert p.label == LABELS[int(row.argmax())] == p.probs[0][0]
        assert sorted(name for name, _ in p.probs) == sorted(LABELS)
        values = [v for _, v in p.probs]
        assert values == sorted(values, reverse=True)
        assert dict(p.probs) == pytest.approx({LABELS[i]: float(row[i]) for i in range(3)})


def test_the_same_as_classify_on_the_rows_training_builds(classifier: TrainedModel) -> None:
    assert classifier.tokenizer is not None
    rows = classify_rows(
        classifier.tokenizer, TEXTS, [LABELS[0]] * len(TEXTS), list(LABELS), 32
    ).rows.long()
    classifier.model.eval()
    with torch.no_grad():
        # One row at a time, each only as wide as its text: no batching, no padding.
        expected = torch.cat(
            [
                torch.softmax(classifier.model.classify(r[None, 2 : 2 + int(r[1])], r[None, 1]), -1)
                for r in rows
            ]
        )
    torch.testing.assert_close(probabilities(classifier, rows), expected)
    eot = classifier.tokenizer.token_to_id(EOT)
    assert all(int(r[1 + int(r[1])]) == eot for r in rows)  # each text ends with EOT


def test_only_a_classifier_predicts(tokenizer: Tokenizer) -> None:
    config = tiny(tokenizer)
    lm = TrainedModel(GPT(config), config, tokenizer)
    with pytest.raises(ValueError) as err:
        check_classifier(lm, "runs/lm")
    assert str(err.value) == (
        "runs/lm was trained with --task lm: `lmps predict` needs a --task classify model; "
        "use `lmps generate`"
    )
    with pytest.raises(ValueError, match="use `lmps chat`"):
        check_classifier(TrainedModel(GPT(config), config, tokenizer, task="sft"), "runs/sft")


def test_texts_from_lines_and_their_errors() -> None:
    lines = ['{"text": "good", "label": 2}\n', "\n", "plain {text}\n", '{"text": "meh"}\r\n']
    got = texts_from_lines(lines, "in.txt")
    assert got == [
        Text("good", "in.txt line 1", "2"),
        Text("plain {text}", "in.txt line 3"),
        Text("meh", "in.txt line 4"),
    ]
    assert texts_from_lines(["{not json\n"], "in.txt") == [Text("{not json", "in.txt line 1")]
    with pytest.raises(ValueError, match=r"^in.jsonl line 2: not valid JSON"):
        texts_from_lines(['{"text": "a"}', "{oops"], "in.jsonl", json_only=True)
    with pytest.raises(ValueError, match=r'^in.jsonl line 1: expected \{"text"'):
        texts_from_lines(['{"label": 1}'], "in.jsonl", json_only=True)
    with pytest.raises(ValueError, match=r"^text 2 is empty"):
        check_texts([Text("a", "text 1"), Text("  ", "text 2")])
    with pytest.raises(ValueError, match=r"^no text to classify"):
        check_texts([])


def test_output_json_lines_and_table(classifier: TrainedModel) -> None:
    found = predict(classifier, [Text("a fine film", "t", "positive"), Text("[bold]x", "u")]).items
    line = json.loads(to_json(found[0]))
    assert line["label"] == found[0].label and line["true"] == "positive"
    assert list(line["probs"]) == [name for name, _ in found[0].probs]
    assert sum(line["probs"].values()) == pytest.approx(1, abs=1e-5)
    assert list(json.loads(to_json(found[0], top=1))["probs"]) == [found[0].label]
    out = io.StringIO()
    show(found, Console(file=out, width=100), top=2, as_json=False)
    text = out.getvalue()
    assert "[bold]x" in text and "accuracy" in text  # markup shown as typed
    assert all(p.label in text for p in found)


# -- chat ------------------------------------------------------------------------------------


class Scripted(GPT):
    """A GPT whose next token is the next of `script`, whatever the context (a reply whose
    ending is known in advance); each reply (a fresh KV cache) starts the script again."""

    def __init__(self, config: GPTConfig, script: list[int]) -> None:
        super().__init__(config)
        self.script = script
        self.step = 0

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, None]:
        if cache is not None:
            if cache.length == 0:
                self.step = 0  # a new reply: the script again
            for layer in cache.layers:
                layer.length += idx.shape[1]
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.config.vocab_size)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits, None


def scripted_chat(tokenizer: Tokenizer, text: str, block_size: int = 256, **kw: object) -> Chat:
    config = tiny(tokenizer, block_size=block_size)
    model = Scripted(config, tokenizer.encode(text).ids)
    settings = SamplingSettings(max_new_tokens=40, temperature=0)
    return Chat(TrainedModel(model, config, tokenizer, task="sft"), settings, **kw)  # type: ignore[arg-type]


def test_a_reply_stops_at_end_of_text_and_at_the_next_role_marker(tokenizer: Tokenizer) -> None:
    chat = scripted_chat(tokenizer, f"the plot {EOT} and more")
    pieces: list[str] = []
    reply = chat.reply("hello", pieces.append)
    assert reply.text == "the plot" and reply.generation.stopped_by == EOT
    assert "".join(pieces).strip() == "the plot"
    chat = scripted_chat(tokenizer, "a shard\n<|user|>\nand me")
    reply = chat.reply("hello")
    assert reply.text == "a shard" and reply.generation.stopped_by == "<|user|>"
    assert chat.history == [Message("user", "hello"), Message("assistant", "a shard")]


def test_the_second_prompt_holds_the_first_turn(tokenizer: Tokenizer) -> None:
    chat = scripted_chat(tokenizer, f"workers push {EOT}", system="be brief")
    first = chat.reply("what do workers do")
    assert first.prompt.ids == prompt_ids(
        tokenizer, [Message("system", "be brief"), Message("user", "what do workers do")]
    )
    second = chat.prompt("and servers")
    assert second.ids == prompt_ids(
        tokenizer,
        [
            Message("system", "be brief"),
            Message("user", "what do workers do"),
            Message("assistant", "workers push"),
            Message("user", "and servers"),
        ],
    )
    assert second.ids[: len(first.prompt.ids)] == first.prompt.ids  # turn 1 as it was
    chat.reset()
    assert chat.history == [] and chat.prompt("x").ids == prompt_ids(
        tokenizer, [Message("system", "be brief"), Message("user", "x")]
    )


def test_the_oldest_turns_go_when_the_window_is_full(tokenizer: Tokenizer) -> None:
    history = []
    for i in range(6):
        history += [
            Message("user", f"question {i} about shards"),
            Message("assistant", f"answer {i}"),
        ]
    full = prompt_ids(tokenizer, [Message("system", "s"), *history, Message("user", "last")])
    limit = len(full) - 5
    got = fit(tokenizer, "s", history, "last", limit)
    assert got.dropped == 2 and got.cut == 0 and len(got.ids) <= limit
    assert got.ids == prompt_ids(
        tokenizer, [Message("system", "s"), *history[2:], Message("user", "last")]
    )
    # Nothing of the history fits: the newest message's first tokens go.
    alone = prompt_ids(tokenizer, [Message("user", "word " * 40)])
    got = fit(tokenizer, None, history, "word " * 40, 20)
    assert got.dropped == len(history) and got.cut == len(alone) - 20
    assert got.ids == alone[-20:]
    # Chat keeps the window: block_size 64 less the reply budget.
    chat = scripted_chat(tokenizer, f"ok {EOT}", block_size=64)
    chat.history = list(history)
    prompt = chat.prompt("last")
    assert len(prompt.ids) <= 64 - reply_budget(chat.settings, 64)
    assert chat.history == history[prompt.dropped :] and prompt.dropped > 0


def test_a_session_reads_lines_until_exit(tokenizer: Tokenizer) -> None:
    chat = scripted_chat(tokenizer, f"fine {EOT}")
    out = io.StringIO()
    stdin = io.StringIO("hello\n\n/reset\nagain\n/exit\nnever read\n")
    assert session(chat, stdin, out, interactive=False) == 0
    assert out.getvalue() == "fine\nfine\n"
    assert [m.content for m in chat.history] == ["again", "fine"]  # /reset cleared turn 1


def test_which_models_chat(tokenizer: Tokenizer, classifier: TrainedModel) -> None:
    config = tiny(tokenizer)
    assert check_chat_model(TrainedModel(GPT(config), config, tokenizer, task="sft"), "d") is None
    warning = check_chat_model(TrainedModel(GPT(config), config, tokenizer), "runs/lm")
    assert warning is not None and warning.startswith("runs/lm was trained with --task lm")
    with pytest.raises(ValueError, match="use `lmps predict`"):
        check_chat_model(classifier, "runs/cls")


def test_saved_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        model_io.open_model(str(tmp_path / "nope"), None, "127.0.0.1:1")


def test_the_streamed_reply_is_the_one_kept() -> None:
    out = io.StringIO()
    write = Trimmed(out)
    for piece in ["\n ", " a", " shard", "\n", " ", "is", " here", " \n"]:
        write(piece)
    assert out.getvalue() == "a shard\n is here" == " a shard\n is here \n".strip()
