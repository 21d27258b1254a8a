"""Fine-tuning from `lmps train` end to end, on the real CLI and a real 2-server, 2-worker
cluster: a classifier of builtin:pydoc-topics beats the majority-class baseline and says so
in report.json and the saved model; SFT on chats learns its responses; --freeze-backbone
leaves every backbone value exactly as it was; --micro-batches 2 trains the same parameters
as 1; bad fine-tuning input is one line and exit status 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmps.client import finetune, model_io
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.data import train_tokenizer
from lmps.core.model import GPTConfig, init_model
from tests.cluster.cli import lmps, ok, one_line_error

pytestmark = pytest.mark.cluster

MARGIN = 0.15
"""How far above the majority-class baseline the pydoc-topics classifier must be. Measured
with these settings (seed 1337, 4 epochs from scratch): 71.7% against 35.4%; seeds 1 and 2
gave 70.8% and 60.2%, so a change that only moves the seed keeps well clear of it."""

WORDS = {
    "pos": ["good", "great", "fine", "lovely", "superb", "nice", "happy", "bright"],
    "neg": ["bad", "awful", "poor", "dull", "grim", "sad", "gloomy", "terrible"],
}


def train(cluster: LocalCluster, cwd: Path, *argv: str) -> str:
    """`lmps train --coordinator CLUSTER *argv` in `cwd`, which must succeed; its stdout."""
    return ok(lmps("train", "--coordinator", cluster.coordinator, *argv, cwd=cwd))


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment(path: Path, n: int = 96) -> Path:
    """A two-class set a tiny model learns in an epoch: the label is the mood of the words."""
    rows: list[dict[str, object]] = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = WORDS[label]
        text = f"the day {i} was {words[i % 8]} and {words[(3 * i + 1) % 8]}"
        rows.append({"text": text, "label": label})
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        servers=2, workers=2, worker_threads=1, run_dir=str(tmp_path_factory.mktemp("logs"))
    )
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small saved language model (random weights) to fine-tune from, with its tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    texts = [line for rows in WORDS.values() for line in rows] + ["the day was and"] * 4
    tokenizer = train_tokenizer(texts, 300)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.get_vocab_size()
    )
    model_io.save(model_io.TrainedModel(init_model(config, seed=3), config, tokenizer), folder)
    return folder


def test_classify_pydoc_topics_beats_the_majority_baseline(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    out = train(
        cluster, tmp_path,
        "--task", "classify", "--data", "builtin:pydoc-topics",
        "--preset", "tiny", "--vocab-size", "512", "--block-size", "64", "--pooling", "mean",
        "--epochs", "4", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "5",
        "--eval-fraction", "0.2", "--out", "run",
    )  # fmt: skip
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    accuracy, baseline = report["eval_accuracy"], report["majority_baseline"]
    print(f"\npydoc-topics classifier: accuracy {accuracy:.3f}, majority baseline {baseline:.3f}")
    assert 0.2 < baseline < 0.5, baseline  # 5 classes, none a majority
    assert accuracy > baseline + MARGIN, (accuracy, baseline)
    assert 0 < report["eval_macro_f1"] <= 1
    labels = report["labels"]
    assert report["task"] == "classify" and len(labels) == 5
    confusion = report["eval_confusion"]
    assert confusion["labels"] == labels and len(confusion["rows"]) == 5
    cells = [v for row in confusion["rows"] for v in row]
    assert sum(row[i] for i, row in enumerate(confusion["rows"])) == round(accuracy * sum(cells))
    assert all(e["eval_accuracy"] is not None for e in report["epochs"])
    evals = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"kind": "eval"' in line
    ]
    assert len(evals) == 5 and all("accuracy" in e and "macro_f1" in e for e in evals)
    # The console: the data built, the baseline, accuracy each epoch, the confusion table.
    assert "5 classes" in out and "majority-class baseline on the eval split" in out
    assert "epoch 4/4:" in out and "accuracy" in out and "eval confusion" in out
    task = json.loads((tmp_path / "run" / "task.json").read_text())
    assert task == {"task": "classify", "labels": labels}
    saved = model_io.load(tmp_path / "run")
    assert (saved.task, saved.labels, saved.config.num_labels) == ("classify", tuple(labels), 5)
    assert saved.config.pooling == "mean"
    summary = ok(lmps("report", "run", cwd=tmp_path))
    assert "accuracy" in summary and "majority-class baseline" in summary


def test_sft_on_chats_learns_the_responses(tmp_path: Path, cluster: LocalCluster) -> None:
    words = ["red", "green", "blue", "cyan", "amber", "ivory", "olive", "coral"]
    rows: list[dict[str, object]] = []
    for i in range(160):
        a, b = words[i % 8], words[(i // 8) % 8]
        if i % 3:
            rows.append({"prompt": f"Repeat: {a} {b}", "completion": f"{a} {b}"})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Answer in two words."},
                        {"role": "user", "content": f"Swap: {a} {b}"},
                        {"role": "assistant", "content": f"{b} {a}"},
                    ]
                }
            )
    write_jsonl(tmp_path / "chats.jsonl", rows)
    out = train(
        cluster, tmp_path,
        "--task", "sft", "--data", "chats.jsonl",
        "--preset", "tiny", "--vocab-size", "300", "--block-size", "64",
        "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3",
        "--eval-fraction", "0.1", "--out", "run",
    )  # fmt: skip
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    losses = [report["initial_eval_loss"]] + [e["eval_loss"] for e in report["epochs"]]
    print(f"\nsft eval loss over response tokens by epoch: {[round(x, 3) for x in losses]}")
    assert losses[1] < losses[0] and losses[-1] < losses[1], losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert "over response tokens" in out and "eval conversations" in out and "0 dropped" in out
    assert report["task"] == "sft"
    assert json.loads((tmp_path / "run" / "task.json").read_text())["task"] == "sft"
    saved = model_io.load(tmp_path / "run")
    assert saved.task == "sft" and saved.config.num_labels == 0


def test_freeze_backbone_trains_the_head_only(
    tmp_path: Path, cluster: LocalCluster, base: Path
) -> None:
    sentiment(tmp_path / "mood.jsonl")
    argv = ["--init-from", str(base), "--task", "classify", "--data", "mood.jsonl"]
    out = train(
        cluster, tmp_path, *argv,
        "--freeze-backbone", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2",
        "--seed", "11", "--out", "run",
    )  # fmt: skip
    assert "a new 2-class head" in out
    start = model_io.load(base)
    trained = model_io.load(tmp_path / "run")
    assert trained.labels == ("neg", "pos")
    after = dict(trained.model.named_parameters())
    for name, p in start.model.named_parameters():
        assert torch.equal(after[name].detach(), p.detach()), f"{name} moved"
    # The head started where the client drew it (seed 11) and moved away from there.
    init, _ = finetune.initial_weights(start, trained.config, trained.labels, seed=11)
    head = after["score.weight"].detach()
    assert not torch.equal(head, init["score.weight"])
    assert float((head - init["score.weight"]).abs().max()) > 1e-3


def test_micro_batches_train_the_same_parameters(tmp_path: Path, cluster: LocalCluster) -> None:
    sentiment(tmp_path / "mood.jsonl")
    models = []
    for n in (1, 2):
        train(
            cluster, tmp_path,
            "--task", "classify", "--data", "mood.jsonl",
            "--preset", "tiny", "--vocab-size", "300", "--block-size", "32",
            # SGD: its update is linear in the gradient, so rounding differences of the
            # accumulation stay rounding-sized (AdamW's m / sqrt(v) can flip a near-zero
            # gradient's sign into a whole lr step).
            "--optimizer", "sgd", "--lr", "0.1",
            "--epochs", "1", "--batch-size", "4", "--micro-batches", str(n), "--out", f"run{n}",
        )  # fmt: skip
        models.append(model_io.load(tmp_path / f"run{n}"))
    one, two = ({n: p.detach() for n, p in m.model.named_parameters()} for m in models)
    fresh = init_model(models[0].config, seed=1337).state_dict()  # the coordinator's init
    moved = max(float((p - fresh[n]).abs().max()) for n, p in one.items())
    assert moved > 1e-3  # it trained
    for name, p in one.items():
        torch.testing.assert_close(two[name], p, msg=f"--micro-batches 2 vs 1: {name}")


def test_bad_fine_tuning_input_is_one_line(tmp_path: Path, cluster: LocalCluster) -> None:
    write_jsonl(tmp_path / "one.jsonl", [{"text": f"text {i}", "label": "a"} for i in range(20)])
    at = ["--coordinator", cluster.coordinator]
    one_label = lmps("train", *at, "--task", "classify", "--data", "one.jsonl", cwd=tmp_path)
    one_line_error(one_label, "--data one.jsonl (train split)", "at least 2 classes")
    pooling = lmps("train", *at, "--pooling", "mean", cwd=tmp_path)
    one_line_error(pooling, "--pooling only applies with --task classify")
    micro = lmps("train", *at, "--batch-size", "4", "--micro-batches", "3", cwd=tmp_path)
    one_line_error(micro, "--micro-batches 3 must divide --batch-size 4")
