"""Fine-tuning data: labelled texts and chats as the rows of the "classify" and "sft" tasks
(`lmps.core.tasks`), and the chat template; the bundled labelled set builtin:pydoc-topics is
`lmps.core.pydoc_topics`.

Each example is one int32 row of block_size + 1 values, in the wire's layout (`lmps.v1.Task`):

    classify  [label, n, id_1 .. id_n, 0 ...]    1 <= n <= block_size - 1, id_n = EOT
    sft       v >= 0: id v, a target; v < 0: id -v-1, not a target (padding -1)

A classified text is its tokens followed by `<|endoftext|>` (`lmps.core.data.EOT`), so the
head's last token is always EOT (GPT-2 classifiers' end token); a longer text keeps its first
block_size - 2 tokens and the EOT.

The chat template (`CHAT_TEMPLATE`) is plain text markers, so any byte-level BPE tokenizer
(lmps' own, GPT-2's) encodes it without new special tokens:

    <|system|>\\n{content}\\n                      (only where the conversation has one)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}<|endoftext|>\\n

Only each assistant turn's `{content}<|endoftext|>` is a target: the loss mask of InstructGPT
(Ouyang et al. 2022). Generation renders the conversation plus the generation prompt
`<|assistant|>\\n` (`prompt_ids`) and stops at EOT.

Encoding is piecewise: every marker, content and newline is encoded on its own and the EOT id
is inserted as one token, so a conversation's tokens never depend on its neighbours and
`prompt_ids(m)` is a prefix of `encode_chat(m + [reply])` exactly (a joined string could
merge differently across a boundary). A special token's text inside content (a user typing
"<|endoftext|>") is encoded as ordinary text, never as the special id: only the template
ends a turn.

Pure torch + `tokenizers`; deterministic; never touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lmps.core.data import EOT, jsonl_lines
from lmps.core.pydoc_topics import BUILTIN_PYDOC_TOPICS, pydoc_topic_passages

_BUILTINS = (BUILTIN_PYDOC_TOPICS,)
_IGNORE = -100  # torch's cross_entropy ignore_index, as lmps.core.tasks.IGNORE


# --- Reading .jsonl files ------------------------------------------------------------------


def _jsonl_records(source: str, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line of the .jsonl file `source`, where = path:line."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {source!r} not found: give a .jsonl file")
    if path.suffix != ".jsonl":
        raise ValueError(f"{what} file {source!r} must end in .jsonl (one JSON object a line)")
    for lineno, record in jsonl_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise ValueError(
                f"{where}: expected a JSON object per line, got {type(record).__name__}"
            )
        yield where, record


# --- Labelled texts ------------------------------------------------------------------------


def load_labelled(source: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of a classification data set; labels as strings (an int label 3 is
    "3", the same class as a string "3").

    `source` is a .jsonl file of `{"text": str, "label": str | int}` objects (other fields
    are ignored, blank lines tolerated), or "builtin:pydoc-topics". A bad line is a
    ValueError naming path:line.
    """
    if source.startswith("builtin:"):
        if source == BUILTIN_PYDOC_TOPICS:
            return pydoc_topic_passages()
        raise ValueError(f"unknown builtin data set {source!r}; choose one of: {_BUILTINS}")
    texts: list[str] = []
    labels: list[str] = []
    for where, record in _jsonl_records(source, "labelled data"):
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError(f'{where}: expected a string "text" field, e.g. {{"text": "..."}}')
        if not text.strip():
            raise ValueError(f"{where}: the text is empty; give every example some text")
        if "label" not in record:
            raise ValueError(f'{where}: missing "label"; give each text a string or int label')
        label = record["label"]
        # bool is an int subclass, and a float label (1.0) is likely a mistake: both refused.
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise ValueError(
                f'{where}: "label" must be a string or an integer, got {json.dumps(label)}'
            )
        if isinstance(label, str) and not label:
            raise ValueError(f'{where}: "label" is an empty string; name the class')
        texts.append(text)
        labels.append(str(label))
    if not texts:
        raise ValueError(
            f'{source}: no examples; expected lines like {{"text": ..., "label": ...}}'
        )
    return texts, labels


