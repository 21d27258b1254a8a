"""`preflight.check_out` with several `lmps` at once in one folder (CI ran two `lmps train`
side by side, and one was told "--out runs is not writable": the other had removed the new
folder between its mkdir and its probe)."""

from __future__ import annotations

import threading
from pathlib import Path

from lmps.client import preflight


def test_concurrent_probes_of_one_new_folder_all_pass(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def probe(k: int) -> None:
        start.wait()
        for i in range(60):
            try:
                preflight.check_out(str(tmp_path / f"round-{i}" / "runs"))
            except BaseException as err:
                errors.append(err)

    threads = [threading.Thread(target=probe, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_a_probe_removes_the_folders_it_made(tmp_path: Path) -> None:
    """(Alone: with several at once, one may keep a folder another made: harmless.)"""
    preflight.check_out(str(tmp_path / "a" / "b" / "runs"))
    assert not any(tmp_path.iterdir())
    (tmp_path / "kept").mkdir()
    preflight.check_out(str(tmp_path / "kept" / "runs"))
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any(
        (tmp_path / "kept").iterdir()
    )
