"""Sequential runs with retention checkpoints and the collapse guard (lmedit.bench.sequential), on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_benchmark import ToyEditor, _cases, _lines

from lmedit import get_editor
from lmedit.bench import BenchmarkError, run_benchmark
from lmedit.bench.sequential import (
    CollapseGuard,
    check_checkpoints,
    probe_perplexity,
    progress,
    refuse_if_collapsed,
)
from lmedit.digests import tensor_digest
from lmedit.edits import WeightDelta
from lmedit.errors import EditCollapseError
from lmedit.types import EditRequest

PROTOCOLS = ("token_acc",)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(" The capital of France is Paris @-@ city . Tokyo is in Japan @,@ Asia . The river flows .\n" * 60)
    return str(path)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("timing", ["immediate", "final"])
def test_checkpoints_score_every_edit_made_so_far(tiny_llama, tmp_path, corpus, timing):
    h = tiny_llama
    before = h.state_digest()
    out = tmp_path / "run"
    guard = CollapseGuard(ratio=50, corpus=corpus)
    res = run_benchmark(ToyEditor(scale=0.02), h, _cases(6), setting="sequential", eval_timing=timing, out_dir=out,
                        protocols=PROTOCOLS, checkpoints=[2, 4, 6], collapse_guard=guard)
    assert h.state_digest() == before
    life = res.summary["lifelong"]
    assert life["schema"] == "lmedit.lifelong/1" and life["eval_timing"] == timing
    points = life["checkpoints"]
    assert [(p["edits"], p["applied"], p["refused"], p["tenth"]) for p in points] == [(2, 2, 0, 1), (4, 4, 0, 1),
                                                                                      (6, 6, 0, 1)]
    for p in points:
        assert p["scores"]["all"]["reliability"]["cases"] == p["edits"]
        assert p["scores"]["oldest"]["reliability"]["cases"] == p["scores"]["newest"]["reliability"]["cases"] == 1
        assert p["scores"]["all"]["locality"]["protocol"] == "token_acc"
        assert p["probe_perplexity"] > 1
    scored = _jsonl(out / "checkpoint_cases.jsonl")
    if timing == "final":  # the last checkpoint is the final scoring itself: not scored twice
        assert points[-1]["source"] == "final records" and len(scored) == 2 + 4
        assert points[-1]["scores"]["all"]["reliability"]["mean"] == res.summary["post"]["reliability"]["mean"]
    else:
        assert [p["source"] for p in points] == ["scored"] * 3 and len(scored) == 2 + 4 + 6
    assert [r["case_id"] for r in scored if r["checkpoint"] == 4] == [0, 1, 2, 3]
    g = life["collapse_guard"]
    assert g["probed"] == 6 and g["refused"] == [] and g["windows"] == 16 and g["limit"] is None
    assert len(g["base_perplexities"]) == 16 and g["base_perplexity"] == g["base_perplexities"][0]
    probes = [r for r in _jsonl(out / "guard.jsonl") if "chunk" in r]
    assert [r["window"] for r in probes] == [0, 1, 2, 3, 4, 5]  # chunk k reads window k mod 16
    assert all(r["ratio"] == pytest.approx(r["perplexity"] / g["base_perplexities"][r["window"]]) for r in probes)
    assert g["max_ratio"] == pytest.approx(max(r["ratio"] for r in probes))
    for j, r in enumerate(probes):  # the estimate over all 16 windows: those read so far, 1.0 the others
        assert r["estimate"] == pytest.approx(math.prod(q["ratio"] for q in probes[:j + 1]) ** (1 / 16))
    assert [p["probe_ratio"] for p in points] == [probes[p["edits"] - 1]["estimate"] for p in points]
    assert g["estimate"] == pytest.approx(probes[-1]["estimate"])
    table = (out / "table.md").read_text()
    assert "Retention at the checkpoints" in table and "rotating over 16 windows (2048 tokens)" in table


def test_checkpoints_resume_without_scoring_a_finished_checkpoint_again(tiny_llama, tmp_path, corpus):
    out = tmp_path / "run"
    kw = dict(setting="sequential", eval_timing="immediate", out_dir=out, protocols=PROTOCOLS,
              collapse_guard=CollapseGuard(ratio=50, corpus=corpus))
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies while computing the 5th edit
        run_benchmark(ToyEditor(scale=0.02, crash_after=4), tiny_llama, _cases(6), checkpoints=[2, 4, 6], **kw)
    assert [r["edits"] for r in _jsonl(out / "checkpoints.jsonl")] == [2, 4]
    now = progress(out)  # the curves of a stopped (or running) run, from its files
    assert [p["edits"] for p in now["checkpoints"]] == [2, 4] and now["collapse_guard"]["probed"] == 4
    first = (out / "checkpoint_cases.jsonl").read_text()
    # a new checkpoint (3) on resume is scored while the saved edits are re-applied; 2 and 4 are not redone
    res = run_benchmark(ToyEditor(scale=0.02), tiny_llama, _cases(6), checkpoints=[2, 3, 4, 6], resume=True, **kw)
    assert (out / "checkpoint_cases.jsonl").read_text().startswith(first)
    assert [r["checkpoint"] for r in _jsonl(out / "checkpoint_cases.jsonl")].count(4) == 4
    assert [p["edits"] for p in res.summary["lifelong"]["checkpoints"]] == [2, 3, 4, 6]
    assert sorted(line["case_id"] for line in _lines(out)) == list(range(6))
    assert [r.get("point") for r in _jsonl(out / "guard.jsonl")].count("before") == 1
    with pytest.raises(BenchmarkError, match="different collapse_guard"):  # another guard: another trajectory
        run_benchmark(ToyEditor(scale=0.02), tiny_llama, _cases(6), **{**kw, "resume": True,
                                                                        "collapse_guard": CollapseGuard(ratio=2)})


class BlowsUp(ToyEditor):
    """The toy edit; for the cases in ``big``, a large random change of the unembedding instead (every next
    token becomes confidently wrong: the perplexity explodes)."""

    def __init__(self, *a, big=(), **kw):
        super().__init__(*a, **kw)
        self.big = set(big)

    def _compute(self, handle, requests, cfg):
        if not any(r.case_id in self.big for r in requests):
            return super()._compute(handle, requests, cfg)
        head = handle.model.get_output_embeddings().weight
        name = next(n for n, p in handle.model.named_parameters() if p is head)
        delta = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 50 * float(head.std())
        return WeightDelta({name: delta}, {name: tensor_digest(head)})


def test_the_guard_refuses_a_collapsing_edit_and_the_run_records_it(tiny_llama, tmp_path, corpus, caplog):
    h = tiny_llama
    before = h.state_digest()
    out = tmp_path / "run"
    res = run_benchmark(BlowsUp(scale=0.01, big={2}), h, _cases(5), setting="sequential", eval_timing="final",
                        out_dir=out, protocols=PROTOCOLS, checkpoints=[2, 4, 5],
                        collapse_guard=CollapseGuard(ratio=1.3, corpus=corpus))
    assert h.state_digest() == before
    err = res.results[2].info["error"]
    assert err.startswith("EditCollapseError: refused WeightDelta") and "rolled back" in err
    assert "'The mother tongue of Toko Yasuda is' -> 'English'" in err
    assert "collapse guard, chunk 2 (case(s) 2)" in caplog.text
    assert all("error" not in r.info for i, r in enumerate(res.results) if i != 2)
    g = res.summary["lifelong"]["collapse_guard"]
    assert [r["case_ids"] for r in g["refused"]] == [["2"]] and g["refused"][0]["probe_ratio"] > 1.3
    assert "on probe window 3 of 16 (tokens 256–384 of the drift corpus)" in err
    assert g["max_ratio"] == g["refused"][0]["probe_ratio"] and res.summary["n_errors"] == 1
    refused = next(r for r in _jsonl(out / "guard.jsonl") if r.get("refused"))
    assert refused["ratio_after_rollback"] == pytest.approx(1.0, abs=0.05)  # the window read again without it
    points = {p["edits"]: p for p in res.summary["lifelong"]["checkpoints"]}
    assert (points[4]["applied"], points[4]["refused"], points[5]["applied"], points[5]["refused"]) == (3, 1, 4, 1)
    assert points[4]["scores"]["all"]["reliability"]["cases"] == 3
    assert json.loads((out / "edits" / "2" / "chunk.json").read_text())["error"] == err  # resumes as refused


@pytest.fixture
def fitted_llama(tokenizer, corpus):
    """A tiny Llama fitted for 30 Adam steps to the probe text: a random model's near-uniform head keeps its
    perplexity near the vocabulary size whatever an edit does, a fitted one can collapse."""
    from conftest import make_model
    from lmedit.models.handle import ModelHandle

    torch.manual_seed(0)
    model = make_model("llama")
    ids = torch.tensor([tokenizer(open(corpus).read())["input_ids"][:128]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ModelHandle(model, tokenizer, name="tiny-llama-fitted")


def test_a_refused_edit_leaves_the_model_bit_exactly_as_before_it(fitted_llama, corpus):
    """FT-M with a huge learning rate (‖ΔW‖/‖W‖ in the hundreds: the divergence bound is relaxed for tiny
    models in conftest) after a normal edit: the guard rolls the bad one back, and the state digest is the
    one before it."""
    h = fitted_llama
    guard = CollapseGuard(ratio=1.3, corpus=corpus)
    base = probe_perplexity(h, guard)
    req = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")
    good = get_editor("ft-m", lr=1e-3, steps=3).compute(h, [req]).apply(h)
    assert refuse_if_collapsed(h, good, guard, base) <= 1.3 * base
    after_good = h.state_digest()
    bad = get_editor("ft-m", lr=10.0, steps=3).compute(h, [req]).apply(h)
    assert h.state_digest() != after_good
    with pytest.raises(EditCollapseError, match=r"past 1.3 × the unedited model's .* rolled back") as e:
        refuse_if_collapsed(h, bad, guard, base)
    assert e.value.data["perplexity"] > 5 * base
    assert h.state_digest() == after_good and h.applied_edits == (good,)
    good.revert(h)


def test_bench_with_ft_and_a_huge_learning_rate_keeps_going_without_the_bad_edits(fitted_llama, tmp_path, corpus):
    h = fitted_llama
    before = h.state_digest()
    cases = _cases(3)
    res = run_benchmark(get_editor("ft-m", lr=10.0, steps=3), h, cases, setting="sequential", out_dir=tmp_path / "r",
                        protocols=PROTOCOLS, checkpoints=[3], collapse_guard=CollapseGuard(corpus=corpus))
    assert h.state_digest() == before
    assert all(r.info["error"].startswith("EditCollapseError") for r in res.results)
    point = res.summary["lifelong"]["checkpoints"][0]
    assert (point["applied"], point["refused"], point["scores"]) == (0, 3, {})
    assert len(res.summary["lifelong"]["collapse_guard"]["refused"]) == 3


def test_a_fixed_probe_guard_refuses_as_before_and_is_written_as_before(tiny_llama, tmp_path, corpus):
    """windows=1: the guard of runs made before it rotated (the first 128 tokens, one limit); its run.json
    entry has no "windows", so their folders resume unchanged."""
    out = tmp_path / "run"
    guard = CollapseGuard(ratio=1.3, corpus=corpus, windows=1)
    assert guard.to_dict() == {"ratio": 1.3, "tokens": 128, "corpus": corpus}
    assert CollapseGuard.from_dict(guard.to_dict()) == guard
    assert CollapseGuard.from_dict(CollapseGuard(corpus=corpus).to_dict()).windows == 16
    res = run_benchmark(BlowsUp(scale=0.01, big={1}), tiny_llama, _cases(3), setting="sequential", out_dir=out,
                        protocols=PROTOCOLS, checkpoints=[3], collapse_guard=guard)
    assert json.loads((out / "run.json").read_text())["collapse_guard"] == guard.to_dict()
    g = res.summary["lifelong"]["collapse_guard"]
    assert g["windows"] == 1 and g["limit"] == pytest.approx(1.3 * g["base_perplexity"])
    assert [r["case_ids"] for r in g["refused"]] == [["1"]] and g["refused"][0]["probe_perplexity"] > g["limit"]
    assert "probe window" not in res.results[1].info["error"]
    assert [r.get("window") for r in _jsonl(out / "guard.jsonl") if "chunk" in r] == [None, None, None]
    assert "limit" in (out / "table.md").read_text()


def test_the_rotating_probe_reads_each_window_against_its_own_unedited_reading(tiny_llama, corpus, tmp_path):
    from lmedit.bench.sequential import base_perplexities
    from lmedit.metrics.drift import DriftSettings, corpus_ids, perplexity

    guard = CollapseGuard(tokens=64, windows=4, corpus=corpus)
    ids = corpus_ids(tiny_llama, DriftSettings(tokens=256, corpus=corpus))
    bases = base_perplexities(tiny_llama, guard)
    assert bases == pytest.approx([perplexity(tiny_llama, ids[64 * w:64 * (w + 1)], window=64) for w in range(4)],
                                  rel=1e-6)
    assert len(set(bases)) == 4  # four different stretches of text
    with pytest.raises(ValueError, match="outside the guard's 4 window"):
        probe_perplexity(tiny_llama, guard, 4)
    short = tmp_path / "short.txt"
    short.write_text(open(corpus).read()[:2000])
    with pytest.raises(ValueError, match=r"16 windows of 128 tokens \(2048 tokens\) and its corpus is shorter.*"
                                         "fewer windows"):
        base_perplexities(tiny_llama, CollapseGuard(corpus=str(short)))
    with pytest.raises(ValueError, match="windows must be a whole number of at least 1"):
        CollapseGuard(windows=0)


def test_the_guard_refuses_an_edit_that_puts_its_estimate_over_all_windows_past_the_limit(tiny_llama, corpus):
    """Windows read earlier as 1.5× their unedited perplexity: an edit that changes nothing on its own window
    still puts the estimate (geometric mean of the windows' latest ratios) at 1.5^(3/4) > 1.3 and is refused;
    with the windows at 1.0 the same edit is kept."""
    from lmedit.bench.sequential import _latest, base_perplexities, overall_ratio

    h = tiny_llama
    guard = CollapseGuard(tokens=64, windows=4, corpus=corpus)
    bases = base_perplexities(h, guard)
    before = h.state_digest()
    edit = ToyEditor(scale=1e-6).compute(h, [_cases(1)[0].request]).apply(h)
    assert refuse_if_collapsed(h, edit, guard, bases[3], window=3, latest=[1.0] * 4) == pytest.approx(bases[3],
                                                                                                       rel=1e-3)
    with pytest.raises(EditCollapseError, match=r"estimate over all 4 windows \(256 tokens, the others as last "
                                                r"read\) at ×1\.35\d, past ×1\.3; the edit was rolled back") as e:
        refuse_if_collapsed(h, edit, guard, bases[3], window=3, latest=[1.5, 1.5, 1.5, 1.0])
    assert e.value.data["estimate"] == pytest.approx(1.5 ** 0.75, rel=1e-3)
    assert h.state_digest() == before and h.applied_edits == ()
    assert overall_ratio([2.0, 0.5, 1.0], 2, 4.0) == pytest.approx(4 ** (1 / 3))
    assert overall_ratio([1.0, 1.0], 0, math.inf) == math.inf
    records = [{"point": "before", "perplexity": 9.0, "windows": [9.0] * 3},
               {"chunk": 0, "window": 0, "ratio": 1.1, "refused": False},
               {"chunk": 1, "window": 1, "ratio": 2.0, "refused": True, "ratio_after_rollback": 1.2},
               {"chunk": 3, "window": 0, "ratio": 1.25, "refused": False}]
    assert _latest(records, 3) == [1.25, 1.2, 1.0]  # what a resumed run starts from


def test_a_probe_longer_than_a_window_reads_its_text_in_windows_as_drift_does(tiny_llama, corpus):
    """--guard-tokens 600: the probe's perplexity is the drift measurement's on the same 600 tokens (windows of
    512), not one 600-token window past what a model may have been trained on."""
    from lmedit.bench.sequential import PROBE_WINDOW
    from lmedit.metrics.drift import DriftSettings, corpus_ids, perplexity

    ids = corpus_ids(tiny_llama, DriftSettings(tokens=600, corpus=corpus))
    assert len(ids) == 600 and PROBE_WINDOW == 512
    assert probe_perplexity(tiny_llama, CollapseGuard(tokens=600, corpus=corpus, windows=1)) == pytest.approx(
        perplexity(tiny_llama, ids, window=512), rel=1e-6)
    assert probe_perplexity(tiny_llama, CollapseGuard(tokens=128, corpus=corpus)) == pytest.approx(
        perplexity(tiny_llama, ids[:128], window=128), rel=1e-6)


@pytest.mark.parametrize("checkpoints,match", [
    ([10, 5], r"increasing order.*\[5, 10\]"),
    ([2, 2, 4], r"\[2\] appear more than once"),
    ([2, 7], r"checkpoint 7 is past the 6 edits"),
    ([0, 2], "at least 1"),
    ([], "empty"),
    ([3, 6], r"\[3\] fall inside a chunk of 2"),
])
def test_bad_checkpoints_are_refused_before_anything_runs(tiny_llama, tmp_path, checkpoints, match):
    before = tiny_llama.state_digest()
    with pytest.raises(ValueError, match=match):
        run_benchmark(ToyEditor(), tiny_llama, _cases(6), setting="sequential", batch_size=2, out_dir=tmp_path / "r",
                      checkpoints=checkpoints, protocols=PROTOCOLS)
    assert not (tmp_path / "r").exists() and tiny_llama.state_digest() == before
    assert check_checkpoints([2, 6], 6, 2) == (2, 6) and check_checkpoints([5], 5, 2) == (5,)


def test_checkpoints_and_guard_need_a_sequential_run(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="belong to sequential runs"):
        run_benchmark(ToyEditor(), tiny_llama, _cases(2), checkpoints=[1], out_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="ratio must be a number above 1"):
        CollapseGuard(ratio=0.9)
    assert not (tmp_path / "r").exists()


def test_cli_bad_sequential_input_says_what_to_fix(tiny_dir, tmp_path, capsys):
    from lmedit.cli import main

    base = ["bench", "--model", str(tiny_dir), "--method", "ft-m", "--dataset", "zsre", "--out", str(tmp_path / "r")]
    cases = [
        (["--n", "4", "--checkpoints", "2,4"], "add --setting sequential"),
        (["--n", "4", "--setting", "sequential", "--checkpoints", "4,2"], "increasing order"),
        (["--n", "4", "--setting", "sequential", "--checkpoints", "2,2"], "more than once"),
        (["--n", "4", "--setting", "sequential", "--checkpoints", "2,8"], "past the 4 edits"),
        (["--n", "4", "--setting", "sequential", "--checkpoints", "2,x"], "whole numbers separated by commas"),
        (["--n", "4", "--setting", "sequential", "--plot"], "add --checkpoints"),
        (["--n", "4", "--setting", "sequential", "--collapse-guard", "1.5", "--no-collapse-guard"], "contradict"),
        (["--n", "4", "--setting", "sequential", "--collapse-guard", "1"], "above 1"),
        (["--n", "4", "--guard-tokens", "256"], "add --setting sequential"),
        (["--n", "4", "--setting", "sequential", "--guard-tokens", "256", "--no-collapse-guard"], "contradict"),
        (["--n", "4", "--setting", "sequential", "--guard-tokens", "4"], "at least 8 tokens"),
        (["--n", "4", "--guard-windows", "4"], "add --setting sequential"),
        (["--n", "4", "--setting", "sequential", "--guard-windows", "0"], "at least 1"),
        (["--n", "4", "--setting", "sequential", "--guard-windows", "2", "--no-collapse-guard"], "contradict"),
    ]
    for extra, msg in cases:
        assert main(base + extra) != 0
        assert msg in capsys.readouterr().err, extra
    assert not (tmp_path / "r").exists()


def test_each_sequential_edit_hands_the_freed_heap_back(tiny_llama, tmp_path, monkeypatch):
    """glibc keeps freed memory in its heap: a sequential MEMIT run grew ~30 MB of RSS per edit without a trim
    (benchmarks/sequential_memory.py), so the runner trims after every chunk."""
    import sys

    import lmedit.bench.run as run_mod
    from lmedit.metrics.efficiency import release_freed_memory

    assert release_freed_memory() is sys.platform.startswith("linux")
    calls = []
    monkeypatch.setattr(run_mod, "release_freed_memory", lambda: calls.append(1) or True)
    run_benchmark(ToyEditor(), tiny_llama, _cases(3), setting="sequential", out_dir=tmp_path / "r",
                  protocols=PROTOCOLS, collapse_guard=None)
    assert len(calls) == 3


def test_cli_guard_options_reach_the_guard():
    from argparse import Namespace

    from lmedit.cli.bench import lifelong_options

    args = dict(setting="sequential", checkpoints=None, collapse_guard=None, guard_tokens=None, guard_windows=None,
                plot=False, n=4, batch_size=1, no_collapse_guard=False)
    assert lifelong_options(Namespace(**args))[1] == CollapseGuard(ratio=1.3, tokens=128, windows=16)
    assert lifelong_options(Namespace(**{**args, "guard_tokens": 2048, "collapse_guard": 1.2}))[1] == CollapseGuard(
        ratio=1.2, tokens=2048)
    assert lifelong_options(Namespace(**{**args, "guard_windows": 1}))[1] == CollapseGuard(windows=1)
    assert lifelong_options(Namespace(**{**args, "no_collapse_guard": True}))[1] is None


def test_cli_resume_keeps_the_guard_of_the_run_folder(tmp_path):
    """A run made with a fixed probe (before the default rotated), or with no guard, resumes as it was made;
    a guard option given on resume is taken as asked (and a different guard is refused by the runner)."""
    from argparse import Namespace

    from lmedit.cli.bench import lifelong_options

    old, off, new = tmp_path / "old", tmp_path / "off", tmp_path / "new"
    old.mkdir()
    off.mkdir()
    (old / "run.json").write_text(json.dumps({"setting": "sequential",
                                              "collapse_guard": {"ratio": 1.3, "tokens": 512, "corpus": None}}))
    (off / "run.json").write_text(json.dumps({"setting": "sequential"}))
    args = dict(setting="sequential", checkpoints=None, collapse_guard=None, guard_tokens=None, guard_windows=None,
                plot=False, n=4, batch_size=1, no_collapse_guard=False, resume=True)
    assert lifelong_options(Namespace(**args, out=str(old)))[1] == CollapseGuard(tokens=512, windows=1)
    assert lifelong_options(Namespace(**args, out=str(off)))[1] is None
    assert lifelong_options(Namespace(**args, out=str(new)))[1] == CollapseGuard()  # nothing there yet
    assert lifelong_options(Namespace(**{**args, "guard_windows": 4}, out=str(old)))[1] == CollapseGuard(windows=4)
    assert lifelong_options(Namespace(**{**args, "resume": False}, out=str(old)))[1] == CollapseGuard()


def test_cli_sequence_longer_than_the_data(tiny_dir, tmp_path, capsys):
    from lmedit.cli import main
    from lmedit.data import load_dataset

    offset = len(load_dataset("zsre")) - 2  # two cases left from there
    rc = main(["bench", "--model", str(tiny_dir), "--method", "ft-m", "--dataset", "zsre", "--n", "5",
               "--offset", str(offset), "--setting", "sequential", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc != 0 and "the sequence asks for 5 edits, but zsre has only 2 valid case(s)" in err and "lower --n" in err
    assert not (tmp_path / "r").exists()


def test_lifelong_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from lmedit.table.plots import lifelong_curves

    def point(n, r):
        s = {"reliability": {"mean": r, "protocol": "token_acc", "cases": n},
             "locality": {"mean": 1.0, "protocol": "token_acc", "cases": n}}
        return {"edits": n, "chunk": n - 1, "applied": n, "refused": 0, "failed": 0, "tenth": max(1, n // 10),
                "source": "scored", "scores": {"all": s, "oldest": s, "newest": s, "current": s},
                "probe_perplexity": 20.0,
                "drift": {"perplexity": 21.0, "perplexity_before": 20.0, "ratio": 1.05, "ngram_entropy": 5.0}}
    summary = {"method": "toy", "model": {"name": "tiny"},
               "lifelong": {"eval_timing": "final", "checkpoints": [point(10, 1.0), point(100, 0.9)],
                            "collapse_guard": {"ratio": 1.3, "base_perplexity": 20.0}}}
    path = lifelong_curves(summary, tmp_path / "lifelong.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from lmedit.table.plots import _latest_score, lifelong_comparison

    old = point(10, 0.5)
    del old["scores"]["current"]  # a run scored before "latest per fact" existed: every edit stands in
    runs = {"a": summary["lifelong"], "b": {"checkpoints": [old]}}
    assert lifelong_comparison(runs, tmp_path / "cmp.png", "t").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _latest_score(old["scores"], "reliability") == 50.0
    assert math.isnan(_latest_score(old["scores"], "reliability@gen_em"))
    with pytest.raises(ValueError, match="no run with a finished checkpoint"):
        lifelong_comparison({"a": {"checkpoints": []}}, tmp_path / "none.png")


def test_a_fact_edited_again_counts_once_under_its_latest_edit(tiny_llama, tmp_path, corpus):
    """ZsRE asks one fact in several wordings, each with its own new answer: in a sequence the latest edit of a
    fact is the one that stands ("current"); the earlier ones are counted as superseded, not as forgotten."""
    cases = _cases(10)  # cases 8 and 9 rewrite the facts of cases 0 and 1 again (same subject, same true answer)
    assert cases[8].request.fact == cases[0].request.fact and cases[2].request.fact != cases[0].request.fact
    out = tmp_path / "run"
    kw = dict(setting="sequential", eval_timing="immediate", out_dir=out, protocols=PROTOCOLS, checkpoints=[5, 10])
    res = run_benchmark(ToyEditor(scale=0.02), tiny_llama, cases, **kw)
    five, ten = res.summary["lifelong"]["checkpoints"]
    assert (five["superseded"], ten["superseded"]) == (0, 2)
    assert five["scores"]["current"]["reliability"]["cases"] == 5
    assert ten["scores"]["current"]["reliability"]["cases"] == 8
    assert "latest per fact" in (out / "table.md").read_text()
    # a run folder from before "current" existed: resuming adds it from the scored case rows
    lines = _jsonl(out / "checkpoints.jsonl")
    for rec in lines:
        rec["scores"].pop("current"), rec.pop("superseded")
    (out / "checkpoints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    again = run_benchmark(ToyEditor(scale=0.02), tiny_llama, cases, resume=True, **kw)
    assert again.summary["lifelong"]["checkpoints"][1]["scores"]["current"] == ten["scores"]["current"]


def test_a_request_without_its_true_answer_is_its_own_fact_per_wording():
    a = EditRequest(prompt="{} plays", subject="Denny Herzig", target_new="winger")
    b = EditRequest(prompt="{} is a", subject="Denny Herzig", target_new="goalkeeper")
    assert a.fact != b.fact and a.fact == EditRequest(prompt="{} plays", subject=" denny herzig", target_new="x").fact


class _TenSecondsPerStep:
    """A clock for the edit budget: every reading is 10 s after the one before, so each edit measures 10 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 10.0
        return self.now


@pytest.mark.parametrize("timing", ["final", "immediate"])
def test_the_edit_budget_ends_the_run_where_it_runs_out_and_a_resume_goes_on(tiny_llama, tmp_path, corpus,
                                                                             monkeypatch, timing):
    import lmedit.bench.run as run_mod

    monkeypatch.setattr(run_mod, "_clock", _TenSecondsPerStep())
    h, out = tiny_llama, tmp_path / "run"
    before = h.state_digest()
    kw = dict(setting="sequential", eval_timing=timing, out_dir=out, protocols=PROTOCOLS, checkpoints=[1, 4, 6],
              collapse_guard=CollapseGuard(ratio=50, corpus=corpus))
    ed = ToyEditor(scale=0.02)
    res = run_benchmark(ed, h, _cases(6), edit_budget=25, **kw)  # 10 s, 20 s, 30 s: no fourth edit starts
    assert h.state_digest() == before and ed.calls == 3
    s = res.summary
    assert s["n_cases"] == 3 and [r.case_id for r in res.results] == [0, 1, 2]
    assert json.loads((out / "run.json").read_text())["case_ids"] == [0, 1, 2]
    b = s["edit_budget"]
    assert (b["seconds"], b["spent"], b["edits"], b["asked"]) == (25, 30.0, 3, 6)
    assert b["projected_seconds"] == pytest.approx(6 * b["edit_seconds_mean"])
    points = s["lifelong"]["checkpoints"]  # checkpoint 4 and 6 were never reached; the run's end is the last point
    assert [p["edits"] for p in points] == [1, 3] and points[-1]["scores"]["all"]["reliability"]["cases"] == 3
    assert points[-1]["source"] == ("final records" if timing == "final" else "scored")
    assert "stopped by the edit budget" in (out / "table.md").read_text()

    res = run_benchmark(ed, h, _cases(6), resume=True, **kw)  # the full list again, no budget: goes on
    assert h.state_digest() == before and ed.calls == 6  # the first three edits came from disk
    assert res.summary["n_cases"] == 6 and "edit_budget" not in res.summary
    assert [p["edits"] for p in res.summary["lifelong"]["checkpoints"]] == [1, 3, 4, 6]


def test_an_edit_budget_needs_a_sequential_run_and_a_positive_time(tiny_llama, tmp_path, capsys, tiny_dir):
    for setting, budget, msg in [("batch", 10, "sequential runs"), ("sequential", 0, "positive number"),
                                 ("sequential", -1.0, "positive number"), ("sequential", "1h", "positive number")]:
        with pytest.raises(ValueError, match=msg):
            run_benchmark(ToyEditor(), tiny_llama, _cases(2), setting=setting, protocols=PROTOCOLS,
                          out_dir=tmp_path / "r", edit_budget=budget)
    assert not (tmp_path / "r").exists()
    from lmedit.cli import main
    from lmedit.cli.bench import duration

    assert [duration(x) for x in ("90m", "2h", "600s", "45", "1.5h")] == [5400, 7200, 600, 45, 5400]
    base = ["bench", "--model", str(tiny_dir), "--method", "ft-m", "--dataset", "zsre", "--n", "2",
            "--out", str(tmp_path / "r")]
    for extra, msg in [(["--edit-budget", "2 days"], "write e.g. 90m"), (["--edit-budget", "0m"], "positive")]:
        with pytest.raises(SystemExit):  # argparse: usage and the message
            main(base + extra)
        assert msg in capsys.readouterr().err, extra
    assert main(base + ["--edit-budget", "1h"]) != 0
    assert "add --setting sequential" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
