"""`lmps predict`: the class of each text under a `--task classify` model, with the
probability of every class.

A text is encoded exactly as training encoded it (`lmps.core.task_data.classify_rows`: its
tokens, the first block_size - 2 of a longer text, then `<|endoftext|>`), the rows run through
`GPT.classify` in batches, and a softmax over the head's logits gives the probabilities.
Reading the texts (arguments, a file, stdin) and showing the result (a rich table, JSON
lines) are separate functions, so each is testable without a terminal or a cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmps.core.task_data import ClassifyRows, classify_rows

if TYPE_CHECKING:
    from lmps.client.model_io import TrainedModel

BATCH = 64
"""Texts per forward: enough to use the cores, few enough to bound the memory."""


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one text."""

    text: str
    label: str
    """The most likely class's name."""
    probs: tuple[tuple[str, float], ...]
    """(class name, probability) of every class, most likely first (ties: class order)."""
    truth: str | None = None
    """The text's own label where the input gave one (a `{"text", "label"}` line)."""

    def top(self, k: int | None) -> tuple[tuple[str, float], ...]:
        return self.probs if k is None else self.probs[:k]


@dataclass(frozen=True)
class Text:
    """One text to classify, where it came from (for error messages) and its label if any."""

    text: str
    where: str
    truth: str | None = None


def check_classifier(trained: TrainedModel, source: str) -> None:
    """A ValueError naming `source` unless the model is a `--task classify` model."""
    if trained.task == "classify" and trained.model.score is not None and trained.labels:
        return
    other = "lmps chat" if trained.task == "sft" else "lmps generate"
    raise ValueError(
        f"{source} was trained with --task {trained.task}: `lmps predict` needs a "
        f"--task classify model; use `{other}`"
    )


def texts_from_args(texts: Sequence[str]) -> list[Text]:
    return [Text(t, f"text {i + 1}") for i, t in enumerate(texts)]


def texts_from_lines(lines: Iterable[str], name: str, *, json_only: bool = False) -> list[Text]:
    """The texts of a file: one per line, plain text or a JSON object with "text" (and
    optionally "label", then the output says whether the prediction matches); blank lines
    are skipped. `json_only` (a .jsonl file): every line must be such an object."""
    out: list[Text] = []
    for number, line in enumerate(lines, 1):
        raw = line.rstrip("\r\n")
        if not raw.strip():
            continue
        where = f"{name} line {number}"
        value: object = None
        if raw.lstrip().startswith("{"):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as err:
                if json_only:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if isinstance(value, dict):
            text = value.get("text")
            if not isinstance(text, str):
                raise ValueError(f'{where}: expected {{"text": "..."}}, a string under "text"')
            label = value.get("label")
            truth = None if label is None or isinstance(label, bool) else str(label)
            out.append(Text(text, where, truth))
        elif json_only:
            raise ValueError(f'{where}: expected a JSON object {{"text": "..."}} per line')
        else:
            out.append(Text(raw, where))
    return out


def texts_from_file(path: str, stdin: IO[str]) -> list[Text]:
    """`--file F.jsonl | F.txt | -` (stdin)."""
    if path == "-":
        return texts_from_lines(stdin, "stdin")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--file {path}: no such file; pass a .jsonl or text file, or -")
    with file.open(encoding="utf-8") as f:
        return texts_from_lines(f, path, json_only=file.suffix == ".jsonl")


def check_texts(texts: Sequence[Text]) -> None:
    if not texts:
        raise ValueError(
            "no text to classify: pass texts as arguments, or --file F.jsonl (- for stdin)"
        )
    for t in texts:
        if not t.text.strip():
            raise ValueError(f"{t.where} is empty: give every text something to classify")


def encode(trained: TrainedModel, texts: Sequence[str]) -> ClassifyRows:
    """The texts as classify rows (N, block_size + 1), `[label, n, ids..., EOT, 0...]`,
    exactly as training builds them (the label column is a placeholder here), and how many
    were cut to fit."""
    if trained.tokenizer is None:
        raise ValueError("this model has no tokenizer to encode the texts with")
    names = list(trained.labels)
    return classify_rows(
        trained.tokenizer, list(texts), [names[0]] * len(texts), names, trained.config.block_size
    )


@torch.no_grad()
def probabilities(trained: TrainedModel, rows: torch.Tensor) -> torch.Tensor:
    """(N, num_labels) float32 class probabilities of classify `rows` (N, W), each row of
    the result summing to 1."""
    model = trained.model
    rows = rows.long()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for batch in rows.split(BATCH):
            lengths = batch[:, 1]
            width = int(lengths.max())  # only the longest text's width runs (as training)
            logits = model.classify(batch[:, 2 : 2 + width].to(device), lengths)  # (b, L)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


