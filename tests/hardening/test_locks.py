"""Atomic writes and OS locks: a run directory, a table cell and a shared cache have one writer at a time
(issue 15, defect 3: two ``lmedit bench`` runs into one ``--out`` both succeeded and wrote every case twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmedit.io import LockedError, atomic_write, file_lock, folder_lock

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Holder:
    """Another process that takes a lock and keeps it until killed."""

    def __init__(self, code: str) -> None:
        script = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {SRC!r})
            {code}
            with lock:
                print("held", flush=True)
                time.sleep(120)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def holders():
    made: list[Holder] = []
    yield lambda code: made.append(Holder(code)) or made[-1]
    for h in made:
        if h.proc.poll() is None:
            h.kill()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- lmedit.io -------------------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_error(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["f.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600), "mkstemp's 0600 is not left on the file"


def test_lock_names_the_holder_is_reentrant_and_dies_with_it(tmp_path, holders):
    h = holders(f"from lmedit.io import folder_lock; lock = folder_lock({str(tmp_path)!r})")
    with pytest.raises(LockedError, match=rf"folder {tmp_path} is in use.*pid {h.proc.pid}"):
        with folder_lock(tmp_path):
            pass
    h.kill()  # kill -9: the OS releases the lock, the stale file is no problem
    with folder_lock(tmp_path) as f, folder_lock(tmp_path):  # and nesting in one process is allowed
        assert f"pid {os.getpid()}" in f.read_text()


def test_blocking_lock_waits_for_the_holder(tmp_path, holders):
    import threading
    import time

    h = holders(f"from lmedit.io import file_lock; lock = file_lock({str(tmp_path / 'c.lock')!r})")
    threading.Timer(1.0, h.kill).start()
    t = time.perf_counter()
    with file_lock(tmp_path / "c.lock", blocking=True):
        assert time.perf_counter() - t > 0.5


# --- bench, table --------------------------------------------------------------------------------------
def test_second_bench_on_the_same_folder_is_refused_and_changes_nothing(tiny_llama, tmp_path, holders):
    from lmedit import get_editor
    from lmedit.bench import run_benchmark
    from lmedit.types import EditCase, EditRequest

    out = tmp_path / "run"
    h = holders(f"from lmedit.io import folder_lock; lock = folder_lock({str(out)!r})")
    before = _snapshot(out)
    cases = [EditCase(EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", case_id=0))]
    with pytest.raises(LockedError, match=rf"run directory {out} is in use.*pid {h.proc.pid}"):
        run_benchmark(get_editor("ft-m", steps=1), tiny_llama, cases, out_dir=out)
    assert _snapshot(out) == before
    h.kill()
    run_benchmark(get_editor("ft-m", steps=1), tiny_llama, cases, out_dir=out)
    assert [line.count('"case_id"') for line in (out / "cases.jsonl").read_text().splitlines()] == [1]


def test_cli_bench_refuses_a_locked_out_before_loading_the_model(tmp_path, holders, capsys, monkeypatch):
    from lmedit.cli import main

    out = tmp_path / "run"
    holders(f"from lmedit.io import folder_lock; lock = folder_lock({str(out)!r})")
    monkeypatch.setattr("lmedit.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["bench", "--model", "no-such-model", "--method", "ft-m", "--dataset", "zsre", "--n", "1",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "is in use by another lmedit process" in err and str(out) in err


def test_table_cell_being_computed_elsewhere_is_skipped(tiny_llama, tmp_path, holders):
    from lmedit.table.cells import CellCache, CellSpec
    from lmedit.table.runner import CellSkipped, run_cell

    spec = CellSpec("ft-m", "zsre", 1)
    cache = CellCache(tmp_path)
    lock = cache.root / f".{spec.folder}.lock"
    holders(f"from lmedit.io import file_lock; lock = file_lock({str(lock)!r})")
    with pytest.raises(CellSkipped, match="another process is computing it now.*in use"):
        run_cell(tiny_llama, spec, cache)
    assert not cache.folder(spec).exists()


def test_a_folder_the_lock_created_is_removed_when_nothing_was_written(tmp_path):
    with folder_lock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
    with folder_lock(tmp_path / "used"):
        (tmp_path / "used" / "cases.jsonl").write_text("")
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == [".lmedit.lock", "cases.jsonl"]
    (tmp_path / "old").mkdir()
    with folder_lock(tmp_path / "old"):
        pass
    assert (tmp_path / "old").is_dir()  # a folder that was there before stays