def split_labelled(
    texts: Sequence[str], labels: Sequence[str], eval_fraction: float
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train_texts, train_labels, eval_texts, eval_labels): the examples ordered by a hash of
    their text, the last `eval_fraction` of them (rounded down) held out.

    The order depends on each text alone, not on its position, so reordering the file moves
    nothing between the splits and identical texts always land in the same split (the eval
    can then be slightly smaller). Within a split the examples keep their input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")

    def key(i: int) -> bytes:
        return hashlib.blake2b(
            texts[i].encode("utf-8"), digest_size=8, person=b"lmps-split"
        ).digest()

    order = sorted(range(len(texts)), key=key)  # stable: identical texts stay adjacent
    cut = len(order) - int(len(order) * eval_fraction)
    while 0 < cut < len(order) and texts[order[cut]] == texts[order[cut - 1]]:
        cut += 1
    held = set(order[cut:])
    train = [i for i in range(len(texts)) if i not in held]
    eval_ = sorted(held)
    return (
        [texts[i] for i in train],
        [labels[i] for i in train],
        [texts[i] for i in eval_],
        [labels[i] for i in eval_],
    )


def load_labelled_split(
    source: str, eval_fraction: float
) -> tuple[list[str], list[str], list[str], list[str]]:
    """`load_labelled(source)` cut by `split_labelled`: (train_texts, train_labels,
    eval_texts, eval_labels), the same for the same file contents on every machine."""
    texts, labels = load_labelled(source)
    return split_labelled(texts, labels, eval_fraction)


_INT_LITERAL = re.compile(r"-?[0-9]+")


