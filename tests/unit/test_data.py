"""Unit tests for lmps.core.data: loaders, tokenizer, sequences, epoch order, shards, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lmps.core import data
from lmps.core.data import (
    EOT,
    encode_corpus,
    epoch_order,
    load_corpus,
    load_tokenizer,
    plan_data_shards,
    prepare_corpus,
    save_tokenizer,
    split_tokens,
    to_sequences,
    train_tokenizer,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def f(x):\n    return x * 2  # doubles\n" * 20,
    "Ünïcödé text — with “quotes” and emoji 🦊 survives. " * 10,
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(DOCS, vocab_size=400)


# --- load_corpus -------------------------------------------------------------------------


def test_builtin_pydoc_corpus() -> None:
    from pydoc_data.topics import topics

    docs = load_corpus("builtin:pydoc")
    assert sorted(docs) == sorted(topics.values())
    assert docs == load_corpus("builtin:pydoc")  # stable order
    assert sum(map(len, docs)) > 100_000


def test_unknown_builtin_rejected() -> None:
    with pytest.raises(ValueError, match="unknown builtin corpus 'builtin:nope'"):
        load_corpus("builtin:nope")


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert load_corpus(str(path)) == ["line one\nline two\n"]


def test_directory_reads_txt_files_recursively_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("SUB-A", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_corpus(str(tmp_path)) == ["A", "B", "SUB-A"]


def test_empty_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no \.txt files"):
        load_corpus(str(tmp_path))


def test_jsonl_reads_text_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second\nline"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_corpus(str(path)) == ["first", "second\nline"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', "c.jsonl:2: invalid JSON"),
        ('{"body": "no text field"}', "c.jsonl:2: expected a JSON object with a string 'text'"),
        ('{"text": 5}', "c.jsonl:2: expected a JSON object"),
        ('["text"]', "c.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_bad_line_names_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_corpus(str(path))


def test_missing_path_is_helpful(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not found.*builtin:pydoc"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_other_file_suffix_rejected(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must end in \.txt or \.jsonl"):
        load_corpus(str(path))


# --- Tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trips_any_text(tokenizer: Tokenizer) -> None:
    assert tokenizer.token_to_id(EOT) == 0
    assert tokenizer.get_vocab_size() <= 400
    # Byte-level: text never seen in training (other scripts, emoji) still round-trips.
    for text in [*DOCS, "Привет, мир! 你好 \t\n  spaces  ", ""]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text


def test_tokenizer_learns_merges_and_is_deterministic(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() > 257  # merges beyond the 256 bytes + EOT
    assert train_tokenizer(DOCS, vocab_size=400).to_str() == tokenizer.to_str()
    # Merges compress: fewer tokens than bytes.
    assert len(tokenizer.encode(DOCS[0]).ids) < len(DOCS[0].encode()) / 2


def test_tokenizer_training_is_reproducible_in_a_new_process(tokenizer: Tokenizer) -> None:
    # Fresh process = fresh hash seeds and thread pool: the coordinator and the workers must
    # still agree on the tokenizer.
    code = (
        "import json, sys; from lmps.core.data import train_tokenizer; "
        "print(train_tokenizer(json.loads(sys.stdin.read()), 400).to_str())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(DOCS),
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "RAYON_NUM_THREADS": "1"},
    )
    assert result.stdout.strip() == tokenizer.to_str()


def test_tokenizer_vocab_size_too_small_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_tokenizer(DOCS, vocab_size=100)


def test_save_and_load_tokenizer(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    assert loaded.encode(DOCS[1]).ids == tokenizer.encode(DOCS[1]).ids
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size()


def test_encode_corpus_joins_documents_with_eot(tokenizer: Tokenizer) -> None:
    tokens = encode_corpus(tokenizer, DOCS)
    assert tokens.dtype == torch.int32 and tokens.ndim == 1
    expected: list[int] = []
    for i, doc in enumerate(DOCS):
        expected += ([0] if i else []) + tokenizer.encode(doc).ids
    assert tokens.tolist() == expected
    assert (tokens == 0).sum().item() == len(DOCS) - 1
    assert tokenizer.decode(tokens.tolist(), skip_special_tokens=False) == EOT.join(DOCS)


# --- split_tokens / to_sequences ---------------------------------------------------------


def test_split_tokens_holds_out_the_tail() -> None:
    tokens = torch.arange(100, dtype=torch.int32)
    train, eval_ = split_tokens(tokens, 0.1)
    assert train.tolist() == list(range(90)) and eval_.tolist() == list(range(90, 100))
    train, eval_ = split_tokens(tokens, 0.0)
    assert len(train) == 100 and len(eval_) == 0
    with pytest.raises(ValueError, match="eval_fraction"):
        split_tokens(tokens, 1.0)


def test_to_sequences_rows_hold_inputs_and_shifted_targets() -> None:
    tokens = torch.arange(23, dtype=torch.int32)
    seqs = to_sequences(tokens, block_size=5)
    assert seqs.shape == (4, 6) and seqs.dtype == torch.int32 and seqs.is_contiguous()
    assert seqs[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert seqs[1].tolist() == [5, 6, 7, 8, 9, 10]  # stride block_size, not block_size+1
    x, y = seqs[:, :-1], seqs[:, 1:]
    assert torch.equal(y, x + 1)  # every target is the token after its input
    assert seqs[-1].tolist() == [15, 16, 17, 18, 19, 20]  # 21, 22 left over: dropped


def test_to_sequences_too_short_is_empty() -> None:
    assert to_sequences(torch.arange(5, dtype=torch.int32), 5).shape == (0, 6)
    assert to_sequences(torch.arange(6, dtype=torch.int32), 5).shape == (1, 6)


@given(n=st.integers(0, 300), block_size=st.integers(1, 40))
@settings(max_examples=100, deadline=None)
def test_to_sequences_covers_every_input_position_once(n: int, block_size: int) -> None:
    tokens = torch.arange(n, dtype=torch.int32)
    seqs = to_sequences(tokens, block_size)
    assert seqs.shape == (max(0, (n - 1) // block_size), block_size + 1)
    inputs = seqs[:, :-1].flatten().tolist()
    assert inputs == list(range(len(inputs)))  # contiguous, non-overlapping windows
    assert n - len(inputs) <= block_size  # at most a partial window (plus one) is lost


# --- epoch_order / plan_data_shards ------------------------------------------------------


def test_epoch_order_is_a_deterministic_permutation() -> None:
    order = epoch_order(1000, seed=3, epoch=0)
    assert order.dtype == torch.long
    assert sorted(order.tolist()) == list(range(1000))
    assert torch.equal(order, epoch_order(1000, seed=3, epoch=0))
    assert not torch.equal(order, epoch_order(1000, seed=3, epoch=1))
    assert not torch.equal(order, epoch_order(1000, seed=4, epoch=0))
    # (seed, epoch) pairs are hashed, not added: (3, 1) and (4, 0) differ too.
    assert not torch.equal(epoch_order(1000, 3, 1), epoch_order(1000, 4, 0))


def test_epoch_order_ignores_global_rng() -> None:
    torch.manual_seed(0)
    a = epoch_order(50, 1, 2)
    torch.manual_seed(99)
    assert torch.equal(a, epoch_order(50, 1, 2))


def test_plan_data_shards_example() -> None:
    shards = plan_data_shards(103, batch_size=4, batches_per_lease=8, seed=0, epoch=0)
    assert [len(s) for s in shards] == [32, 32, 32, 4]  # 25 full batches; 3 sequences dropped
    assert torch.equal(torch.cat(shards), epoch_order(103, 0, 0)[:100])
    with pytest.raises(ValueError, match="must be positive"):
        plan_data_shards(10, batch_size=0, batches_per_lease=1, seed=0, epoch=0)


@given(
    n=st.integers(0, 500),
    batch_size=st.integers(1, 17),
    batches_per_lease=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 50),
)
@settings(max_examples=150, deadline=None)
def test_plan_data_shards_cover_kept_sequences_once(
    n: int, batch_size: int, batches_per_lease: int, seed: int, epoch: int
) -> None:
    shards = plan_data_shards(n, batch_size, batches_per_lease, seed, epoch)
    sizes = [len(s) for s in shards]
    assert all(size % batch_size == 0 and size > 0 for size in sizes)  # no partial batch
    assert all(size == batch_size * batches_per_lease for size in sizes[:-1])
    assert not sizes or sizes[-1] <= batch_size * batches_per_lease
    flat = torch.cat(shards).tolist() if shards else []
    assert len(flat) == len(set(flat)) == (n // batch_size) * batch_size  # each kept once
    assert all(0 <= i < n for i in flat)
    assert all(s.dtype == torch.long for s in shards)


# --- prepare_corpus ----------------------------------------------------------------------


def _write_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return path


def test_prepare_corpus_without_cache(tmp_path: Path) -> None:
    source = str(_write_corpus(tmp_path))
    prepared = prepare_corpus(source, vocab_size=400, eval_fraction=0.1)
    tokenizer = prepared.tokenizer()
    assert prepared.source == source
    assert prepared.vocab_size == tokenizer.get_vocab_size() <= 400
    assert prepared.train.dtype == prepared.eval.dtype == torch.int32
    all_tokens = torch.cat([prepared.train, prepared.eval])
    assert torch.equal(all_tokens, encode_corpus(tokenizer, DOCS))
    assert len(prepared.eval) == int(len(all_tokens) * 0.1)
    assert int(all_tokens.max()) < prepared.vocab_size


def test_prepare_corpus_cache_hit_skips_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(_write_corpus(tmp_path))
    cache = tmp_path / "cache"
    first = prepare_corpus(source, vocab_size=400, eval_fraction=0.1, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["tokenizer.json", "tokens.safetensors"]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: the tokenizer was retrained")

    monkeypatch.setattr(data, "train_tokenizer", fail)
    second = prepare_corpus(source, vocab_size=400, eval_fraction=0.1, cache_dir=cache)
    assert torch.equal(second.train, first.train) and torch.equal(second.eval, first.eval)
    assert second.vocab_size == first.vocab_size
    assert second.tokenizer().encode(DOCS[2]).ids == first.tokenizer().encode(DOCS[2]).ids

    # A different vocab size or fraction is a different key: it misses (and trains).
    with pytest.raises(AssertionError, match="cache miss"):
        prepare_corpus(source, vocab_size=300, eval_fraction=0.1, cache_dir=cache)
    with pytest.raises(AssertionError, match="cache miss"):
        prepare_corpus(source, vocab_size=400, eval_fraction=0.2, cache_dir=cache)


def test_prepare_corpus_cache_invalidated_by_changed_source(tmp_path: Path) -> None:
    path = _write_corpus(tmp_path)
    cache = tmp_path / "cache"
    first = prepare_corpus(str(path), vocab_size=300, eval_fraction=0.0, cache_dir=cache)
    path.write_text(json.dumps({"text": "something else entirely"}) + "\n", encoding="utf-8")
    second = prepare_corpus(str(path), vocab_size=300, eval_fraction=0.0, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert second.tokenizer().decode(second.train.tolist()) == "something else entirely"
    assert not torch.equal(first.train, second.train)


def test_prepare_corpus_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_corpus(str(tmp_path / "nope"), vocab_size=300, cache_dir=tmp_path / "cache")
