"""What a job teaches the model: one row of `TASKS` per task, each with its data layout, its
loss and its evaluation.

- "lm": next-token prediction (pre-training, or continued pre-training of an imported model).
- "classify": sequence classification with the model's `score` head (GPT-1's task heads,
  Radford et al. 2018; Hugging Face's GPT2ForSequenceClassification).
- "sft": supervised fine-tuning on instructions or chats: next-token prediction whose loss
  counts only the response tokens (the loss mask of InstructGPT, Ouyang et al. 2022, and of
  every SFT recipe since).

The layouts are the wire's (`lmps.v1.Task`): the train and eval splits arrive as int32 token
streams; "lm" cuts its stream into windows, the fine-tuning tasks send one example per row of
block_size + 1 values, built on the client by `lmps.core.task_data`:

    classify  [label, n, id_1 .. id_n, 0 ...]         1 <= n <= block_size - 1
    sft       v >= 0: id v, a target; v < 0: id -v-1, not a target (padding -1)

A task's loss is a mean over its own unit (tokens, examples, target tokens) and says how many
units a batch holds, so that micro-batches can be weighted into exactly the batch's mean
(gradient accumulation). Pure torch: no grpc.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lmps.core.data import to_sequences
from lmps.core.model import GPT, GPTConfig, decay_mask

TaskName = Literal["lm", "classify", "sft"]
TASK_NAMES: tuple[str, ...] = get_args(TaskName)

IGNORE = -100
"""Target of a position without loss (torch's cross_entropy default ignore_index)."""


@dataclass(frozen=True, eq=False)
class EvalCounts:
    """Sums over some evaluated rows; those of several workers add up (`plus`)."""

    loss_sum: float
    """Sum of the per-unit cross-entropies."""
    count: int
    """Units scored: tokens (lm), target tokens (sft), examples (classify)."""
    confusion: Tensor | None = None
    """classify: (L, L) int64 counts, row = true class, column = predicted."""

    def plus(self, other: EvalCounts) -> EvalCounts:
        if (self.confusion is None) != (other.confusion is None):
            raise ValueError("cannot add counts of different tasks")
        confusion = None
        if self.confusion is not None and other.confusion is not None:
            confusion = self.confusion + other.confusion
        return EvalCounts(self.loss_sum + other.loss_sum, self.count + other.count, confusion)


class Task(Protocol):
    """One task: its data layout, loss and evaluation."""

    def rows(self, tokens: Tensor, config: GPTConfig) -> Tensor:
        """A split's int32 stream (1-D) as (N, block_size + 1) rows; ValueError, naming what
        is wrong, when the stream does not fit the layout or the model."""
        ...

    def check(self, rows: Tensor, config: GPTConfig) -> None:
        """ValueError unless `rows` (N, W) fit the layout and the model (W <= block_size + 1)."""
        ...

    def units(self, rows: Tensor) -> int:
        """Units of loss in `rows` (tokens, examples, target tokens)."""
        ...

    def weight(self, rows: Tensor) -> float:
        """The push weight of a batch: the servers' weighted mean of the workers' mean-loss
        gradients is the union batch's when it is proportional to `units` (sequences for lm
        and classify, target tokens for sft)."""
        ...

    def loss(self, model: GPT, rows: Tensor) -> Tensor:
        """Mean loss over the units of `rows` (B, W) (on the model's device), a scalar; 0 with
        a graph (not NaN) when `rows` have no unit."""
        ...

    def evaluate(self, model: GPT, rows: Tensor) -> EvalCounts:
        """Loss sum, units and (classify) the confusion counts of `rows`, without gradients."""
        ...


def _check_ids(ids: Tensor, vocab: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{what} has token ids outside [0, {vocab})")


def _as_rows(tokens: Tensor, config: GPTConfig, task: str) -> Tensor:
    width = config.block_size + 1
    if tokens.dim() != 1 or tokens.numel() % width:
        raise ValueError(
            f"{task} data must be whole rows of block_size + 1 = {width} values, got "
            f"{tokens.numel()} values"
        )
    return tokens.view(-1, width)


def _check_width(rows: Tensor, config: GPTConfig) -> None:
    if rows.dim() != 2 or rows.shape[1] < 2 or rows.is_floating_point():
        raise ValueError(f"rows must be an int tensor (N, T+1), got {list(rows.shape)}")
    if rows.shape[1] > config.block_size + 1:
        raise ValueError(
            f"rows of {rows.shape[1]} values exceed block_size + 1 = {config.block_size + 1}"
        )


class LanguageModeling:
    """Next-token prediction on windows of a token stream (`to_sequences`)."""

    def rows(self, tokens: Tensor, config: GPTConfig) -> Tensor:
        _check_ids(tokens, config.vocab_size, "the data")
        return to_sequences(tokens, config.block_size)

    def check(self, rows: Tensor, config: GPTConfig) -> None:
        _check_width(rows, config)
        _check_ids(rows, config.vocab_size, "the data")

    def units(self, rows: Tensor) -> int:
        return rows.shape[0] * (rows.shape[1] - 1)

    def weight(self, rows: Tensor) -> float:
        return float(rows.shape[0])  # units / (T): every row has T targets

    def loss(self, model: GPT, rows: Tensor) -> Tensor:
        tokens = rows.long()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])  # (B, T) inputs, next-token targets
        assert loss is not None
        return loss

    @torch.no_grad()
    def evaluate(self, model: GPT, rows: Tensor) -> EvalCounts:
        n = self.units(rows)
        return EvalCounts(float(self.loss(model, rows)) * n, n)