@dataclass(frozen=True)
class Predictions:
    items: list[Prediction]
    """One a text, in input order."""
    truncated: int
    """Texts longer than the model's window, cut as training cuts them (their first
    block_size - 2 tokens and EOT)."""


def predict(trained: TrainedModel, texts: Sequence[Text]) -> Predictions:
    """Each text's class and the probability of every class, most likely first."""
    names = trained.labels
    encoded = encode(trained, [t.text for t in texts])
    probs = probabilities(trained, encoded.rows)
    items = []
    for t, row in zip(texts, probs, strict=True):
        order = sorted(range(len(names)), key=lambda i: (-float(row[i]), i))
        ranked = tuple((names[i], float(row[i])) for i in order)
        items.append(Prediction(t.text, ranked[0][0], ranked, t.truth))
    return Predictions(items, encoded.truncated)


def accuracy(predictions: Sequence[Prediction]) -> tuple[int, int]:
    """(right, labelled): predictions that match the input's own label, of those that had one."""
    labelled = [p for p in predictions if p.truth is not None]
    return sum(p.label == p.truth for p in labelled), len(labelled)


def to_json(prediction: Prediction, top: int | None = None) -> str:
    """One JSON line: text, label, probs (name -> probability, most likely first; the `top`
    classes only when given) and, where the input had one, its own label as "true"."""
    fields: dict[str, object] = {
        "text": prediction.text,
        "label": prediction.label,
        "probs": {name: round(p, 6) for name, p in prediction.top(top)},
    }
    if prediction.truth is not None:
        fields["true"] = prediction.truth
    return json.dumps(fields, ensure_ascii=False)


def _pack(items: Sequence[str], width: int, sep: str = "  ") -> str:
    """`items` joined by `sep`, on as few lines of at most `width` characters as fit (an
    item longer than that alone on its line): a class and its probability stay together."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return "\n".join(lines)


def table(predictions: Sequence[Prediction], top: int | None = None, width: int = 100) -> Table:
    """One row a text, in `width` columns: the text (cut to what the other columns leave,
    8 to 48 characters), the predicted label, the input's own label where it had one and
    the probabilities of the `top` classes (all by default), most likely first, wrapped
    between classes when they do not fit on one line."""
    show_truth = any(p.truth is not None for p in predictions)
    rows, probs = [], []
    for i, p in enumerate(predictions, 1):
        probs.append([f"{name} {value:.3f}" for name, value in p.top(top)])
        mark = "" if p.truth is None else ("✓ " if p.truth == p.label else "✗ ")
        truth = [mark + (p.truth or "")] if show_truth else []
        rows.append([str(i), " ".join(p.text.split()), p.label, *truth, "  ".join(probs[-1])])
    headers = ["#", "text", "label", *(["true"] if show_truth else []), "probabilities"]
    natural = [max([len(h), *(len(r[c]) for r in rows)]) for c, h in enumerate(headers)]
    fixed = natural[0] + sum(natural[2:-1]) + 2 * (len(headers) - 1)  # 2: each gap
    # The text takes up to 48 characters that the probabilities on one line leave; when they
    # do not fit on one line it keeps up to 24 and they wrap in the rest.
    room = width - fixed
    if room - natural[-1] >= min(natural[1], 24):
        text_width = min(48, natural[1], room - natural[-1])
    else:
        text_width = min(natural[1], 24, room - 16)
    text_width = max(8, text_width)
    probs_width = max(16, room - text_width)
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("text", no_wrap=True, overflow="ellipsis", width=text_width)
    for h in headers[2:]:
        t.add_column(h, no_wrap=True)
    for r, items in zip(rows, probs, strict=True):
        t.add_row(*(escape(x) for x in r[:-1]), escape(_pack(items, probs_width)))
    return t


def show(
    predictions: Sequence[Prediction], console: Console, *, top: int | None, as_json: bool
) -> None:
    if as_json:
        for p in predictions:
            console.file.write(to_json(p, top) + "\n")
        console.file.flush()
        return
    console.print(table(predictions, top, console.width))
    right, labelled = accuracy(predictions)
    if labelled:
        console.print(f"accuracy {right / labelled:.3f} ({right}/{labelled} labelled texts)")


def cmd_predict(args: argparse.Namespace) -> int:
    from lmps.client.cli_common import console
    from lmps.client.model_io import open_model

    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    texts = texts_from_args(args.texts)
    if args.file is not None:
        texts += texts_from_file(args.file, sys.stdin)
    check_texts(texts)  # before the model is loaded
    trained, source = open_model(args.model, args.job, args.coordinator)
    check_classifier(trained, source)
    found = predict(trained, texts)
    if found.truncated:
        print(
            f"lmps: note: {found.truncated} text(s) longer than block_size "
            f"{trained.config.block_size} were cut to their first "
            f"{trained.config.block_size - 2} tokens, as training cuts them",
            file=sys.stderr,
        )
    show(found.items, console, top=args.top, as_json=args.json)
    return 0
