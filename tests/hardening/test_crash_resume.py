"""kill -9 during ``lmedit bench``, ``lmedit table`` and ``lmedit train`` at a random point, then resume:
nothing finished is lost or duplicated (issue 15, "keep the class out"). Each command runs in its own process
on a tiny model saved to disk; the kill point is drawn at random (the seed is in the failure message)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
SEED = int(os.environ.get("LMEDIT_CRASH_SEED", random.randrange(10**6)))


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "LMEDIT_HOME": str(tmp / "home")}


def _cli(tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmedit.cli", *argv], env=_env(tmp), capture_output=True,
                          text=True, timeout=600)


def _kill_when(tmp: Path, argv: list[str], ready: Callable[[], bool], delay: float) -> bool:
    """Start ``lmedit argv``; once ``ready()``, wait ``delay`` s and SIGKILL it. True when it was killed
    (False: it finished first, which a resume must also handle)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmedit.cli", *argv], env=_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while proc.poll() is None and not ready():
        if time.time() - t0 > 300:
            proc.kill()
            pytest.fail("the command never reached the kill point")
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _ids(path: Path) -> list:
    return [json.loads(line)["case_id"] for line in _lines(path)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("crash-model"))


@pytest.mark.parametrize("setting", ["single", "sequential"])
def test_bench_killed_then_resumed(model_dir, tmp_path, setting):
    rng = random.Random(SEED)
    out = tmp_path / "run"
    n = 6
    argv = ["bench", "--model", str(model_dir), "--method", "ft-m", "--dataset", "zsre", "--n", str(n),
            "--set", "steps=2", "--out", str(out), "--setting", setting]
    if setting == "sequential":
        argv += ["--batch-size", "2", "--eval-timing", "immediate"]
    k, delay = rng.randint(1, n - 2), rng.uniform(0, 0.3)
    _kill_when(tmp_path, argv, lambda: len(_lines(out / "cases.jsonl")) >= k, delay)
    before = _lines(out / "cases.jsonl")
    done = _cli(tmp_path, *argv, "--resume")
    assert done.returncode == 0, f"seed {SEED}: {done.stderr[-2000:]}"
    after = _lines(out / "cases.jsonl")
    assert sorted(_ids(out / "cases.jsonl")) == list(range(n)), f"seed {SEED}: lost or duplicated cases"
    kept = [line for line in before if line.strip() and line.endswith("}")]
    assert after[:len(kept)] == kept or set(kept) <= set(after), f"seed {SEED}: finished cases were rewritten"
    assert json.loads((out / "summary.json").read_text())["n_cases"] == n


def test_table_killed_then_resumed(model_dir, tmp_path):
    rng = random.Random(SEED + 1)
    out = tmp_path / "table"
    n = 5
    argv = ["table", "--model", str(model_dir), "--methods", "ft-m", "--datasets", "zsre", "--n", str(n),
            "--out", str(out), "--no-plots", "--workers", "1"]
    cases = out / "cells" / "ft-m__zsre" / "run-000" / "cases.jsonl"
    k, delay = rng.randint(1, n - 2), rng.uniform(0, 0.3)
    _kill_when(tmp_path, argv, lambda: len(_lines(cases)) >= k, delay)
    before = [line for line in _lines(cases) if line.endswith("}")]
    done = _cli(tmp_path, *argv)
    assert done.returncode == 0, f"seed {SEED}: {done.stderr[-2000:]}"
    assert sorted(_ids(cases)) == list(range(n)), f"seed {SEED}: lost or duplicated cases"
    assert set(before) <= set(_lines(cases)), f"seed {SEED}: finished cases were recomputed"
    rows = json.loads((out / "table1.json").read_text())["rows"]
    assert rows and all(r["n_cases"] == n for r in rows if r["method"] == "ft-m")


def test_train_killed_then_resumed(model_dir, tmp_path):
    rng = random.Random(SEED + 2)
    out = tmp_path / "train"
    argv = ["train", "--method", "mend", "--model", str(model_dir), "--dataset", "zsre", "--n", "6", "--quick",
            "--out", str(out), "--device", "cpu"]
    killed = _kill_when(tmp_path, argv, lambda: (out / "train.json").exists(), rng.uniform(0, 0.5))
    if killed:
        first = json.loads((out / "train.json").read_text())["step"]
        assert first >= 4
        done = _cli(tmp_path, *argv, "--resume")
        assert done.returncode == 0, f"seed {SEED}: {done.stderr[-2000:]}"
    info = json.loads((out / "editor.json").read_text())
    steps = [h["step"] for h in info["history"]]
    assert info["steps_done"] == 8 and steps == sorted(set(steps)) and steps[-1] == 8, f"seed {SEED}: {steps}"
