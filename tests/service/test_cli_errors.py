"""Issue 8, "no tracebacks, clear messages": every failure a new user meets in the first hour,
on the real `lmps` CLI (subprocesses, real coordinators and clusters, nothing faked). Each
error is one line on stderr naming what is wrong and what to do, with exit code 2 (1 where a
command refuses by design), and never a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster, free_port, start_ticks
from lmps.core.data import train_tokenizer
from lmps.core.model import GPT, preset
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.cluster  # real coordinators and clusters, one subprocess per command

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]

# ~1,800 words of varied text: enough tokens for a batch of 2 x 17 and a vocabulary of 300.
SENTENCE = (
    "the parameter server holds shards of every tensor and applies the optimizer while "
    "workers lease data pull parameters compute gradients and push them back"
)
WORDS = SENTENCE.split(" ")
TEXT = " ".join(f"{w}{i % 7}" if i % 5 == 0 else w for i, w in enumerate(WORDS * 80))
SMALL = ["--batch-size", "2", "--block-size", "16", "--vocab-size", "300"]


def run(
    *argv: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LMPS, *argv],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_all(
    argvs: Sequence[Sequence[str]],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several `lmps` commands at once (each pays the imports), in order of `argvs`."""
    procs = [
        subprocess.Popen(
            [*LMPS, *argv],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    done = []
    for argv, proc in zip(argvs, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        done.append(subprocess.CompletedProcess(list(argv), proc.returncode, out, err))
    return done


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    """The command failed with `code` and said one line on stderr holding every needle."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.returncode == code, (result.args, result.returncode, text)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (result.args, result.stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A lone coordinator (no servers, no workers): jobs reach it, none can start."""
    spec = ClusterSpec(servers=0, workers=0, run_dir=str(tmp_path_factory.mktemp("coord")))
    with LocalCluster(spec) as cluster:
        yield cluster.coordinator


def jobs_of(coordinator: str) -> int:
    """How many jobs the coordinator has ever been given."""
    with open_channel(coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        status = stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=10)
    return len(status.jobs)


# -- no coordinator, --wait, and the "is a coordinator running?" hint -----------------------


def test_train_without_a_coordinator_fails_at_once(tmp_path: Path, corpus: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    now, waited, status = run_all(
        [
            ["train", "--coordinator", address, "--data", str(corpus), *SMALL],
            ["train", "--coordinator", address, "--data", str(corpus), "--wait", "3"],
            ["status", "--coordinator", address],
        ],
        cwd=tmp_path,
        timeout=60,  # before: SubmitJob waited 600 s for a coordinator
    )
    elapsed = time.monotonic() - started
    one_line_error(now, f"no coordinator at {address}; start one with `lmps cluster up`")
    one_line_error(waited, f"no coordinator at {address} after waiting 3s", "lmps cluster up")
    one_line_error(status, f"no coordinator at {address}; start one with `lmps cluster up`")
    assert elapsed < 45, elapsed


def test_wait_finds_a_late_coordinator_and_no_false_hint(tmp_path: Path, corpus: Path) -> None:
    """--wait waits for a coordinator that comes up later; its own UNAVAILABLE (no servers)
    is reported as such, without the "is a coordinator running?" hint."""
    port = free_port()
    argv = ["train", "--coordinator", f"127.0.0.1:{port}", "--wait", "90", "--wait-members", "1"]
    trainer = subprocess.Popen(
        [*LMPS, *argv, "--data", str(corpus), "--cache-dir", str(tmp_path), *SMALL],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    spec = ClusterSpec(servers=0, workers=0, coordinator_port=port, run_dir=str(tmp_path / "c"))
    with LocalCluster(spec):
        try:
            out, err = trainer.communicate(timeout=120)
        finally:
            trainer.kill()
    result = subprocess.CompletedProcess(trainer.args, trainer.returncode, out, err)
    line = one_line_error(result, "UNAVAILABLE", "need 1 parameter server")
    assert "no coordinator" not in line
    assert "coordinator running" not in out + err


# -- ports in use -------------------------------------------------------------------------


def _leftovers(cwd: Path) -> list[int]:
    """PIDs of processes whose working directory is `cwd` (children left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == cwd.resolve():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_port_in_use_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        coordinator = f"127.0.0.1:{free_port()}"
        local = ["--host", "127.0.0.1"]
        results = run_all(
            [
                # Each coordinator its own state dir: two at once in one folder would race
                # for the lock of the default one (and the loser warns: a second line).
                [
                    "serve",
                    "coordinator",
                    *local,
                    "--port",
                    port,
                    "--metrics-port",
                    "-1",
                    "--state-dir",
                    str(tmp_path / "state-a"),
                ],
                [
                    "serve",
                    "coordinator",
                    *local,
                    "--port",
                    "0",
                    "--metrics-port",
                    port,
                    "--state-dir",
                    str(tmp_path / "state-b"),
                ],
                ["serve", "ps", *local, "--port", port, "--coordinator", coordinator],
                ["serve", "worker", *local, "--port", "0", "--metrics-port", port],
                ["cluster", "up", "--servers", "1", "--workers", "1", "--port", port],
            ],
            cwd=tmp_path,
        )
    flags = ["--port", "--metrics-port", "--port", "--metrics-port", "--port"]
    for result, flag in zip(results, flags, strict=True):
        line = one_line_error(result, f"port {port} is already in use", f"with {flag} ")
        assert "Traceback" not in line
    assert not (tmp_path / ".lmps" / "cluster.json").exists()
    assert _leftovers(tmp_path) == []


# -- broken saved models ------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path: Path) -> Path:
    config = preset("tiny", 300)
    tokenizer = train_tokenizer(TEXT.split(), 300)
    out = tmp_path / "model"
    model_io.save(model_io.TrainedModel(GPT(config), config, tokenizer), out)
    return out


def test_corrupt_model_files_are_named(tmp_path: Path, saved_model: Path) -> None:
    weights, config = saved_model / "model.safetensors", saved_model / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()
    cases = {
        "truncated": (lambda: weights.write_bytes(good_weights[: len(good_weights) // 2]), weights),
        "garbage": (lambda: weights.write_bytes(os.urandom(4096)), weights),
        "bad json": (lambda: config.write_text('{"n_layer": 2,'), config),
        "bad field": (lambda: config.write_text(good_config.replace("n_head", "heads")), config),
    }
    dead = f"127.0.0.1:{free_port()}"
    for name, (damage, culprit) in cases.items():
        weights.write_bytes(good_weights)
        config.write_text(good_config)
        damage()
        generate, train = run_all(
            [
                ["generate", "--model", str(saved_model), "--max-tokens", "2"],
                ["train", "--init-from", str(saved_model), "--coordinator", dead],
            ],
            cwd=tmp_path,
        )
        one_line_error(generate, str(culprit))
        one_line_error(train, str(culprit))  # before the coordinator is even looked for
        assert name


# -- --out --------------------------------------------------------------------------------


def test_bad_out_is_refused_before_upload(tmp_path: Path, corpus: Path, coordinator: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    argv = ["train", "--coordinator", coordinator, "--data", str(corpus), "--wait-members", "1"]
    jobs = jobs_of(coordinator)
    existing, under_file, unwritable = run_all(
        [
            [*argv, *SMALL, "--out", str(afile)],
            [*argv, *SMALL, "--out", str(afile / "run")],
            [*argv, *SMALL, "--out", "/proc/lmps-run"],
        ],
        cwd=tmp_path,
    )
    one_line_error(existing, f"--out {afile} is an existing file")
    one_line_error(under_file, f"--out {afile / 'run'}", "is a file")
    one_line_error(unwritable, "--out /proc/lmps-run is not writable")
    assert afile.read_text() == "not a folder"
    assert jobs_of(coordinator) == jobs


# -- bad LMPS_* values --------------------------------------------------------------------


def test_bad_env_value_names_the_variable_even_for_help(tmp_path: Path) -> None:
    cases = [
        ({"LMPS_PORT": "abc"}, ["serve", "ps", "--help"]),
        ({"LMPS_PORT": "abc"}, ["serve", "coordinator"]),
        ({"LMPS_PORT": "abc"}, ["health"]),
        ({"LMPS_METRICS_PORT": "x9"}, ["serve", "worker", "--help"]),
        ({"LMPS_GRACE_S": "soon"}, ["serve", "coordinator", "--help"]),
        ({"LMPS_HEARTBEAT_S": "often"}, ["serve", "coordinator", "--help"]),
        ({"LMPS_MAX_MESSAGE_MB": "big"}, ["serve", "ps", "--help"]),
        ({"LMPS_WAIT_MEMBERS_S": "long"}, ["train", "--help"]),
    ]
    for env, argv in cases:
        [(name, value)] = env.items()
        result = run(*argv, cwd=tmp_path, env=env)
        one_line_error(result, name, repr(value))
    module = [sys.executable, "-m", "lmps.services.parameter_server.main", "--help"]
    direct = subprocess.run(
        module, env={**os.environ, "LMPS_PORT": "abc"}, capture_output=True, text=True
    )
    one_line_error(direct, "LMPS_PORT")


# -- corpora ------------------------------------------------------------------------------


def test_binary_or_non_utf8_corpus_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "logo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\x00with a NUL")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    cache = ["--cache-dir", str(tmp_path / "cache"), "--vocab-size", "300"]
    results = run_all(
        [["prepare", "--data", str(p), *cache] for p in (folder, nul, jsonl)], cwd=tmp_path
    )
    one_line_error(results[0], str(folder / "logo.txt"), "not UTF-8")
    one_line_error(results[1], str(nul), "binary")
    one_line_error(results[2], f"{jsonl}:2:", "not UTF-8")


def test_too_small_corpus_is_refused_before_upload(tmp_path: Path, coordinator: str) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words here")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["train", "--coordinator", coordinator, "--wait-members", "1", "--vocab-size", "300"]
    jobs = jobs_of(coordinator)
    small, nothing = run_all(
        [
            [*argv, "--data", str(tiny), "--cache-dir", str(tmp_path / "c1")],
            [*argv, "--data", str(empty), "--cache-dir", str(tmp_path / "c2")],
        ],
        cwd=tmp_path,
    )
    # tiny preset: block 128, default batch 16.
    one_line_error(small, "one batch needs", "16 x (128 + 1) = 2,064", f"corpus {tiny} has")
    one_line_error(nothing, "one batch needs", "= 2,064", "has 0 training tokens")
    assert jobs_of(coordinator) == jobs


# -- flags that cannot apply; each preset's own vocabulary --------------------------------


def test_model_flags_with_init_from_are_refused(tmp_path: Path, saved_model: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    base = ["train", "--init-from", str(saved_model), "--coordinator", dead]
    results = run_all(
        [
            [*base, "--preset", "tiny"],
            [*base, "--vocab-size", "2048"],
            [*base, "--block-size", "64"],
            [*base, "--preset", "mini", "--block-size", "64"],
        ],
        cwd=tmp_path,
    )
    for result, given in zip(
        results, ["--preset", "--vocab-size", "--block-size", "--preset, --block-size"], strict=True
    ):
        one_line_error(result, f"{given} cannot apply with --init-from")


def test_inner_flags_without_local_steps_are_refused(tmp_path: Path) -> None:
    """DiLoCo's inner optimizer runs only with --local-steps: never silently ignored."""
    dead = f"127.0.0.1:{free_port()}"
    alone, mismatched = run_all(
        [
            ["train", "--coordinator", dead, "--inner-lr", "4e-4", "--inner-schedule", "cosine"],
            ["train", "--coordinator", dead, "--local-steps", "3", "--batches-per-lease", "8"],
        ],
        cwd=tmp_path,
    )
    one_line_error(alone, "--inner-lr, --inner-schedule", "add --local-steps")
    one_line_error(mismatched, "--batches-per-lease 8", "--local-steps 3")


def test_fragments_without_local_steps_or_dividing_h_are_refused(tmp_path: Path) -> None:
    """Streaming fragments split local steps' rounds: never silently ignored, and each
    window is whole inner steps."""
    dead = f"127.0.0.1:{free_port()}"
    alone, uneven = run_all(
        [
            ["train", "--coordinator", dead, "--fragments", "3"],
            ["train", "--coordinator", dead, "--local-steps", "4", "--fragments", "3"],
        ],
        cwd=tmp_path,
    )
    one_line_error(alone, "--fragments only applies with local steps", "add --local-steps")
    one_line_error(uneven, "--fragments 3 must divide --local-steps 4")


def test_each_preset_trains_its_own_vocabulary(tmp_path: Path, coordinator: str) -> None:
    """tiny keeps 2048 (as before, so `lmps demo` is unchanged); mini gets its 4096, where
    every preset used to get 2048. The job then fails for want of servers: never started."""
    argv = ["train", "--coordinator", coordinator, "--wait-members", "1"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    tiny, mini, given = run_all(
        [argv, [*argv, "--preset", "mini"], [*argv, "--preset", "mini", "--vocab-size", "1024"]],
        cwd=tmp_path,
        timeout=300,
    )
    for result, vocab in ((tiny, 2048), (mini, 4096), (given, 1024)):
        assert f"vocab {vocab}\n" in result.stdout, result.stdout + result.stderr
        one_line_error(result, "need 1 parameter server")


# -- help ---------------------------------------------------------------------------------

HELP = [
    ["demo"],
    ["train"],
    ["generate"],
    ["cluster"],
    ["cluster", "up"],
    ["cluster", "down"],
    ["cluster", "status"],
    ["status"],
    ["shards"],
    ["health"],
    ["certs"],
    ["prepare"],
    ["clean"],
    ["serve"],
    ["serve", "coordinator"],
    ["serve", "ps"],
    ["serve", "worker"],
]
NO_DEFAULTS = {("cluster",), ("cluster", "down"), ("serve",)}  # nothing to default


def test_every_help_shows_defaults_and_an_example(tmp_path: Path) -> None:
    results = run_all([[*cmd, "--help"] for cmd in HELP], cwd=tmp_path)
    for cmd, result in zip(HELP, results, strict=True):
        assert result.returncode == 0, (cmd, result.stderr)
        text = result.stdout
        assert "\nexample" in text, (cmd, text)
        example = text[text.index("\nexample") :]
        assert f"lmps {' '.join(cmd)}" in example, (cmd, example)
        if tuple(cmd) not in NO_DEFAULTS:
            assert re.search(r"default:?\s+\S", text), (cmd, text)
    assert "default: 15" in results[0].stdout  # demo's own --epochs
    assert "--servers SERVERS" in results[4].stdout  # `lmps cluster up` keeps its flags


def test_top_level_help_is_quick_and_imports_no_torch(tmp_path: Path) -> None:
    probe = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from lmps.client import cli\n"
        "for argv in (['--help'], ['serve', 'coordinator', '--help'], ['cluster', 'up', '-h']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH', 'torch' in sys.modules, time.perf_counter() - t, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    _, imported, seconds = result.stderr.strip().splitlines()[-1].split()
    assert imported == "False", "lmps --help imported torch"
    assert float(seconds) < 1.5, seconds
    started = time.perf_counter()
    assert run("--help", cwd=tmp_path).returncode == 0
    assert time.perf_counter() - started < 3.0


# -- cluster down, clean ------------------------------------------------------------------


def test_cluster_down_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    """A recorded PID that now belongs to another process (same PID, later start time, or a
    record without a start time whose command line is not an lmps service) is not signalled."""
    bystanders = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        reused, old_record = bystanders
        procs = [
            {"name": "coordinator", "address": "127.0.0.1:1", "metrics_port": 0, "log": "x",
             "pid": reused.pid, "started": start_ticks(reused.pid) - 1},
            {"name": "ps-0", "address": "127.0.0.1:2", "metrics_port": 0, "log": "x",
             "pid": old_record.pid},
        ]  # fmt: skip
        state = tmp_path / ".lmps"
        state.mkdir()
        (state / "cluster.json").write_text(json.dumps({"procs": procs}))
        result = run("cluster", "down", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "stopped nothing" in result.stdout
        assert not (state / "cluster.json").exists()
        time.sleep(0.5)
        assert reused.poll() is None and old_record.poll() is None, "a bystander was signalled"
    finally:
        for p in bystanders:
            p.send_signal(signal.SIGKILL)
            p.wait()


def test_cluster_subcommands_and_clean(tmp_path: Path) -> None:
    up = run("cluster", "up", "--servers", "1", "--workers", "1", "--port", "0", cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        record = json.loads((tmp_path / ".lmps" / "cluster.json").read_text())
        assert all(p["started"] == start_ticks(p["pid"]) > 0 for p in record["procs"])
        status = run("cluster", "status", cwd=tmp_path)  # the recorded coordinator, not :50051
        assert status.returncode == 0, status.stderr
        assert "ps-0" in status.stdout and "worker-0" in status.stdout
        one_line_error(run("clean", cwd=tmp_path), "still running", "lmps cluster down", code=1)
        assert (tmp_path / ".lmps" / "logs").is_dir()
    finally:
        down = run("cluster", "down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "stopped worker-0, ps-0, coordinator" in down.stdout
    assert all(start_ticks(p["pid"]) != p["started"] for p in record["procs"])
    cache = tmp_path / "cache"
    (cache / "entry").mkdir(parents=True)
    clean = run("clean", "--cache", "--cache-dir", str(cache), cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert not (tmp_path / ".lmps" / "logs").exists() and not cache.exists()
    assert "nothing to clean" in run("clean", cwd=tmp_path).stdout
