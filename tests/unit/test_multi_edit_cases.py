"""MQuAKE's multi-edit cases run through the benchmark runner (a setting of it, not a second runner)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lmedit.bench import run_benchmark
from lmedit.data.mquake import MultiHopCase
from lmedit.metrics.multihop import score_multihop
from lmedit.registry import editor_class
from lmedit.table.runner import seed_everything
from lmedit.types import EditRequest


def toy_cases():
    """Multi-edit cases of toy facts whose questions are their own edit prompts, so that on a tiny random model
    the edits move the scores (MQuAKE's real multi-hop questions stay at 0 there)."""
    reqs = [EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                        target_true="French", case_id="0.0"),
            EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", target_true="Paris",
                        case_id="0.1"),
            EditRequest(prompt="{} was born in", subject="Barack Obama", target_new="Tokyo", target_true="Hawaii",
                        case_id="1.0"),
            EditRequest(prompt="{} plays the", subject="Miles Davis", target_new="piano", target_true="trumpet",
                        case_id="1.1")]
    return [MultiHopCase(requests=(a, b), questions=(a.text, b.text), new_answer=a.target_new,
                         new_answer_alias=(b.target_new,), answer=a.target_true, case_id=k)
            for k, (a, b) in enumerate([reqs[:2], reqs[2:]])]


FT = {"lr": 0.5, "steps": 50, "norm_constraint": None}  # FT-M that moves a tiny model's answers


def editor(batch: bool):
    """FT-M, batching (one compute over a case's requests) or not (its requests stacked one by one)."""
    cls = editor_class("ft-m")
    if batch:
        return cls(**FT)
    stacked = type("StackedFTM", (cls,), {"capabilities": dataclasses.replace(cls.capabilities, batch=False)})
    return stacked(**FT)


@pytest.fixture(scope="module")
def handle(tiny_dir):
    from lmedit.models.loading import load_model

    return load_model(str(tiny_dir))


def reference(editor, handle, cases):
    """What the old multi-hop loop (table/multihop.py, removed) did per case: score, apply every request
    (one batch, or stacked), score again, revert."""
    out = []
    for case in cases:
        pre = score_multihop(handle, case)
        reqs = list(case.requests)
        groups = [reqs] if editor.capabilities.batch else [[r] for r in reqs]
        edits = []
        for group in groups:
            edits.append(editor.compute(handle, group).apply(handle))
        post = score_multihop(handle, case)
        for e in reversed(edits):
            e.revert(handle)
        out.append((case.case_id, pre, post))
    return out


@pytest.mark.parametrize("batch", [True, False])  # one batch of a case's requests; stacked one by one
def test_runner_scores_mquake_cases_as_the_old_multihop_loop(handle, batch, tmp_path):
    cases = toy_cases()
    seed_everything(0)
    want = reference(editor(batch), handle, cases)
    digest = handle.state_digest()
    seed_everything(0)
    got = run_benchmark(editor(batch), handle, cases, out_dir=tmp_path / "run")
    assert [(r.case_id, r.pre, r.post) for r in got.results] == want
    assert any(post != pre for _, pre, post in want), "the edits move the scores, so the comparison means something"
    assert handle.state_digest() == digest, "every edit was reverted"
    assert all(r.info["edits"] == 2 and r.efficiency["chunk_size"] == 2 for r in got.results)
    assert got.summary["post"]["multihop"]["protocol"] == "greedy_exact"
    header = json.loads((tmp_path / "run" / "run.json").read_text())
    assert header["protocols"] == [], "the multi-hop scorer takes none of the asked protocols"