class Classification:
    """Cross-entropy of the `score` head on each row's pooled hidden state."""

    def rows(self, tokens: Tensor, config: GPTConfig) -> Tensor:
        rows = _as_rows(tokens, config, "classify")
        self.check(rows, config)
        return rows

    def check(self, rows: Tensor, config: GPTConfig) -> None:
        _check_width(rows, config)
        if config.num_labels < 2:
            raise ValueError("classify needs a model with a classification head (num_labels >= 2)")
        if rows.shape[1] < 3:
            raise ValueError("classify rows need room for a label, a length and one token")
        labels, lengths = rows[:, 0], rows[:, 1]
        if rows.shape[0] == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= config.num_labels:
            raise ValueError(f"classify data has labels outside [0, {config.num_labels})")
        longest = rows.shape[1] - 2
        if int(lengths.min()) < 1 or int(lengths.max()) > longest:
            raise ValueError(f"classify data has example lengths outside [1, {longest}]")
        # Every position, padding too: a batch runs up to its longest example, so a shorter
        # one's padding goes through the embedding (it is 0 in the layout).
        _check_ids(rows[:, 2:], config.vocab_size, "classify data")

    def units(self, rows: Tensor) -> int:
        return rows.shape[0]

    def weight(self, rows: Tensor) -> float:
        return float(rows.shape[0])

    def _logits(self, model: GPT, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.long()
        lengths = rows[:, 1]
        # Only the longest example's width is run: padding never reaches a real token.
        width = max(1, int(lengths.max())) if rows.shape[0] else 1
        return model.classify(rows[:, 2 : 2 + width], lengths), rows[:, 0]

    def loss(self, model: GPT, rows: Tensor) -> Tensor:
        logits, labels = self._logits(model, rows)  # (B, L), (B,)
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def evaluate(self, model: GPT, rows: Tensor) -> EvalCounts:
        n_labels = model.config.num_labels
        logits, labels = self._logits(model, rows)
        loss_sum = float(F.cross_entropy(logits, labels, reduction="sum"))
        predicted = logits.argmax(dim=1)
        flat = torch.bincount(labels * n_labels + predicted, minlength=n_labels * n_labels)
        return EvalCounts(loss_sum, rows.shape[0], flat.view(n_labels, n_labels).cpu())


class InstructionTuning:
    """Next-token cross-entropy over the target tokens only (the response's)."""

    def rows(self, tokens: Tensor, config: GPTConfig) -> Tensor:
        rows = _as_rows(tokens, config, "sft")
        self.check(rows, config)
        return rows

    def check(self, rows: Tensor, config: GPTConfig) -> None:
        _check_width(rows, config)
        vocab = config.vocab_size
        if rows.numel() and (int(rows.min()) < -vocab or int(rows.max()) >= vocab):
            raise ValueError(f"sft data has values outside [-{vocab}, {vocab})")
        if rows.shape[0] and not bool((rows[:, 1:] >= 0).any(dim=1).all()):
            bad = int((~(rows[:, 1:] >= 0).any(dim=1)).nonzero()[0])
            raise ValueError(f"sft row {bad} has no target token (nothing to learn from)")

    def units(self, rows: Tensor) -> int:
        return int((rows[:, 1:] >= 0).sum())

    def weight(self, rows: Tensor) -> float:
        return float(self.units(rows))

    @staticmethod
    def split(rows: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (B, T): ids of row[:-1], and row[1:] with IGNORE where
        the value is no target."""
        rows = rows.long()
        ids = torch.where(rows < 0, -rows - 1, rows)
        targets = rows[:, 1:]
        return ids[:, :-1], targets.masked_fill(targets < 0, IGNORE)

    def loss(self, model: GPT, rows: Tensor) -> Tensor:
        x, y = self.split(rows)
        logits, _ = model(x)  # (B, T, V)
        if not bool((y != IGNORE).any()):
            return logits.sum() * 0.0  # no target here: a zero that still has a graph
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: GPT, rows: Tensor) -> EvalCounts:
        x, y = self.split(rows)
        logits, _ = model(x)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return EvalCounts(float(loss_sum), int((y != IGNORE).sum()))


TASKS: dict[str, Task] = {
    "lm": LanguageModeling(),
    "classify": Classification(),
    "sft": InstructionTuning(),
}
"""Task name (`TaskName`, the wire's `lmps.v1.Task` in lower case) -> its implementation."""


def task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


HEAD = "score."
"""Prefix of the classification head's parameters: what --freeze-backbone still trains."""


def trainable(name: str, freeze_backbone: bool) -> bool:
    """Whether the parameter `name` is trained (everything but the backbone when frozen)."""
    return not freeze_backbone or name.startswith(HEAD)


def decay_rule(freeze_backbone: bool) -> Callable[[str, Tensor], bool]:
    """The weight-decay mask of a job's shards (`ShardSpec.weight_decay`): the model's
    (`decay_mask`), and never on a frozen parameter. A frozen parameter's gradient is always
    zero, so with no decay SGD's and AdamW's updates of it are exactly zero: the servers
    leave it as it is with no other change to them."""

    def rule(name: str, param: Tensor) -> bool:
        return trainable(name, freeze_backbone) and decay_mask(name, param)

    return rule


@dataclass(frozen=True, eq=False)
class Evaluation:
    """An evaluation's outcome, as the coordinator reports it."""

    loss: float
    """Mean cross-entropy per unit (NaN with no eval data)."""
    count: int
    """Units scored (tokens, target tokens, examples)."""
    version: int
    """The parameter version evaluated."""
    accuracy: float = 0.0
    """classify: the fraction of examples whose argmax is their label."""
    macro_f1: float = 0.0
    """classify: see `classification_metrics`."""
    confusion: tuple[int, ...] = ()
    """classify: the (L, L) counts, row-major (row: true class)."""

    @staticmethod
    def of(counts: EvalCounts, version: int) -> Evaluation:
        loss = counts.loss_sum / counts.count if counts.count else float("nan")
        if counts.confusion is None:
            return Evaluation(loss, counts.count, version)
        accuracy, f1 = classification_metrics(counts.confusion)
        flat = tuple(int(x) for x in counts.confusion.flatten())
        return Evaluation(loss, counts.count, version, accuracy, f1, flat)


def classification_metrics(confusion: Tensor) -> tuple[float, float]:
    """(accuracy, macro-F1) of an (L, L) confusion matrix (row: true class). Macro-F1 is the
    mean over classes of 2·TP / (2·TP + FP + FN), over the classes that occur as a true or
    a predicted label (scikit-learn's with labels = those classes); (0, 0) when empty."""
    c = confusion.to(torch.float64)
    total = float(c.sum())
    if total == 0:
        return 0.0, 0.0
    tp = c.diagonal()
    support, predicted = c.sum(1), c.sum(0)
    seen = (support + predicted) > 0
    f1 = (2 * tp / (support + predicted).clamp(min=1))[seen]
    return float(tp.sum()) / total, float(f1.mean())
