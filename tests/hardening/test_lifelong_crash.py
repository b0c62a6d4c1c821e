"""kill -9 during a sequential ``lmedit bench`` with checkpoints and the collapse guard, then resume: no
finished edit is recomputed, no finished checkpoint is scored again, nothing is lost or duplicated. The kill
point is drawn at random (the seed is in the failure message), as in test_crash_resume.py."""

from __future__ import annotations

import json
import random

import pytest
from test_crash_resume import SEED, _cli, _kill_when, _lines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("crash-model"))


def _saved_edits(out):
    """chunk -> the saved edit's metadata file (its creation stamp tells a recomputed edit apart)."""
    d = out / "edits"
    return {p.name: (p / "edit.json").read_text() for p in d.iterdir() if (p / "chunk.json").exists()} \
        if d.exists() else {}


@pytest.mark.parametrize("timing", ["immediate", "final"])
def test_sequential_checkpoint_run_killed_then_resumed(model_dir, tmp_path, timing):
    rng = random.Random(SEED + 7)
    out = tmp_path / "run"
    n = 6
    argv = ["bench", "--model", str(model_dir), "--method", "ft-m", "--dataset", "zsre", "--n", str(n),
            "--set", "steps=2", "--out", str(out), "--setting", "sequential", "--eval-timing", timing,
            "--checkpoints", "2,4,6", "--protocols", "token_acc", "--drift-tokens", "200", "--collapse-guard", "50"]
    progress = out / "checkpoint_cases.jsonl"
    k, delay = rng.randint(1, 8 if timing == "immediate" else 5), rng.uniform(0, 0.3)  # 2+4(+6) lines in all
    _kill_when(tmp_path, argv, lambda: len(_lines(progress)) >= k, delay)
    edits_before = _saved_edits(out)
    points_before = [line for line in _lines(out / "checkpoints.jsonl") if line.endswith("}")]
    scored_before = [line for line in _lines(progress) if line.endswith("}")]
    done = _cli(tmp_path, *argv, "--resume")
    assert done.returncode == 0, f"seed {SEED}: {done.stderr[-2000:]}"
    after = _saved_edits(out)
    assert all(after[c] == text for c, text in edits_before.items()), f"seed {SEED}: a finished edit was recomputed"
    assert sorted(map(int, after)) == list(range(n))
    points = [json.loads(line) for line in _lines(out / "checkpoints.jsonl")]
    assert points_before == _lines(out / "checkpoints.jsonl")[:len(points_before)], f"seed {SEED}"
    scored = [json.loads(line) for line in _lines(progress) if line.endswith("}")]
    assert set(scored_before) <= set(_lines(progress)), f"seed {SEED}: checkpoint scores were rewritten"
    pairs = [(r["checkpoint"], r["case_id"]) for r in scored]
    assert len(pairs) == len(set(pairs)), f"seed {SEED}: a case was scored twice at one checkpoint"
    assert sorted(p["edits"] for p in points) == [2, 4, 6], f"seed {SEED}"
    # final timing: checkpoint 6 is the final scoring, read from the case rows (and then kept on disk)
    assert points[-1]["source"] == ("scored" if timing == "immediate" else "final records")
    summary = json.loads((out / "summary.json").read_text())
    life = summary["lifelong"]
    assert [p["edits"] for p in life["checkpoints"]] == [2, 4, 6]
    assert all(p["applied"] == p["edits"] for p in life["checkpoints"]) and life["collapse_guard"]["probed"] == n
    assert sorted(json.loads(line)["case_id"] for line in _lines(out / "cases.jsonl")) == list(range(n))
