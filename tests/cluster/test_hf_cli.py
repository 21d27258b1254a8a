"""Issue 11 on the real `lmps` CLI and a real local cluster: fine-tune a Hugging Face GPT-2
folder (`lmps train --init-from hf:DIR`), export the run (`lmps export RUN --format hf OUT`,
and `--job JOB` from the cluster), and load the result with `GPT2LMHeadModel` /
`AutoTokenizer.from_pretrained`: lmps' logits, lmps' token ids. Refusals are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster, free_port
from lmps.core.data import train_tokenizer
from lmps.core.model import GPT, GPTConfig
from tests.cluster.cli import lmps, one_line_error
from tests.hf_models import TEXT, TEXTS, assert_no_loading_issues, make_hf_dir

pytestmark = pytest.mark.cluster

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

CORPUS = TEXT[:1500]  # ~600 tokens: a dozen steps of 2 x 16
INSTALL = "pip install 'lmps[hf]'"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        servers=1, workers=1, worker_threads=1, run_dir=str(tmp_path_factory.mktemp("logs"))
    )
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture
def no_transformers(tmp_path: Path) -> dict[str, str]:
    """An environment whose `import transformers` fails, as where the extra is not installed."""
    blocker = tmp_path / "block" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("transformers is not installed")\n')
    return {"PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}


def logits_of(model: torch.nn.Module, idx: torch.Tensor, hf: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(idx)
    logits: torch.Tensor = out.logits if hf else out[0]
    return logits


def test_fine_tune_a_hugging_face_gpt2_on_the_cluster_and_export_it_back(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    hf_dir = make_hf_dir(tmp_path / "gpt2-local", dropout=0.0)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    done = lmps(
        "train",
        "--coordinator",
        cluster.coordinator,
        "--init-from",
        "hf:gpt2-local",
        "--data",
        "corpus.txt",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--out",
        "run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "fine-tuning hf:gpt2-local" in done.stdout
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    assert saved["activation"] == "gelu_tanh"  # GPT-2's, over the wire and back
    assert (saved["block_size"], saved["vocab_size"], saved["n_embd"]) == (
        source["n_positions"],
        source["vocab_size"],
        source["n_embd"],
    )
    trained = model_io.load(run)
    assert trained.tokenizer is not None
    auto_source = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in TEXTS:
        assert trained.tokenizer.encode(text).ids == list(auto_source(text)["input_ids"]), text
    report = json.loads((run / "report.json").read_text())
    steps = sum(int(e["steps"]) for e in report["epochs"])
    assert steps >= 5, report["epochs"]
    # Training moved the weights away from the imported ones.
    base = GPT2LMHeadModel.from_pretrained(str(hf_dir)).state_dict()
    wte = trained.model.transformer.wte.weight.detach()
    assert not torch.equal(wte, base["transformer.wte.weight"])

    done = lmps("export", "run", "out", "--format", "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exported run to out (hf)" in done.stdout
    exported, info = GPT2LMHeadModel.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True
    )
    assert_no_loading_issues(info)
    idx = torch.randint(0, trained.config.vocab_size, (2, 16), generator=torch.Generator())
    want = logits_of(trained.model, idx, hf=False)
    got = logits_of(exported, idx, hf=True)
    torch.testing.assert_close(got, want)
    print(
        f"\nlmps train --init-from hf: + export: max abs logits diff {(got - want).abs().max():.3e}"
    )
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS:
        assert list(auto(text)["input_ids"]) == trained.tokenizer.encode(text).ids, text

    # The same model straight from the cluster, by job id.
    done = lmps(
        "export", "--job", report["job_id"], "out-job", "--coordinator", cluster.coordinator,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    from_job = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out-job")).state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(from_job[name], value), name


def test_refusals_are_one_line_naming_the_culprit(
    tmp_path: Path, cluster: LocalCluster, no_transformers: dict[str, str]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    hf_dir = make_hf_dir(tmp_path / "gpt2-local")
    llama = tmp_path / "llama"
    shutil.copytree(hf_dir, llama)
    fields = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**fields, "model_type": "llama"}))
    wider = tmp_path / "wider"
    shutil.copytree(hf_dir, wider)
    (wider / "config.json").write_text(json.dumps({**fields, "n_embd": 64}))
    (tmp_path / "corpus.txt").write_text(CORPUS)

    def train(source: str, coordinator: str = dead, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [
            "train",
            "--init-from",
            source,
            "--coordinator",
            coordinator,
            "--data",
            "corpus.txt",
        ]
        return lmps(*argv, "--batch-size", "2", cwd=tmp_path, env=env)

    one_line_error(train("hf:nope"), "hf:nope: no such folder", "save_pretrained")
    one_line_error(train("hf:llama"), "llama/config.json", "model_type 'llama' is not GPT-2")
    one_line_error(train("hf:gpt2-local", **no_transformers), INSTALL)
    # The weights are only read once the coordinator answers; still before any upload.
    done = train("hf:wider", cluster.coordinator)
    one_line_error(done, "hf:wider", "weights")
    assert "submitting" not in done.stdout and "job-" not in done.stdout

    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=300)
    tokenizer = train_tokenizer(CORPUS.split(), 300)
    model_io.save(model_io.TrainedModel(GPT(config), config, tokenizer), tmp_path / "run")
    one_line_error(lmps("export", "run", "out", cwd=tmp_path, env=no_transformers), INSTALL)
    one_line_error(lmps("export", "nope", "out", cwd=tmp_path), "nope/model.safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    one_line_error(lmps("export", "run", "full", cwd=tmp_path), "full is not empty", "--force")
    assert not (tmp_path / "out").exists()
