"""The wheel installs one namespace: only `lmps` lands in site-packages (issue 7, item 1).

Builds the wheel from a copy of this checkout (the checkout itself stays untouched: no
build/ or egg-info written into it), installs it with --no-deps into a fresh venv that sees
this environment's dependencies through a `.pth` line (no copying, offline), and checks
from an empty working directory that `import client` / `import services` fail, that
`lmps.client` and `lmps.services` import from the new venv, and that `lmps --help` works.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a fresh clone lacks, or what only this machine made.
JUNK = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    ".cache",
    ".lmps",
    ".wheelhouse",
    "runs",
)

CHECK = """
import importlib, json
out = {}
for name in ("client", "services"):
    try:
        importlib.import_module(name)
        out[name] = "imported"
    except ImportError:
        out[name] = "missing"
import lmps, lmps.client.cli, lmps.services.coordinator.main
out["files"] = [lmps.__file__, lmps.client.cli.__file__, lmps.services.coordinator.main.__file__]
print(json.dumps(out))
"""


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / "lmps" / "v1" / "job_pb2.py").exists():
        pytest.skip("the generated protobuf modules are missing: run `make proto` first")
    src = tmp_path_factory.mktemp("src") / "lmps"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*JUNK))
    dist = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: this environment's setuptools, so no index is needed.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _ok(
        _run(
            [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
            dist,
        )
    )
    (built,) = dist.glob("lmps-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(root)], root))
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    _ok(_run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], root))
    purelib = Path(
        _ok(
            _run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root
            )
        ).stdout.strip()
    )
    # Plain path lines: appended after the new venv's own site-packages, and their .pth
    # files are not run, so this checkout's editable-install finder stays out.
    here = {*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (purelib / "deps-from-test-env.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    return root


def test_wheel_holds_only_the_lmps_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"lmps", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for module in (
        "lmps/client/cli.py",
        "lmps/services/coordinator/main.py",
        "lmps/services/parameter_server/main.py",
        "lmps/services/worker/main.py",
        "lmps/core/model.py",
        "lmps/rpc/codec.py",
        "lmps/v1/job_pb2.py",
    ):
        assert module in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lmps = lmps.client.cli:main" in text


def test_installed_wheel_imports_as_lmps_only(venv: Path, tmp_path: Path) -> None:
    out = json.loads(_ok(_run([str(venv / "bin" / "python"), "-c", CHECK], tmp_path)).stdout)
    assert out["client"] == "missing"
    assert out["services"] == "missing"
    # The wheel's copy, not this checkout's (which the test environment has installed editable).
    for file in out["files"]:
        assert Path(file).resolve().is_relative_to(venv.resolve()), file


def test_lmps_console_script_runs(venv: Path, tmp_path: Path) -> None:
    proc = _ok(_run([str(venv / "bin" / "lmps"), "--help"], tmp_path))
    for command in ("demo", "train", "generate", "serve"):
        assert command in proc.stdout
