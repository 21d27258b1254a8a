"""Corpus preparation: load documents, train a byte-level BPE tokenizer, tokenize, split,
cut into training sequences and plan each epoch's data shards.

The tokenizer is GPT-2's kind (Radford et al. 2019): byte-pair encoding (Sennrich et al.,
ACL 2016) over bytes, so any text encodes with no unknown token; trained with Hugging Face
`tokenizers`.

Pure torch + `tokenizers`; never touches the network. Everything here is deterministic, so
the coordinator and every worker derive the same sequences and the same per-epoch order
from (corpus, vocab_size, seed, epoch) alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from lmps.core.files import atomic_write

EOT = "<|endoftext|>"
"""Special token placed between documents (GPT-2's name for it)."""

BUILTIN_PYDOC = "builtin:pydoc"
"""The default corpus: CPython's pydoc topic help texts (~460 KB of English prose and code)."""

_BUILTINS = (BUILTIN_PYDOC,)
_CACHE_FORMAT = 1  # bump when the cached files' layout or meaning changes
_MIN_VOCAB = 257  # 256 byte tokens + EOT


# --- Loading documents -------------------------------------------------------------------


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    # Sorted by topic name so the order does not depend on how the dict was written.
    return [topics[name] for name in sorted(topics)]


def _read_text(path: Path) -> str:
    """A .txt document; a file that is not UTF-8 text is a ValueError naming it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
            "convert it to UTF-8 or move it out of the corpus"
        ) from None
    if "\0" in text:
        raise ValueError(
            f"{path}: looks binary (NUL byte at offset {text.index(chr(0))}); "
            "move it out of the corpus"
        )
    # Universal newlines, as text-mode reading gives: \r\n and \r become \n.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) for each non-blank line of the .jsonl file `path`,
    counting from 1; a line that is not UTF-8 or not JSON is a ValueError naming path:line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue  # tolerate blank lines (e.g. a trailing newline)
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}); write one JSON object per line"
                ) from None
            yield lineno, value


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    for lineno, record in jsonl_lines(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
        docs.append(text)
    return docs


def _txt_files(directory: Path) -> list[Path]:
    # Sorted by path relative to the directory: the same order on every machine.
    return sorted(
        (p for p in directory.rglob("*.txt") if p.is_file()),
        key=lambda p: p.relative_to(directory).as_posix(),
    )


def load_corpus(source: str) -> list[str]:
    """Documents of a corpus.

    `source` is one of: "builtin:pydoc" (the default corpus, present in every CPython); a
    directory (every *.txt file under it, recursively, in sorted order, one document each);
    a .txt file (one document); a .jsonl file (the "text" field of each line).
    """
    if source.startswith("builtin:"):
        if source == BUILTIN_PYDOC:
            return _pydoc_documents()
        raise ValueError(f"unknown builtin corpus {source!r}; choose one of: {_BUILTINS}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {source!r} not found: give a directory of .txt files, a .txt or .jsonl "
            f"file, or {BUILTIN_PYDOC!r}"
        )
    if path.is_dir():
        files = _txt_files(path)
        if not files:
            raise ValueError(f"corpus directory {source!r} contains no .txt files")
        return [_read_text(p) for p in files]
    if path.suffix == ".txt":
        return [_read_text(path)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise ValueError(f"corpus file {source!r} must end in .txt or .jsonl")


# --- Tokenizer ---------------------------------------------------------------------------


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `docs`, with `EOT` as its only
    special token. Any text round-trips, since all 256 bytes are in the vocabulary. On a
    small corpus the vocabulary may end up below `vocab_size` (no more merges to learn)."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + EOT), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write `tokenizer` as the `tokenizers` JSON file `path`."""
    tokenizer.save(str(path))


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer written by `save_tokenizer` (or any `tokenizers` JSON file)."""
    return Tokenizer.from_file(str(path))


def encode_corpus(tokenizer: Tokenizer, docs: Sequence[str]) -> Tensor:
    """All documents as one 1-D int32 tensor of token ids, with the EOT id between documents."""
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    ids: list[int] = []
    # encode_batch runs in parallel inside the Rust library.
    for i, encoding in enumerate(tokenizer.encode_batch(list(docs))):
        if i:
            ids.append(eot_id)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int32)


# --- Splits, sequences, epoch order ------------------------------------------------------


def split_tokens(tokens: Tensor, eval_fraction: float) -> tuple[Tensor, Tensor]:
    """(train, eval): the last `eval_fraction` of `tokens` (rounded down) is held out."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(len(tokens) * eval_fraction)
    cut = len(tokens) - n_eval
    # Copies, not views: separate storages can be saved (safetensors refuses shared ones).
    return tokens[:cut].clone(), tokens[cut:].clone()


def to_sequences(tokens: Tensor, block_size: int) -> Tensor:
    """Non-overlapping training windows, int32 (N, block_size + 1).

    Row i is tokens[i*block_size : (i+1)*block_size + 1]: inputs are row[:-1], targets
    row[1:]. Consecutive rows share one boundary token so no target is lost; a remainder
    too short for a full row is dropped.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n = max(0, (len(tokens) - 1) // block_size)
    if n == 0:
        return torch.empty((0, block_size + 1), dtype=torch.int32)
    # unfold gives an overlapping strided view (N, block_size + 1); contiguous() copies it.
    windows = tokens[: n * block_size + 1].unfold(0, block_size + 1, block_size)
    return windows.contiguous().to(torch.int32)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A permutation of range(n) (int64) that depends only on (seed, epoch)."""
    # Hash (seed, epoch) into one 64-bit generator seed: nearby pairs like (1, 0) and (0, 1)
    # must not collide, and the mapping must not depend on Python's per-process hash salt.
    digest = hashlib.blake2b(f"lmps-epoch:{seed}:{epoch}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return torch.randperm(n, generator=generator)


def plan_data_shards(
    n_sequences: int, batch_size: int, batches_per_lease: int, seed: int, epoch: int
) -> list[Tensor]:
    """The epoch's data shards: `epoch_order` cut into consecutive pieces of
    `batches_per_lease` full batches (int64 sequence indices, batch-major). The last shard
    may hold fewer batches; sequences that do not fill a last batch are dropped this epoch
    (a different order next epoch drops different ones)."""
    if n_sequences < 0:
        raise ValueError(f"n_sequences must be >= 0, got {n_sequences}")
    if batch_size <= 0 or batches_per_lease <= 0:
        raise ValueError(
            f"batch_size and batches_per_lease must be positive, got {batch_size} and "
            f"{batches_per_lease}"
        )
    order = epoch_order(n_sequences, seed, epoch)
    kept = order[: (n_sequences // batch_size) * batch_size]
    if len(kept) == 0:
        return []  # split() of an empty tensor would yield one empty shard
    return [shard.clone() for shard in kept.split(batch_size * batches_per_lease)]


# --- Prepared corpus with an on-disk cache -----------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedCorpus:
    """A tokenized corpus ready for training (eq=False: tensors have no single truth value)."""

    tokenizer_json: str
    """The tokenizer as `tokenizers` JSON (Tokenizer.from_str reads it back)."""
    train: Tensor
    """Training tokens, 1-D int32."""
    eval: Tensor
    """Held-out tokens (the corpus's tail), 1-D int32."""
    vocab_size: int
    """The tokenizer's actual vocabulary size: every id is below it. Can be below the size
    asked for when the corpus is too small to learn that many merges."""
    source: str
    """The corpus source string it was prepared from."""

    def tokenizer(self) -> Tokenizer:
        """A fresh Tokenizer object from `tokenizer_json`."""
        return Tokenizer.from_str(self.tokenizer_json)


def _source_fingerprint(source: str) -> object:
    """What identifies a source's contents cheaply: the text itself for builtins (it changes
    with the Python version), else resolved paths with sizes and mtimes."""
    if source.startswith("builtin:"):
        text_hash = hashlib.sha256()
        for doc in load_corpus(source):
            text_hash.update(doc.encode("utf-8"))
            text_hash.update(b"\0")
        return [source, text_hash.hexdigest()]
    path = Path(source)
    if not path.exists():
        load_corpus(source)  # raises the helpful FileNotFoundError
    files = _txt_files(path) if path.is_dir() else [path]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return [str(path.resolve()), stats]


def _cache_key(source: str, vocab_size: int, eval_fraction: float) -> str:
    key = {
        "format": _CACHE_FORMAT,
        "tokenizers": tokenizers.__version__,  # a new version might train differently
        "source": _source_fingerprint(source),
        "vocab_size": vocab_size,
        "eval_fraction": eval_fraction,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def prepare_corpus(
    source: str,
    vocab_size: int,
    eval_fraction: float = 0.05,
    cache_dir: Path | None = None,
) -> PreparedCorpus:
    """Load, tokenize and split `source`; see `load_corpus` for the accepted sources.

    With `cache_dir`, results are kept under cache_dir/<key>/ as tokenizer.json and
    tokens.safetensors (tensors "train" and "eval"), keyed by the source's contents (or
    paths, sizes and mtimes), `vocab_size` and `eval_fraction`; a later call with the same
    key reads them back instead of retraining.
    """
    entry: Path | None = None
    if cache_dir is not None:
        entry = Path(cache_dir) / _cache_key(source, vocab_size, eval_fraction)
        tokenizer_path, tokens_path = entry / "tokenizer.json", entry / "tokens.safetensors"
        # tokens.safetensors is written last, so its presence means the entry is complete.
        if tokens_path.exists() and tokenizer_path.exists():
            tokenizer = load_tokenizer(tokenizer_path)
            tensors = load_file(str(tokens_path))
            return PreparedCorpus(
                tokenizer_json=tokenizer.to_str(),
                train=tensors["train"],
                eval=tensors["eval"],
                vocab_size=tokenizer.get_vocab_size(),
                source=source,
            )

    docs = load_corpus(source)
    tokenizer = train_tokenizer(docs, vocab_size)
    train, eval_ = split_tokens(encode_corpus(tokenizer, docs), eval_fraction)
    prepared = PreparedCorpus(
        tokenizer_json=tokenizer.to_str(),
        train=train,
        eval=eval_,
        vocab_size=tokenizer.get_vocab_size(),
        source=source,
    )
    if entry is not None:
        entry.mkdir(parents=True, exist_ok=True)
        # Atomic, so a concurrent reader (another process preparing the same corpus) never
        # sees half a file; not fsynced: a cache lost to a power cut is just prepared again.
        atomic_write(
            entry / "tokenizer.json", lambda p: save_tokenizer(tokenizer, p), durable=False
        )
        atomic_write(
            entry / "tokens.safetensors",
            lambda p: save_file(
                {"train": train, "eval": eval_}, str(p), metadata={"source": source}
            ),
            durable=False,
        )
    return prepared
