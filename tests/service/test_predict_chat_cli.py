"""`lmps predict` and `lmps chat` as real processes on saved (random) models: predict's
table and JSON lines agree with the in-process functions, texts come from arguments, a
.jsonl file and stdin; chat answers one --prompt and a two-turn session on stdin exactly as
`lmps.client.chat.Chat` does in process; a language model chats with one warning line; bad
input is one error line naming the culprit, exit 2. (Training a real classifier or chat
model, and `--job`: the train helper's tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from lmps.client import model_io
from lmps.client.chat import Chat
from lmps.client.model_io import TrainedModel
from lmps.client.predict import Text, predict
from lmps.core.data import train_tokenizer
from lmps.core.generation import SamplingSettings
from lmps.core.model import GPTConfig, init_model

pytestmark = pytest.mark.cluster  # real processes, one per command

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
TEXT = "the parameter server holds shards of every tensor; workers pull and push them\n" * 40
LABELS = ("bad", "good", "so-so")
TEXTS = ["workers pull", "the server holds shards of every tensor", "push"]


def save(
    out: Path, task: str, num_labels: int = 0, labels: tuple[str, ...] = (), block_size: int = 64
) -> Path:
    tokenizer = train_tokenizer(TEXT.splitlines(), 300)
    config = GPTConfig(
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=block_size,
        vocab_size=tokenizer.get_vocab_size(),
        num_labels=num_labels,
    )
    trained = TrainedModel(init_model(config, 0), config, tokenizer, task=task, labels=labels)  # type: ignore[arg-type]
    model_io.save(trained, out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_chat")
    return {
        "classify": save(root / "cls", "classify", 3, LABELS),
        "sft": save(root / "sft", "sft", block_size=256),  # room for two turns
        "lm": save(root / "lm", "lm"),
    }


def run_all(
    runs: Sequence[tuple[Sequence[str], str]], cwd: Path
) -> list[subprocess.CompletedProcess[str]]:
    """Several `lmps` commands at once (each pays torch's import), each with its stdin."""
    procs = [
        subprocess.Popen(
            [*LMPS, *argv],
            cwd=cwd,
            env=os.environ.copy(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, _ in runs
    ]
    done = []
    for (argv, stdin), proc in zip(runs, procs, strict=True):
        try:
            out, err = proc.communicate(stdin, timeout=180)
        finally:
            proc.kill()
        assert "Traceback" not in out + err, out + err
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_predict_table_json_file_and_stdin(models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": "good"}) + "\n" for t in TEXTS), encoding="utf-8"
    )
    model = ["predict", "--model", str(models["classify"])]
    table, as_json, top1, from_file, from_stdin = run_all(
        [
            ([*model, *TEXTS], ""),
            ([*model, *TEXTS, "--json"], ""),
            ([*model, TEXTS[0], "--json", "--top", "1"], ""),
            ([*model, "--file", str(data), "--json"], ""),
            ([*model, "--file", "-", "--json"], "\n".join(TEXTS) + "\n"),
        ],
        cwd=tmp_path,
    )
    expected = predict(model_io.load(models["classify"]), [Text(t, "") for t in TEXTS]).items
    lines = [json.loads(x) for x in ok(as_json).splitlines()]
    assert [x["text"] for x in lines] == TEXTS
    for line, want in zip(lines, expected, strict=True):
        assert line["label"] == want.label and list(line["probs"]) == [n for n, _ in want.probs]
        assert line["probs"] == pytest.approx(dict(want.probs), abs=1e-5)
        assert sum(line["probs"].values()) == pytest.approx(1, abs=1e-5)
    assert [json.loads(x) for x in ok(from_stdin).splitlines()] == lines
    labelled = [json.loads(x) for x in ok(from_file).splitlines()]
    assert [{k: v for k, v in x.items() if k != "true"} for x in labelled] == lines
    assert all(x["true"] == "good" for x in labelled)
    one = json.loads(ok(top1))
    assert list(one["probs"]) == [expected[0].label]
    shown = ok(table)
    rows = [x for x in shown.splitlines() if x.strip()[:1].isdigit()]
    assert len(rows) == len(TEXTS), shown
    for row, want in zip(rows, expected, strict=True):
        assert all(name in row for name in LABELS), shown  # every class, on one line
        assert f" {want.label} " in row, shown


def test_chat_one_shot_and_a_session_on_stdin(models: dict[str, Path], tmp_path: Path) -> None:
    sft = ["chat", "--model", str(models["sft"]), "--temperature", "0", "--max-tokens", "12"]
    one, session, lm = run_all(
        [
            ([*sft, "--system", "be brief", "--prompt", "what is a shard"], ""),
            (sft, "what is a shard\n\nand a worker\n/exit\nnot read\n"),
            (["chat", "--model", str(models["lm"]), "--prompt", "hi", "--max-tokens", "5"], ""),
        ],
        cwd=tmp_path,
    )
    trained = model_io.load(models["sft"])
    settings = SamplingSettings(max_new_tokens=12, temperature=0, top_k=40, seed=0)
    chat = Chat(trained, settings, system="be brief")
    assert ok(one) == chat.reply("what is a shard").text + "\n"
    chat = Chat(trained, settings)
    first, second = chat.reply("what is a shard"), chat.reply("and a worker")
    assert ok(session) == f"{first.text}\n{second.text}\n"
    assert second.prompt.dropped == 0  # turn 2's prompt holds turn 1
    assert second.prompt.ids[: len(first.prompt.ids)] == first.prompt.ids
    ok(lm)
    warnings = [x for x in lm.stderr.splitlines() if x.startswith("lmps: warning:")]
    assert len(warnings) == 1 and "--task lm" in warnings[0] and "chat-tuned" in warnings[0]


def test_bad_input_is_one_line_naming_the_culprit(models: dict[str, Path], tmp_path: Path) -> None:
    lm, sft = str(models["lm"]), str(models["sft"])
    cls = str(models["classify"])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"label": 1}\n', encoding="utf-8")
    results = run_all(
        [
            (["predict", "--model", lm, "some text"], ""),
            (["predict", "--model", sft, "some text"], ""),
            (["predict", "--model", cls, "fine", ""], ""),
            (["predict", "--model", str(tmp_path / "nope"), "text"], ""),
            (["predict", "--model", cls], ""),
            (["predict", "--model", cls, "--file", str(bad_json)], ""),
            (["predict", "--model", cls, "x", "--top", "0"], ""),
            (["chat", "--model", cls, "--prompt", "hi"], ""),
            (["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"], ""),
            (["chat", "--model", sft, "--top-p", "2", "--prompt", "hi"], ""),
        ],
        cwd=tmp_path,
    )
    expected = [
        f"{lm} was trained with --task lm: `lmps predict` needs a --task classify model; "
        "use `lmps generate`",
        f"{sft} was trained with --task sft: `lmps predict` needs a --task classify model; "
        "use `lmps chat`",
        "text 2 is empty",
        f"--model {tmp_path / 'nope'}: no such folder",
        "no text to classify",
        f'{bad_json} line 2: expected {{"text": "..."}}',
        "--top must be >= 1",
        f"{cls} was trained with --task classify: `lmps chat` needs a --task sft model; "
        "use `lmps predict`",
        f"--model {tmp_path / 'nope'}: no such folder",
        "--top-p must be in (0, 1]",
    ]
    for result, want in zip(results, expected, strict=True):
        assert result.returncode == 2, (result.args, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lmps: error: {want}"), (
            result.args,
            result.stderr,
        )
        assert result.stdout == ""
