"""Issue 11, `lmps generate --model DIR` as a real process on a saved (random) model: text
streams to stdout while the process still runs, greedy text is the same with and without
the KV cache (and past block_size), stop strings cut it, a final stderr line gives tokens/s,
and bad input is one error line naming the culprit. (`--job` against a real cluster:
tests/cluster/test_job_lifecycle.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from lmps.client import model_io
from lmps.client.generation import generate_text
from lmps.core.data import train_tokenizer
from lmps.core.generation import SamplingSettings
from lmps.core.model import init_model, preset

pytestmark = pytest.mark.cluster  # real processes, one per command

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
# Streaming must not rely on PYTHONUNBUFFERED (any value, even "0", turns buffering off).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
TEXT = "the parameter server holds shards of every tensor; workers pull and push them\n" * 60
PROMPT = "the parameter"
RATE = re.compile(
    r"^(\d+) tokens in [\d.]+s: [\d.]+ tokens/s \((KV cache on, (\d+)/\d+ steps cached"
    r"|no KV cache); first token \d+ ms\)$"
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (block_size 128) with random weights, saved as `lmps train` does."""
    config = preset("tiny", 300)
    tokenizer = train_tokenizer(TEXT.splitlines(), 300)
    out = tmp_path_factory.mktemp("generate") / "model"
    model_io.save(model_io.TrainedModel(init_model(config, seed=0), config, tokenizer), out)
    return out


def run_all(argvs: Sequence[Sequence[str]], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Several `lmps` commands at once (each pays torch's import), in the order given."""
    procs = [
        subprocess.Popen(
            [*LMPS, *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for argv in argvs
    ]
    done = []
    for argv, proc in zip(argvs, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            proc.kill()
        text = (out + err).decode()
        assert "Traceback" not in text, text
        result = subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())
        done.append(result)
    return done


def rate_line(result: subprocess.CompletedProcess[str]) -> re.Match[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    m = RATE.match(lines[0])
    assert m, lines[0]
    return m


def test_greedy_text_with_and_without_the_cache_and_stop_strings(
    saved: Path, tmp_path: Path
) -> None:
    trained = model_io.load(saved)
    # 150 new tokens run past block_size 128: the last steps recompute the window.
    expected = generate_text(
        trained.model,
        trained.tokenizer,
        PROMPT,
        SamplingSettings(max_new_tokens=150, temperature=0),
    )
    assert len(expected.text) > 20
    stop = expected.text[20:23]
    cut = expected.text[: expected.text.index(stop)]
    greedy = ["generate", "--model", str(saved), PROMPT, "--temperature", "0"]
    cached, uncached, stopped, unstreamed = run_all(
        [
            [*greedy, "--max-new-tokens", "150"],
            [*greedy, "--max-new-tokens", "150", "--no-cache"],
            [*greedy, "--max-tokens", "150", "--stop", stop, "--stop", "never there"],
            ["generate", "--model", str(saved), "--prompt", PROMPT, "--temperature", "0",
             "--max-new-tokens", "150", "--no-stream"],
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert cached.stdout == uncached.stdout == unstreamed.stdout == f"{PROMPT}{expected.text}\n"
    on, off = rate_line(cached), rate_line(uncached)
    assert on.group(1) == off.group(1) == "150"
    prompt_len = len(trained.tokenizer.encode(PROMPT).ids) if trained.tokenizer else 0
    assert on.group(3) == str(128 - prompt_len + 1)  # the steps whose context fit the cache
    assert off.group(2) == "no KV cache"
    assert stopped.stdout == f"{PROMPT}{cut}\n"
    assert int(rate_line(stopped).group(1)) < 150


def test_tokens_stream_while_the_process_runs(saved: Path, tmp_path: Path) -> None:
    # Sampling settings and seeds in use; a run this long would take minutes.
    argv = ["generate", "--model", str(saved), PROMPT, "--max-new-tokens", "100000"]
    argv += ["--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "3"]
    proc = subprocess.Popen(
        [*LMPS, *argv], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        chunks: list[bytes] = []
        deadline = time.monotonic() + 120
        while sum(map(len, chunks)) < len(PROMPT) + 40 and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        got = b"".join(chunks)
        assert got.startswith(PROMPT.encode()) and len(got) >= len(PROMPT) + 40, got
        assert proc.poll() is None, "the text came only when the process ended"
        # Flushed piece by piece: a block-buffered stdout would deliver 8 KiB at once.
        assert len(chunks[0]) < 4096 and len(chunks) > 1, [len(c) for c in chunks]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and b"Traceback" not in err, err
    finally:
        proc.kill()


def test_bad_input_is_one_line_naming_the_culprit(saved: Path, tmp_path: Path) -> None:
    model = ["generate", "--model", str(saved)]
    missing, top_p, penalty, top_k, twice = run_all(
        [
            ["generate", "--model", str(tmp_path / "nope"), "hello"],
            [*model, "--top-p", "1.5", "hello"],
            [*model, "--repetition-penalty", "0.5", "hello"],
            [*model, "--top-k", "-2", "hello"],
            [*model, "--prompt", "a", "b"],
        ],
        cwd=tmp_path,
    )
    for result, needle in [
        (missing, f"--model {tmp_path / 'nope'}: no such folder"),
        (top_p, "--top-p must be in (0, 1]"),
        (penalty, "--repetition-penalty must be a number >= 1"),
        (top_k, "--top-k must be >= 0"),
        (twice, "give the prompt once"),
    ]:
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmps: error: "), result.stderr
        assert needle in lines[0], lines[0]
        assert result.stdout == ""