def label_names(labels: Sequence[str]) -> list[str]:
    """The class names of a split's labels, index = class id: the distinct labels sorted, in
    numeric order when every one is an integer literal ("2" < "10"), else string order."""
    names = set(labels)
    if len(names) < 2:
        raise ValueError(
            f"classification needs at least 2 classes, found {len(names)} "
            f"({sorted(names)}); label the examples with 2 or more distinct labels"
        )
    if all(_INT_LITERAL.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


@dataclass(frozen=True, eq=False)
class ClassifyRows:
    """Classification examples in the wire's layout (eq=False: tensors have no single truth
    value)."""

    rows: Tensor
    """int32 (N, block_size + 1): [label, n, id_1 .. id_n, 0 ...], id_n the EOT id."""
    truncated: int
    """Texts cut to their first block_size - 2 tokens (plus EOT) to fit."""


def classify_rows(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    labels: Sequence[str],
    names: Sequence[str],
    block_size: int,
) -> ClassifyRows:
    """One row per text: its class id (the index of its label in `names`), its length and its
    tokens ending with EOT. A label not in `names` is a ValueError naming it (an eval split
    may not have labels the train split lacks)."""
    if block_size < 2:
        raise ValueError(
            f"block_size must be >= 2 for classification (a label, a length and EOT fit in "
            f"block_size + 1 values), got {block_size}"
        )
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    class_id = {name: i for i, name in enumerate(names)}
    if len(class_id) != len(names):
        raise ValueError(f"class names must be distinct, got {list(names)}")
    unknown = sorted({label for label in labels if label not in class_id})
    if unknown:
        raise ValueError(
            f"label(s) {unknown} not among the classes {list(names)} (the train split's); "
            "every eval label must also occur in the train split"
        )
    encoder = _Encoder(tokenizer)
    keep = block_size - 2  # tokens of a text that fit before its EOT
    rows = torch.zeros((len(texts), block_size + 1), dtype=torch.int32)
    truncated = 0
    for i, (ids, label) in enumerate(zip(encoder.texts(texts), labels, strict=True)):
        if len(ids) > keep:
            ids = ids[:keep]
            truncated += 1
        ids.append(encoder.eot)
        rows[i, 0] = class_id[label]
        rows[i, 1] = len(ids)
        rows[i, 2 : 2 + len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return ClassifyRows(rows, truncated)


# --- Chats ---------------------------------------------------------------------------------

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)

ROLE_MARKERS: tuple[str, ...] = tuple(f"<|{role}|>" for role in ROLES)
"""The template's role markers as text: a reply that writes one has begun another turn."""

CHAT_TEMPLATE = (
    "<|system|>\n{content}\n"  # only where the conversation has a system message
    "<|user|>\n{content}\n"
    "<|assistant|>\n{content}<|endoftext|>\n"
)
"""The chat template, one message of each role (see the module docstring); only the
assistant's `{content}<|endoftext|>` is a target."""

GENERATION_PROMPT = "<|assistant|>\n"
"""What `prompt_ids` adds after the conversation: the model writes the assistant's turn."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise TypeError(f"content must be a string, got {type(self.content).__name__}")


def _messages(where: str, record: dict[str, Any]) -> list[Message]:
    has_messages, has_prompt = "messages" in record, "prompt" in record or "completion" in record
    if has_messages and has_prompt:
        raise ValueError(f'{where}: give either "messages" or "prompt" and "completion", not both')
    if not has_messages:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(
                f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} '
                'or {"prompt": str, "completion": str}'
            )
        return [Message("user", prompt), Message("assistant", completion)]
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
    messages: list[Message] = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {k} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(
                f"{where}: message {k} has role {json.dumps(role)}; use one of {ROLES}"
            )
        if not isinstance(content, str):
            raise ValueError(f'{where}: message {k} needs a string "content"')
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError(
            f"{where}: no assistant message, so nothing to learn; add the assistant's reply"
        )
    return messages


def load_chat(source: str) -> list[list[Message]]:
    """The conversations of a .jsonl file, one a line: `{"messages": [{"role", "content"},
    ...]}` (roles system, user, assistant; at least one assistant message) or
    `{"prompt": str, "completion": str}` (a user message and the assistant's reply). Other
    fields are ignored, blank lines tolerated; a bad line is a ValueError naming path:line."""
    conversations = [_messages(where, r) for where, r in _jsonl_records(source, "chat data")]
    if not conversations:
        raise ValueError(f'{source}: no conversations; expected lines like {{"messages": [...]}}')
    return conversations


@dataclass(frozen=True)
class _Piece:
    text: str
    target: bool
    eot: bool = False
    """The EOT special token itself (text == EOT), not content that happens to read so."""


def _pieces(messages: Sequence[Message], add_generation_prompt: bool) -> list[_Piece]:
    pieces: list[_Piece] = []
    for m in messages:
        pieces.append(_Piece(f"<|{m.role}|>\n", False))
        if m.role == "assistant":
            pieces += [_Piece(m.content, True), _Piece(EOT, True, eot=True)]
        else:
            pieces.append(_Piece(m.content, False))
        pieces.append(_Piece("\n", False))
    if add_generation_prompt:
        pieces.append(_Piece(GENERATION_PROMPT, False))
    return pieces


def render(
    messages: Sequence[Message], add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The conversation in `CHAT_TEMPLATE` as (text, is target) pieces, each encoded on its
    own; "".join of the texts is the rendered conversation. `add_generation_prompt`: end with
    `GENERATION_PROMPT` for the model to write the next assistant turn."""
    return [(p.text, p.target) for p in _pieces(messages, add_generation_prompt)]


class _Encoder:
    """Encodes text pieces as ordinary text: a special token's text inside them (a user's
    "<|endoftext|>") becomes the tokens of its characters, never the special id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"the tokenizer has no {EOT} token; fine-tuning needs it")
        self.eot: int = eot
        self.tokenizer = tokenizer
        self.specials = [
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        ]
        self._plain: Any = None

    def plain(self) -> Any:
        """A copy of the tokenizer that encodes special tokens' text as text (made once, on
        the first text that needs it, so the caller's tokenizer is never changed)."""
        if self._plain is None:
            self._plain = copy.deepcopy(self.tokenizer)
            self._plain.encode_special_tokens = True
        return self._plain

    def texts(self, texts: Sequence[str]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in texts]
        groups: dict[bool, list[int]] = {False: [], True: []}
        for i, t in enumerate(texts):
            if t:
                groups[any(s in t for s in self.specials)].append(i)
        for special, index in groups.items():
            if not index:
                continue
            tokenizer = self.plain() if special else self.tokenizer
            # add_special_tokens=False: no template tokens (a BOS) from a post-processor.
            encodings = tokenizer.encode_batch([texts[i] for i in index], add_special_tokens=False)
            for i, encoding in zip(index, encodings, strict=True):
                out[i] = list(encoding.ids)
        return out

    def chats(
        self, conversations: Sequence[Sequence[Message]], add_generation_prompt: bool
    ) -> list[tuple[list[int], list[bool]]]:
        """(ids, target mask) of each conversation; all pieces go through one batch."""
        all_pieces = [_pieces(c, add_generation_prompt) for c in conversations]
        flat = [p for pieces in all_pieces for p in pieces]
        encoded = iter(self.texts(["" if p.eot else p.text for p in flat]))
        out: list[tuple[list[int], list[bool]]] = []
        for pieces in all_pieces:
            ids: list[int] = []
            mask: list[bool] = []
            for p in pieces:
                piece_ids = next(encoded)
                if p.eot:
                    piece_ids = [self.eot]
                ids += piece_ids
                mask += [p.target] * len(piece_ids)
            out.append((ids, mask))
        return out


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(ids, is target) of a conversation in the chat template: True exactly for the tokens of
    each assistant turn's content and the EOT that ends it."""
    return _Encoder(tokenizer).chats([messages], add_generation_prompt=False)[0]


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """The ids that prompt the model for the next assistant turn: the conversation and the
    generation prompt, encoded as training encodes them (a prefix of `encode_chat` of the
    conversation plus the reply). Generation stops at EOT."""
    return _Encoder(tokenizer).chats([messages], add_generation_prompt=True)[0][0]


@dataclass(frozen=True, eq=False)
class SftRows:
    """Conversations in the wire's SFT layout (eq=False: tensors have no single truth value)."""

    rows: Tensor
    """int32 (N, block_size + 1): v >= 0 is id v and a target, v < 0 is id -v-1 and none;
    padding -1."""
    truncated: int
    """Kept conversations cut to their first block_size + 1 tokens."""
    dropped: int
    """Conversations left out: no target token left within the row once cut."""


def sft_rows(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], block_size: int
) -> SftRows:
    """One row per conversation: its first block_size + 1 tokens, each value signed by whether
    it is a target (see `SftRows.rows`). A row with no target among its predicted positions
    (row[1:]) is dropped; a ValueError if every conversation is."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    width = block_size + 1
    kept: list[Tensor] = []
    truncated = dropped = 0
    for ids, mask in _Encoder(tokenizer).chats(conversations, add_generation_prompt=False):
        cut = len(ids) > width
        values = torch.tensor(ids[:width], dtype=torch.int64)
        target = torch.tensor(mask[:width], dtype=torch.bool)
        values = torch.where(target, values, -values - 1)
        if not bool((values[1:] >= 0).any()):
            dropped += 1
            continue
        truncated += cut
        row = torch.full((width,), -1, dtype=torch.int32)
        row[: len(values)] = values.to(torch.int32)
        kept.append(row)
    if conversations and not kept:
        raise ValueError(
            f"all {len(conversations)} conversations were dropped: none has an assistant token "
            f"within its first {width} tokens (block_size + 1); raise block_size or shorten "
            "the prompts"
        )
    rows = torch.stack(kept) if kept else torch.empty((0, width), dtype=torch.int32)
    return SftRows(rows, truncated, dropped)


def decode_sft_row(row: Tensor) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of one SFT row (block_size + 1,), each (block_size,) int64, as the
    model consumes them: inputs the ids of row[:-1]; targets row[1:], -100 where no target."""
    row = row.long()
    ids = torch.where(row < 0, -row - 1, row)
    targets = row[1:]
    return ids[:-1], targets.masked_fill(targets < 0, _IGNORE)


def class_counts(labels: Sequence[str]) -> dict[str, int]:
    """How many examples each class has, by `label_names` order."""
    counts = Counter(labels)
    return {name: counts[name] for name in label_names(labels)}
