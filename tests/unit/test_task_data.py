"""Unit tests for lmps.core.task_data: classify and SFT row layouts, the chat template and
its target mask, the loaders' errors (path:line), label order, the hash split, and the
bundled set builtin:pydoc-topics (deterministic, 5 classes, no class above 60%)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lmps.core.data import EOT, train_tokenizer
from lmps.core.pydoc_topics import BUILTIN_PYDOC_TOPICS, TOPIC_CLASSES, TOPIC_SECTIONS
from lmps.core.task_data import (
    CHAT_TEMPLATE,
    GENERATION_PROMPT,
    ROLE_MARKERS,
    Message,
    class_counts,
    classify_rows,
    decode_sft_row,
    encode_chat,
    label_names,
    load_chat,
    load_labelled,
    load_labelled_split,
    prompt_ids,
    render,
    sft_rows,
    split_labelled,
)

CORPUS = [
    "<|system|>\nbe brief\n<|user|>\nwhat do workers do?\n<|assistant|>\nthey push gradients",
    "the parameter server holds shards; workers pull parameters and push gradients",
    "a fine film with a warm heart and a clever plot, and dull actors",
] * 10

CHAT = [
    Message("system", "be brief"),
    Message("user", "what do workers do?"),
    Message("assistant", "they push gradients"),
    Message("user", "and servers?"),
    Message("assistant", "they hold shards"),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def eot(tokenizer: Tokenizer) -> int:
    eot = tokenizer.token_to_id(EOT)
    assert eot is not None
    return eot


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- classify ------------------------------------------------------------------------------


def test_classify_rows_layout(tokenizer: Tokenizer, eot: int) -> None:
    texts = ["a fine film", "workers push", "x"]
    got = classify_rows(tokenizer, texts, ["pos", "neu", "pos"], ["neg", "neu", "pos"], 16)
    rows = got.rows
    assert rows.dtype == torch.int32 and rows.shape == (3, 17)
    assert got.truncated == 0
    for row, text, label in zip(rows.tolist(), texts, [2, 1, 2], strict=True):
        ids = ids_of(tokenizer, text)
        n = row[1]
        assert row[0] == label and n == len(ids) + 1
        assert row[2 : 2 + n] == [*ids, eot]  # the text's tokens, then EOT last
        assert row[2 + n :] == [0] * (17 - 2 - n)  # padding


def test_classify_truncates_from_the_end_and_counts(tokenizer: Tokenizer, eot: int) -> None:
    long = "the parameter server holds shards " * 10
    block = 12
    got = classify_rows(tokenizer, [long, "x"], ["a", "b"], ["a", "b"], block)
    assert got.truncated == 1
    row = got.rows[0].tolist()
    assert row[1] == block - 1  # the widest a row holds: 2 header values + block - 1 ids
    assert row[2:] == [*ids_of(tokenizer, long)[: block - 2], eot]
    # An empty text is EOT alone; the smallest block_size holds exactly that.
    tiny = classify_rows(tokenizer, ["", "abc"], ["a", "b"], ["a", "b"], 2)
    assert tiny.rows.tolist() == [[0, 1, eot], [1, 1, eot]] and tiny.truncated == 1


def test_classify_refuses_labels_outside_the_class_names(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"label\(s\) \['maybe'\] not among the classes"):
        classify_rows(tokenizer, ["a", "b"], ["yes", "maybe"], ["no", "yes"], 8)
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        classify_rows(tokenizer, ["a"], ["no"], ["no", "yes"], 1)
    with pytest.raises(ValueError, match="distinct"):
        classify_rows(tokenizer, ["a"], ["no"], ["no", "no"], 8)


def test_label_names_order() -> None:
    assert label_names(["10", "2", "1", "2", "-3"]) == ["-3", "1", "2", "10"]  # numeric
    assert label_names(["b", "10", "a", "2"]) == ["10", "2", "a", "b"]  # not all ints
    assert label_names(["1.5", "2"]) == ["1.5", "2"]
    with pytest.raises(ValueError, match="at least 2 classes, found 1"):
        label_names(["spam", "spam"])
    assert class_counts(["b", "a", "b"]) == {"a": 1, "b": 2}


def test_load_labelled_reads_text_and_label(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "good", "label": "pos", "id": 7}),
            "",
            json.dumps({"text": "bad", "label": 0}),
            "   ",
        ],
    )
    assert load_labelled(path) == (["good", "bad"], ["pos", "0"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "invalid JSON"),
        ("[1, 2]", "expected a JSON object per line, got list"),
        ('{"label": "a"}', 'expected a string "text" field'),
        ('{"text": 3, "label": "a"}', 'expected a string "text" field'),
        ('{"text": "hi"}', 'missing "label"'),
        ('{"text": "hi", "label": true}', '"label" must be a string or an integer, got true'),
        ('{"text": "hi", "label": 1.0}', '"label" must be a string or an integer, got 1.0'),
        ('{"text": "hi", "label": null}', '"label" must be a string or an integer, got null'),
        ('{"text": "hi", "label": ""}', '"label" is an empty string'),
        ('{"text": "  ", "label": "a"}', "the text is empty"),
    ],
)
def test_load_labelled_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine", "label": "a"}', "", line])
    with pytest.raises(ValueError) as err:
        load_labelled(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_load_labelled_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_labelled(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must end in \.jsonl"):
        load_labelled(str(tmp_path / "d.txt"))
    with pytest.raises(ValueError, match="no examples"):
        load_labelled(write_jsonl(tmp_path / "e.jsonl", [""]))
    with pytest.raises(ValueError, match="unknown builtin data set 'builtin:nope'"):
        load_labelled("builtin:nope")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "\xff", "label": 1}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:1: not UTF-8"):
        load_labelled(str(tmp_path / "b.jsonl"))


def test_split_is_by_text_not_position(tmp_path: Path) -> None:
    examples = [(f"text number {i}", str(i % 3)) for i in range(40)]
    examples += [("a repeated text", "0")] * 3
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    splits = []
    for name, order in (("a", examples), ("b", shuffled)):
        lines = [json.dumps({"text": t, "label": y}) for t, y in order]
        tr_x, tr_y, ev_x, ev_y = load_labelled_split(
            write_jsonl(tmp_path / f"{name}.jsonl", lines), 0.25
        )
        splits.append(
            (Counter(zip(tr_x, tr_y, strict=True)), Counter(zip(ev_x, ev_y, strict=True)))
        )
        assert Counter(tr_x) + Counter(ev_x) == Counter(t for t, _ in examples)  # a partition
        assert len(ev_x) <= int(len(examples) * 0.25) + 2
        assert ("a repeated text" in tr_x) != ("a repeated text" in ev_x)  # never both
    assert splits[0] == splits[1]  # the same split whatever the order of the file
    # Within a split the input order is kept.
    tr_x, _, ev_x, _ = split_labelled([t for t, _ in examples], [y for _, y in examples], 0.25)
    assert tr_x == [t for t, _ in examples if t in set(tr_x)]
    assert split_labelled(["a", "b"], ["x", "y"], 0.0) == (["a", "b"], ["x", "y"], [], [])
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_labelled(["a"], ["x"], 1.0)


# --- the bundled set -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pydoc_topics() -> tuple[list[str], list[str]]:
    return load_labelled(BUILTIN_PYDOC_TOPICS)


def test_builtin_set_is_deterministic_and_balanced(
    pydoc_topics: tuple[list[str], list[str]],
) -> None:
    texts, labels = pydoc_topics
    assert load_labelled(BUILTIN_PYDOC_TOPICS) == (texts, labels)
    counts = class_counts(labels)
    assert list(counts) == ["builtin-type", "data-model", "expression", "runtime", "statement"]
    assert len(texts) > 800 and max(counts.values()) / len(texts) < 0.6
    assert min(counts.values()) / len(texts) > 0.05
    assert len(set(texts)) == len(texts)  # no passage twice
    assert all(t == t.strip("\n").rstrip() for t in texts)
    assert sum(len(t) < 200 for t in texts) <= 3  # only a topic shorter than a passage
    split = load_labelled_split(BUILTIN_PYDOC_TOPICS, 0.15)
    assert split == load_labelled_split(BUILTIN_PYDOC_TOPICS, 0.15)
    assert len(split[2]) == int(len(texts) * 0.15)
    assert set(split[3]) == set(counts)  # every class in the eval split too


def test_left_out_topics_repeat_inside_their_container() -> None:
    from pydoc_data.topics import topics

    assert not set(TOPIC_CLASSES) & set(TOPIC_SECTIONS)
    for section, container in TOPIC_SECTIONS.items():
        if section not in topics:
            continue  # another Python's topics
        paragraphs = [p for p in topics[section].split("\n\n") if len(p) > 80]
        inside = sum(p in topics[container] for p in paragraphs)
        assert inside >= 0.9 * len(paragraphs), section


# --- chats ---------------------------------------------------------------------------------


def test_render_follows_the_template() -> None:
    one_each = [Message(r, "{content}") for r in ("system", "user", "assistant")]
    assert "".join(text for text, _ in render(one_each)) == CHAT_TEMPLATE
    pieces = render(CHAT[1:3], add_generation_prompt=True)
    assert [text for text, target in pieces if target] == ["they push gradients", EOT]
    assert pieces[-1] == (GENERATION_PROMPT, False)
    assert ROLE_MARKERS == ("<|system|>", "<|user|>", "<|assistant|>")
    with pytest.raises(ValueError, match="role must be one of"):
        Message("robot", "hi")  # type: ignore[arg-type]


def test_only_assistant_content_and_its_eot_are_targets(tokenizer: Tokenizer, eot: int) -> None:
    ids, mask = encode_chat(tokenizer, CHAT)
    assert len(ids) == len(mask)
    runs: list[list[int]] = []  # the maximal runs of target tokens
    for i, (token, target) in enumerate(zip(ids, mask, strict=True)):
        if target:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    assistant = [m.content for m in CHAT if m.role == "assistant"]
    assert [tokenizer.decode(r, skip_special_tokens=False) for r in runs] == [
        c + EOT for c in assistant
    ]
    assert all(r[-1] == eot for r in runs) and ids.count(eot) == len(assistant)
    rendered = "".join(text for text, _ in render(CHAT))
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered


def test_prompt_completion_equals_messages(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            json.dumps({"prompt": "what do workers do?", "completion": "push"}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "what do workers do?"},
                        {"role": "assistant", "content": "push"},
                    ],
                    "source": "ignored",
                }
            ),
        ],
    )
    first, second = load_chat(path)
    assert first == second == [Message("user", "what do workers do?"), Message("assistant", "push")]
    assert encode_chat(tokenizer, first) == encode_chat(tokenizer, second)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, 'message 0 has role "bot"'),
        ({"messages": [{"role": "user", "content": 3}]}, 'message 0 needs a string "content"'),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"messages": ["hi"]}, "message 0 is not an object"),
        ({"prompt": "x"}, '{"prompt": str, "completion": str}'),
        ({"prompt": "x", "completion": "y", "messages": []}, "not both"),
        ({"text": "x"}, '{"prompt": str, "completion": str}'),
    ],
)
def test_load_chat_errors_name_file_and_line(
    tmp_path: Path, record: dict[str, object], message: str
) -> None:
    good = {"prompt": "a", "completion": "b"}
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps(good), json.dumps(record)])
    with pytest.raises(ValueError) as err:
        load_chat(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_prompt_ids_are_a_prefix_of_the_training_ids(tokenizer: Tokenizer) -> None:
    for n in (2, 4):  # before each assistant turn of CHAT
        prompt = prompt_ids(tokenizer, CHAT[:n])
        ids, mask = encode_chat(tokenizer, CHAT[: n + 1])
        assert ids[: len(prompt)] == prompt
        assert mask[len(prompt)]  # the reply's first token is the next, and a target
        assert not any(mask[: len(prompt)][-3:])  # the generation prompt is no target
    rendered = "".join(text for text, _ in render(CHAT[:2], add_generation_prompt=True))
    decoded = tokenizer.decode(prompt_ids(tokenizer, CHAT[:2]), skip_special_tokens=False)
    assert decoded == rendered and rendered.endswith(
        "<|user|>\nwhat do workers do?\n<|assistant|>\n"
    )


def test_the_literal_end_of_text_in_content_is_ordinary_text(
    tokenizer: Tokenizer, eot: int
) -> None:
    sneaky = f"stop here {EOT} and go on"
    assert eot in ids_of(tokenizer, sneaky)  # what tokenizers alone would do
    chat = [Message("user", sneaky), Message("assistant", f"a {EOT} b")]
    ids, mask = encode_chat(tokenizer, chat)
    # Only the template's EOT, ending the assistant turn, is the special id.
    assert [i for i, t in enumerate(ids) if t == eot] == [len(ids) - 2]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(t for t, _ in render(chat))
    assert mask[-2] and not mask[-1]  # the EOT is a target, the newline after it is not
    rows = classify_rows(tokenizer, [sneaky], ["a"], ["a", "b"], 64).rows[0].tolist()
    assert rows[2 : 2 + rows[1]].count(eot) == 1 and rows[1 + rows[1]] == eot
    # The caller's tokenizer is left as it was.
    assert tokenizer.encode_special_tokens is False and eot in ids_of(tokenizer, sneaky)
    assert prompt_ids(tokenizer, chat[:1]).count(eot) == 0


# --- SFT rows ------------------------------------------------------------------------------


def test_sft_rows_layout_and_decode(tokenizer: Tokenizer) -> None:
    ids, mask = encode_chat(tokenizer, CHAT)
    block = len(ids) + 4
    got = sft_rows(tokenizer, [CHAT], block)
    assert got.rows.dtype == torch.int32 and got.rows.shape == (1, block + 1)
    assert (got.truncated, got.dropped) == (0, 0)
    row = got.rows[0].tolist()
    expected = [t if m else -t - 1 for t, m in zip(ids, mask, strict=True)]
    assert row == expected + [-1] * (block + 1 - len(ids))
    inputs, targets = decode_sft_row(got.rows[0])
    assert inputs.tolist() == (ids + [0] * 5)[:-1]
    assert targets.tolist() == [
        t if m else -100 for t, m in zip(ids[1:] + [0] * 5, mask[1:] + [False] * 5, strict=True)
    ]
    kept = targets[targets != -100].tolist()
    assert tokenizer.decode(kept, skip_special_tokens=False) == (
        f"they push gradients{EOT}they hold shards{EOT}"
    )


def test_sft_truncates_and_drops(tokenizer: Tokenizer) -> None:
    ids, mask = encode_chat(tokenizer, CHAT)
    first_target = mask.index(True)
    long_prompt = [Message("user", "workers pull parameters " * 20), Message("assistant", "ok")]
    block = first_target + 3
    got = sft_rows(tokenizer, [CHAT, long_prompt, CHAT], block)
    assert got.rows.shape == (2, block + 1)
    assert (got.truncated, got.dropped) == (2, 1)
    row = got.rows[0].tolist()
    assert row == [
        t if m else -t - 1 for t, m in zip(ids[: block + 1], mask[: block + 1], strict=True)
    ]
    # The shortest row that keeps a conversation ends at its first target.
    edge = sft_rows(tokenizer, [CHAT], first_target).rows[0].tolist()
    assert edge[-1] >= 0 and all(v < 0 for v in edge[:-1])
    with pytest.raises(ValueError, match="all 1 conversations were dropped"):
        sft_rows(tokenizer, [long_prompt], block)
    empty = sft_rows(tokenizer, [], block)
    assert empty.rows.shape == (0, block + 1) and empty.dropped == 0
