"""`lmps train --task classify | sft` on the client: the task's rows (`lmps.core.task_data`),
its tokenizer, the model config with or without the head, the initial weights with
--init-from, and how a classifier's results read (the epoch line, the confusion table).

The splits are deterministic: examples are ordered by a hash of their text and the last
--eval-fraction of them is held out (`task_data.split_labelled`), so the same file gives the
same splits on every machine and in every run. A classifier's classes are the train split's
labels (`task_data.label_names`); an eval label the train split lacks is refused.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from rich.markup import escape
from rich.table import Table
from tokenizers import Tokenizer
from torch import Tensor

from lmps.core import task_data
from lmps.core.data import train_tokenizer
from lmps.core.model import GPTConfig, Pooling
from lmps.core.tasks import HEAD

if TYPE_CHECKING:
    from lmps.client.model_io import TrainedModel
    from lmps.client.train_options import TrainOptions

HEAD_STD = 0.02
"""The new head's init: N(0, 0.02), GPT-2's (as `lmps.core.model.GPT._init_weights`)."""


@dataclass(frozen=True, eq=False)
class TaskData:
    """A fine-tuning task's splits as the wire's streams, and what was built (eq=False:
    tensors have no single truth value)."""

    train: Tensor
    """The train rows flattened: int32, (block_size + 1) values per example."""
    eval: Tensor
    """The eval rows, flattened likewise."""
    train_examples: int
    eval_examples: int
    tokenizer: Tokenizer
    labels: tuple[str, ...] = ()
    """classify: the class names, index = class id (the train split's labels)."""
    eval_counts: tuple[int, ...] = ()
    """classify: eval examples per class, by class id."""
    summary: str = ""
    """One console line: examples, classes with their counts, truncated/dropped."""

    @property
    def baseline(self) -> float | None:
        """classify: the accuracy of always answering the eval split's most common class
        (None without eval examples)."""
        total = sum(self.eval_counts)
        return max(self.eval_counts) / total if total else None


def prepare(
    opts: TrainOptions, block_size: int, tokenizer: Tokenizer | None, vocab_size: int
) -> TaskData:
    """The rows of --data for --task (classify or sft), cut at `block_size`; with no
    `tokenizer` (no --init-from) a new one of `vocab_size` is trained on the train split."""
    if opts.task == "classify":
        return _classify(opts, block_size, tokenizer, vocab_size)
    if opts.task == "sft":
        return _sft(opts, block_size, tokenizer, vocab_size)
    raise ValueError(f"--task {opts.task} has no rows to prepare (only classify and sft do)")


def _classify(
    opts: TrainOptions, block_size: int, tokenizer: Tokenizer | None, vocab_size: int
) -> TaskData:
    texts, labels, eval_texts, eval_labels = task_data.load_labelled_split(
        opts.data, opts.eval_fraction
    )
    try:
        names = task_data.label_names(labels)
    except ValueError as err:
        raise ValueError(f"--data {opts.data} (train split): {err}") from None
    tokenizer = tokenizer or train_tokenizer(texts, vocab_size)
    train = task_data.classify_rows(tokenizer, texts, labels, names, block_size)
    try:
        held = task_data.classify_rows(tokenizer, eval_texts, eval_labels, names, block_size)
    except ValueError as err:
        raise ValueError(f"--data {opts.data} (eval split): {err}") from None
    train_counts, eval_counts = Counter(labels), Counter(eval_labels)
    truncated = train.truncated + held.truncated
    classes = ", ".join(f"{n} {train_counts[n]}/{eval_counts[n]}" for n in names)
    summary = (
        f"classify data {opts.data}: {len(texts):,} train / {len(eval_texts):,} eval examples, "
        f"{len(names)} classes (train/eval: {classes}); "
        f"{truncated} cut to block {block_size}"
    )
    return _task_data(
        train.rows,
        held.rows,
        tokenizer,
        summary,
        labels=tuple(names),
        eval_counts=tuple(eval_counts[n] for n in names),
    )


def _sft(
    opts: TrainOptions, block_size: int, tokenizer: Tokenizer | None, vocab_size: int
) -> TaskData:
    chats = task_data.load_chat(opts.data)
    # The labelled split, with each conversation's rendered text as its key and its index
    # as its "label": the same hash order, so a chat file splits as a labelled one does.
    keys = ["".join(text for text, _ in task_data.render(c)) for c in chats]
    train_keys, train_at, _, eval_at = task_data.split_labelled(
        keys, [str(i) for i in range(len(chats))], opts.eval_fraction
    )
    train_chats = [chats[int(i)] for i in train_at]
    eval_chats = [chats[int(i)] for i in eval_at]
    tokenizer = tokenizer or train_tokenizer(train_keys, vocab_size)
    train = task_data.sft_rows(tokenizer, train_chats, block_size)
    held = task_data.sft_rows(tokenizer, eval_chats, block_size)
    n_train, n_eval = train.rows.shape[0], held.rows.shape[0]
    targets = int((train.rows[:, 1:] >= 0).sum())
    summary = (
        f"sft data {opts.data}: {n_train:,} train / {n_eval:,} eval conversations "
        f"({targets:,} train response tokens); {train.truncated + held.truncated} cut to "
        f"block {block_size}, {train.dropped + held.dropped} dropped (no response token left)"
    )
    return _task_data(train.rows, held.rows, tokenizer, summary)


def _task_data(
    train: Tensor,
    held: Tensor,
    tokenizer: Tokenizer,
    summary: str,
    labels: tuple[str, ...] = (),
    eval_counts: tuple[int, ...] = (),
) -> TaskData:
    """The splits' rows (N, block_size + 1) as the wire's streams, one example a row."""
    return TaskData(
        train=train.flatten(),
        eval=held.flatten(),
        train_examples=train.shape[0],
        eval_examples=held.shape[0],
        tokenizer=tokenizer,
        labels=labels,
        eval_counts=eval_counts,
        summary=summary,
    )


def task_config(config: GPTConfig, opts: TrainOptions, labels: Sequence[str]) -> GPTConfig:
    """`config` with the task's head: `len(labels)` classes and --pooling for classify (a
    classifier's own pooling when --pooling is not given), none for the other tasks."""
    if opts.task != "classify":
        return dataclasses.replace(config, num_labels=0, pooling="last")
    pooling: Pooling = "mean" if opts.pooling == "mean" else "last"
    if not opts.pooling and config.num_labels:
        pooling = config.pooling
    return dataclasses.replace(config, num_labels=len(labels), pooling=pooling)


def initial_weights(
    base: TrainedModel, config: GPTConfig, labels: Sequence[str], seed: int
) -> tuple[dict[str, Tensor], str]:
    """The --init-from weights for a job of `config`, and how its head came about ("" when
    it has none): the base's backbone; for a classifier the base's own head when it was
    trained on the same classes, else a new one drawn from N(0, 0.02) with a generator
    seeded by the job's --seed (the same seed, the same head)."""
    init = {n: p.detach() for n, p in base.model.named_parameters() if not n.startswith(HEAD)}
    if not config.num_labels:
        return init, ""
    score = getattr(base.model, "score", None)
    if base.labels == tuple(labels) and score is not None:
        init[f"{HEAD}weight"] = score.weight.detach()
        return init, "the base's own head (same classes)"
    g = torch.Generator().manual_seed(seed)
    init[f"{HEAD}weight"] = HEAD_STD * torch.randn(config.num_labels, config.n_embd, generator=g)
    return init, f"a new {config.num_labels}-class head (N(0, {HEAD_STD}), seed {seed})"


@dataclass(frozen=True)
class Results:
    """How a job's evaluations read for its task: the console text and the report's fields.
    A classifier's majority baseline comes from the confusion matrix (its rows sum to the
    eval split's class counts), so a resumed run, which has no data, still has it."""

    task: str = "lm"
    labels: tuple[str, ...] = ()

    def eval_text(
        self,
        loss: float,
        perplexity: float,
        accuracy: float = 0.0,
        macro_f1: float = 0.0,
        confusion: Sequence[int] = (),
    ) -> str:
        """The "eval loss ..." text and, for a classifier, accuracy against the majority."""
        if self.task == "classify" and confusion:
            base = majority_baseline(confusion, self.labels)
            versus = "" if base is None else f" (majority class {100 * base:.1f}%)"
            return (
                f"eval loss {loss:.4f} per example, accuracy {100 * accuracy:.1f}%{versus}, "
                f"macro-F1 {macro_f1:.3f}"
            )
        if self.task == "sft":
            return f"eval loss {loss:.4f} over response tokens (ppl {perplexity:.1f})"
        return f"eval loss {loss:.4f} (ppl {perplexity:.1f})"

    def fields(
        self, accuracy: float, macro_f1: float, confusion: Sequence[int]
    ) -> dict[str, object]:
        """A classifier's eval for report.json ({} for the other tasks): accuracy, macro-F1,
        the majority baseline and the confusion matrix with the class names."""
        if self.task != "classify" or not confusion:
            return {}
        return {
            "eval_accuracy": accuracy,
            "eval_macro_f1": macro_f1,
            "majority_baseline": majority_baseline(confusion, self.labels),
            "eval_confusion": {
                "labels": list(self.labels),
                "rows": confusion_rows(confusion, self.labels),
            },
        }


def majority_baseline(confusion: Sequence[int], labels: Sequence[str]) -> float | None:
    """The accuracy of always answering the eval split's most common class (its largest
    confusion row); None without eval examples."""
    support = [sum(row) for row in confusion_rows(confusion, labels)]
    total = sum(support)
    return max(support) / total if total else None


def confusion_rows(confusion: Sequence[int], labels: Sequence[str]) -> list[list[int]]:
    """The flat row-major L x L counts as rows (row: true class, column: predicted)."""
    n = len(labels)
    if len(confusion) != n * n:
        raise ValueError(f"a confusion matrix of {len(confusion)} counts for {n} classes")
    return [list(map(int, confusion[i * n : (i + 1) * n])) for i in range(n)]


def confusion_table(confusion: Sequence[int], labels: Sequence[str]) -> Table:
    """The eval confusion matrix as a rich table: a row per true class (its number and
    name), a column per predicted class (its number, so that many classes still fit), the
    diagonal in bold, each row's recall at its end."""
    table = Table(title="eval confusion: rows true, columns predicted", title_justify="left")
    table.add_column("true class", style="bold", no_wrap=True)
    for i in range(len(labels)):
        table.add_column(str(i), justify="right")
    table.add_column("recall", justify="right")
    for i, row in enumerate(confusion_rows(confusion, labels)):
        cells = [f"[bold]{v}[/]" if j == i else str(v) for j, v in enumerate(row)]
        total = sum(row)
        recall = f"{100 * row[i] / total:.0f}%" if total else "-"
        table.add_row(f"{i} {escape(labels[i])}", *cells, recall)
    return table
