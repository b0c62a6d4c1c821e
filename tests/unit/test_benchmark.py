"""The benchmark runner on a tiny model with a throwaway editor (never registered)."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest
import torch

from lmedit.bench import BenchmarkError, build_summary, run_benchmark
from lmedit.config import Config, option
from lmedit.digests import tensor_digest
from lmedit.edits import WeightDelta
from lmedit.methods.base import Capabilities, Editor
from lmedit.metrics.records import PROB_COMPARE, TOKEN_ACC, CaseResult, ProtocolMixError, Score
from lmedit.types import QA, EditCase, EditInputError, EditRequest


@dataclasses.dataclass
class _ToyConfig(Config):
    scale: float = option(0.3, "size of the random update")
    layer: int = option(1, "layer whose MLP output projection changes")


class ToyEditor(Editor):
    """Adds a random update (seeded by the requests' text) to one MLP output projection."""

    Config = _ToyConfig
    capabilities = Capabilities(batch=True, sequential=True)

    def __init__(self, *a, fail_on=(), crash_after=None, **kw):
        super().__init__(*a, **kw)
        self.fail_on, self.crash_after, self.calls = set(fail_on), crash_after, 0

    def _compute(self, handle, requests, cfg):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise RuntimeError("simulated crash")
        if any(r.case_id in self.fail_on for r in requests):
            raise EditInputError("toy editor refuses this case")
        name = handle.adapter.mlp_out.format(cfg.layer) + ".weight"
        p = handle.model.get_parameter(name)
        seed = zlib.crc32("|".join(r.text + r.target_new for r in requests).encode())
        g = torch.Generator().manual_seed(seed)
        delta = torch.randn(p.shape, generator=g) * cfg.scale
        return WeightDelta({name: delta}, {name: tensor_digest(p)},
                           meta={"stats": {"relative_norm": {name: float(delta.norm() / p.norm())}}})


class SingleOnly(ToyEditor):
    capabilities = Capabilities(batch=False, sequential=False)


def _cases(n=6):
    subjects = ["Danielle Darrieux", "Michel Rocard", "Toko Yasuda", "Barack Obama", "Watts Humphrey", "Apple",
                "Tokyo", "Paris"]
    out = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        req = EditRequest(prompt="The mother tongue of {} is", subject=s, target_new="English",
                          target_true="French", case_id=i)
        out.append(EditCase(req, paraphrases=(f"Where {s} is from, people speak the language of",),
                            locality=(QA("The capital of France is", "Paris"),),
                            neighborhood=("Michel Rocard is a native speaker of",), source=f"toy#{i}"))
    return out


def _lines(path):
    return [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("setting,batch_size,timing", [
    ("single", 1, "final"), ("batch", 3, "final"), ("sequential", 2, "immediate"), ("sequential", 2, "final"),
])
def test_settings_write_files_and_restore_model(tiny_llama, tmp_path, setting, batch_size, timing):
    before = tiny_llama.state_digest()
    cases = _cases(6)
    res = run_benchmark(ToyEditor(), tiny_llama, cases, setting=setting, batch_size=batch_size,
                        eval_timing=timing, out_dir=tmp_path, run_info={"dataset": "toy", "n": 6})
    assert tiny_llama.state_digest() == before
    assert [r.case_id for r in res.results] == list(range(6))
    lines = _lines(tmp_path)
    assert sorted(d["case_id"] for d in lines) == list(range(6))
    assert all(d["setting"]["setting"] == setting for d in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["setting"] == setting and summary["model_restored"] is True
    assert summary["data"] == {"dataset": "toy", "n": 6}
    assert summary["config"] == {"scale": 0.3, "layer": 1} and summary["config_hash"]
    for m in ("reliability", "generalization", "locality", "efficacy_score", "neighborhood_score"):
        assert summary["post"][m]["cases"] == 6, m
        assert m in summary["pre"] or m == "locality"  # pre locality is agreement with itself: not scored
    assert 0 <= summary["post"]["score_s"]["mean"] <= 1
    assert summary["efficiency"]["median_seconds_per_edit"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "| reliability | token_acc |" in table and "seconds per edit" in table
    eff = res.results[0].efficiency
    assert eff["chunk_size"] == (1 if setting == "single" else batch_size)
    assert eff["seconds"] == pytest.approx(eff["chunk_seconds"] / eff["chunk_size"])
    if setting == "sequential":
        assert len(summary["chunk_stats"]) == 3
        assert summary["eval_timing"] == timing


def test_edits_change_scores_and_baseline_is_original(tiny_llama):
    cases = _cases(4)
    res = run_benchmark(ToyEditor(scale=2.0), tiny_llama, cases, setting="sequential", batch_size=1,
                        eval_timing="final")
    # a big cumulative random change moves predictions away from the original model's
    assert res.summary["post"]["locality"]["mean"] < 1.0
    assert all(r.post["locality"].protocol == "token_acc" for r in res.results)


def test_immediate_and_final_differ_for_early_cases(tiny_llama):
    cases = _cases(4)
    imm = run_benchmark(ToyEditor(scale=2.0), tiny_llama, cases, setting="sequential", eval_timing="immediate")
    fin = run_benchmark(ToyEditor(scale=2.0), tiny_llama, cases, setting="sequential", eval_timing="final")
    # the last case is scored on the same model either way (final timing scores it in a batch with the other
    # cases, immediate timing alone: equal up to float rounding); the first is not
    last_imm, last_fin = imm.results[-1].post, fin.results[-1].post
    assert last_imm.keys() == last_fin.keys()
    for m, score in last_imm.items():
        assert (score.protocol, score.n) == (last_fin[m].protocol, last_fin[m].n)
        assert score.value == pytest.approx(last_fin[m].value, rel=1e-4, abs=1e-6), m
    assert imm.results[0].post != fin.results[0].post


def test_recoverable_error_is_recorded_and_run_goes_on(tiny_llama, tmp_path):
    res = run_benchmark(ToyEditor(fail_on={2}), tiny_llama, _cases(4), out_dir=tmp_path)
    bad = res.results[2]
    assert "toy editor refuses" in bad.info["error"] and bad.post == {}
    assert res.summary["n_errors"] == 1 and res.summary["post"]["reliability"]["cases"] == 3
    assert "errors: 1" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("setting,batch_size,timing", [
    ("single", 1, "final"), ("batch", 2, "final"), ("sequential", 2, "immediate"), ("sequential", 2, "final"),
])
def test_resume_after_crash(tiny_llama, tmp_path, setting, batch_size, timing):
    before = tiny_llama.state_digest()
    cases = _cases(6)
    kw = dict(setting=setting, batch_size=batch_size, eval_timing=timing, out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_benchmark(ToyEditor(crash_after=2), tiny_llama, cases, **kw)
    assert tiny_llama.state_digest() == before  # the crash reverted what was applied
    partial = _lines(tmp_path)
    # two chunks finished before the crash; final timing scores nothing until every chunk is applied
    assert len(partial) == (0 if timing == "final" and setting == "sequential" else 2 * batch_size)
    with pytest.raises(BenchmarkError, match="resume=True"):
        run_benchmark(ToyEditor(), tiny_llama, cases, **kw)
    editor = ToyEditor()
    res = run_benchmark(editor, tiny_llama, cases, resume=True, **kw)
    assert editor.calls == (4 if setting == "single" else 1)  # only unfinished chunks are computed again
    assert tiny_llama.state_digest() == before
    ids = [d["case_id"] for d in _lines(tmp_path)]
    assert sorted(ids) == list(range(6)) and len(ids) == 6
    # its wall time is this sitting's, and says so
    assert res.summary.get("resumed_with_cases_done", 0) == len(partial)
    if len(partial):
        assert "wall time of the last sitting" in (tmp_path / "table.md").read_text()
    # a resumed run gives the same numbers as an uninterrupted one
    fresh = run_benchmark(ToyEditor(), tiny_llama, cases, setting=setting, batch_size=batch_size, eval_timing=timing)
    assert [r.post for r in res.results] == [r.post for r in fresh.results]


def test_a_resumed_run_takes_the_unedited_baseline_from_its_folder(tiny_llama, tmp_path, monkeypatch):
    from lmedit.bench.stores import BASELINE_FILE
    from lmedit.metrics.scorers import CaseScorer

    scored = []
    real = CaseScorer.baseline

    def counting(self, handle, cases, **kw):
        scored.extend(c.case_id for c in cases)
        return real(self, handle, cases, **kw)

    monkeypatch.setattr(CaseScorer, "baseline", counting)
    cases = _cases(6)
    kw = dict(setting="sequential", batch_size=2, eval_timing="final", out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_benchmark(ToyEditor(crash_after=2), tiny_llama, cases, **kw)
    assert sorted(scored) == list(range(6))
    assert len((tmp_path / BASELINE_FILE).read_text().splitlines()) == 6  # one line per case
    scored.clear()
    res = run_benchmark(ToyEditor(), tiny_llama, cases, resume=True, **kw)
    assert scored == []  # nothing scored unedited again
    fresh = run_benchmark(ToyEditor(), tiny_llama, cases, setting="sequential", batch_size=2, eval_timing="final")
    assert [r.pre for r in res.results] == [r.pre for r in fresh.results]
    assert [r.post for r in res.results] == [r.post for r in fresh.results]
    # a torn last line (a crash while writing it) only costs that case
    lines = (tmp_path / BASELINE_FILE).read_text().splitlines()
    (tmp_path / BASELINE_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    (tmp_path / "cases.jsonl").write_text("")
    scored.clear()
    run_benchmark(ToyEditor(), tiny_llama, cases, resume=True, **kw)
    assert len(scored) == 1


def test_resume_drops_torn_last_line(tiny_llama, tmp_path):
    cases = _cases(3)
    run_benchmark(ToyEditor(), tiny_llama, cases, out_dir=tmp_path)
    text = (tmp_path / "cases.jsonl").read_text().splitlines()
    (tmp_path / "cases.jsonl").write_text(text[0] + "\n" + text[1][:25])  # crash while writing line 2
    editor = ToyEditor()
    run_benchmark(editor, tiny_llama, cases, out_dir=tmp_path, resume=True)
    assert editor.calls == 2
    assert sorted(d["case_id"] for d in _lines(tmp_path)) == [0, 1, 2]


def test_resume_refuses_other_settings(tiny_llama, tmp_path):
    cases = _cases(2)
    run_benchmark(ToyEditor(), tiny_llama, cases, out_dir=tmp_path)
    with pytest.raises(BenchmarkError, match="config"):
        run_benchmark(ToyEditor(scale=0.1), tiny_llama, cases, out_dir=tmp_path, resume=True)


def test_resume_checks_case_content_and_accepts_older_runs(tiny_llama, tmp_path):
    cases = _cases(3)
    run_benchmark(ToyEditor(), tiny_llama, cases[:2], out_dir=tmp_path)
    changed = [dataclasses.replace(cases[0], request=dataclasses.replace(cases[0].request, target_new="Latin")),
               *cases[1:]]
    with pytest.raises(BenchmarkError, match="case_digests"):  # same ids, other content
        run_benchmark(ToyEditor(), tiny_llama, changed, out_dir=tmp_path, resume=True)
    header = json.loads((tmp_path / "run.json").read_text())
    del header["case_digests"]  # a run written before content digests were recorded
    (tmp_path / "run.json").write_text(json.dumps(header))
    editor = ToyEditor()
    run_benchmark(editor, tiny_llama, cases, out_dir=tmp_path, resume=True)
    assert editor.calls == 1


def test_resume_with_more_cases_extends_the_run(tiny_llama, tmp_path):
    cases = _cases(4)
    first = run_benchmark(ToyEditor(), tiny_llama, cases[:2], out_dir=tmp_path)
    editor = ToyEditor()
    more = run_benchmark(editor, tiny_llama, cases, out_dir=tmp_path, resume=True)
    assert editor.calls == 2  # only the two new cases
    assert [r.post for r in more.results[:2]] == [r.post for r in first.results]
    assert sorted(d["case_id"] for d in _lines(tmp_path)) == [0, 1, 2, 3]
    with pytest.raises(BenchmarkError, match="case_ids"):  # another slice is not an extension
        run_benchmark(ToyEditor(), tiny_llama, cases[1:], out_dir=tmp_path, resume=True)
    part = tmp_path / "batch"  # a batch run whose last chunk was partial would chunk differently: refused
    run_benchmark(ToyEditor(), tiny_llama, cases[:3], setting="batch", batch_size=2, out_dir=part)
    with pytest.raises(BenchmarkError, match="case_ids"):
        run_benchmark(ToyEditor(), tiny_llama, cases, setting="batch", batch_size=2, out_dir=part, resume=True)
    whole = tmp_path / "batch-whole"  # whole chunks extend
    run_benchmark(ToyEditor(), tiny_llama, cases[:2], setting="batch", batch_size=2, out_dir=whole)
    editor = ToyEditor()
    run_benchmark(editor, tiny_llama, cases, setting="batch", batch_size=2, out_dir=whole, resume=True)
    assert editor.calls == 1


@pytest.mark.parametrize("timing", ["final", "immediate"])
def test_a_sequential_run_extends_from_its_saved_edits(tiny_llama, tmp_path, timing):
    cases, seq = _cases(6), tmp_path / "seq"
    kw = dict(setting="sequential", batch_size=2, eval_timing=timing)
    first = run_benchmark(ToyEditor(), tiny_llama, cases[:4], out_dir=seq, checkpoints=[2, 4], **kw)
    on_disk = [json.loads(x)["edits"] for x in (seq / "checkpoints.jsonl").read_text().splitlines()]
    assert on_disk == [2, 4]  # the final point too (final timing: from the final scores), so it is not redone
    editor = ToyEditor()
    more = run_benchmark(editor, tiny_llama, cases, out_dir=seq, resume=True, checkpoints=[2, 4, 6], **kw)
    assert editor.calls == 1  # the new chunk only: the first two are applied from disk
    fresh = run_benchmark(ToyEditor(), tiny_llama, cases, checkpoints=[2, 4, 6], **kw)
    assert [r.post for r in more.results] == [r.post for r in fresh.results]  # final scores after all 6 edits
    points = more.summary["lifelong"]["checkpoints"]
    assert [p["edits"] for p in points] == [2, 4, 6]
    assert points[1]["scores"] == first.summary["lifelong"]["checkpoints"][1]["scores"]  # kept, not redone
    if timing == "final":
        aside = [json.loads(x) for x in (seq / "cases.after-4.jsonl").read_text().splitlines()]
        assert [d["post"] for d in aside] == [r.to_dict()["post"] for r in first.results]
    else:
        assert not (seq / "cases.after-4.jsonl").exists()
    odd = tmp_path / "odd"  # a partial last chunk would chunk differently: refused
    run_benchmark(ToyEditor(), tiny_llama, cases[:3], out_dir=odd, **kw)
    with pytest.raises(BenchmarkError, match="case_ids"):
        run_benchmark(ToyEditor(), tiny_llama, cases, out_dir=odd, resume=True, **kw)


def test_already_true_is_marked(tiny_llama):
    # make the target the model's own greedy answer, so pre reliability is 1
    prompt = "The capital of France is"
    ids = tiny_llama.tokens.prompt_ids(prompt)
    with torch.no_grad():
        nxt = int(tiny_llama.model(torch.tensor([ids])).logits[0, -1].argmax())
    word = tiny_llama.tokenizer.decode([nxt])
    target_ids = tiny_llama.tokens.target_ids(prompt, word.strip())
    assert target_ids == [nxt], f"greedy token {word!r} must round-trip as a spaced target for this test"
    case = EditCase(EditRequest(prompt=prompt, subject="France", target_new=word.strip(), case_id="x"))
    res = run_benchmark(ToyEditor(), tiny_llama, [case])
    assert res.results[0].info.get("already_true") is True


def test_bad_arguments(tiny_llama):
    cases = _cases(2)
    with pytest.raises(ValueError, match="capabilities.batch"):
        run_benchmark(SingleOnly(), tiny_llama, cases, setting="batch", batch_size=2)
    with pytest.raises(ValueError, match="sequential"):
        run_benchmark(SingleOnly(), tiny_llama, cases, setting="sequential")
    with pytest.raises(ValueError, match="setting"):
        run_benchmark(ToyEditor(), tiny_llama, cases, setting="lifelong")
    with pytest.raises(ValueError, match="eval_timing"):
        run_benchmark(ToyEditor(), tiny_llama, cases, setting="sequential", eval_timing="later")
    dup = [cases[0], cases[0]]
    with pytest.raises(EditInputError, match="unique"):
        run_benchmark(ToyEditor(), tiny_llama, dup)


def test_summary_refuses_protocol_mix():
    a = CaseResult(0, post={"reliability": Score(1.0, TOKEN_ACC)})
    b = CaseResult(1, post={"reliability": Score(0.0, PROB_COMPARE)})
    header = {"method": "toy", "setting": "single", "model": {"name": "m"}}
    with pytest.raises(ProtocolMixError):
        build_summary([a, b], header)
    s = build_summary([a, CaseResult(1, post={"reliability": Score(0.5, TOKEN_ACC)})], header)
    assert s["post"]["reliability"]["mean"] == 0.75


def test_progress_bar_runs(tiny_llama, capsys):
    run_benchmark(ToyEditor(), tiny_llama, _cases(2), progress=True)
    assert "rel" in capsys.readouterr().err
    run_benchmark(ToyEditor(), tiny_llama, _cases(2))
    assert capsys.readouterr() == ("", "")  # the library prints nothing without progress=True


def test_resume_of_a_finished_run_computes_nothing(tiny_llama, tmp_path):
    cases = _cases(3)
    first = run_benchmark(ToyEditor(), tiny_llama, cases, setting="sequential", out_dir=tmp_path)
    editor = ToyEditor()
    again = run_benchmark(editor, tiny_llama, cases, setting="sequential", out_dir=tmp_path, resume=True)
    assert editor.calls == 0 and [r.post for r in again.results] == [r.post for r in first.results]
    assert again.summary["post"] == first.summary["post"]


@pytest.mark.slow
def test_real_model_real_data_sequential(tmp_path):
    import lmedit
    from lmedit.data import load_dataset

    try:
        cases = load_dataset("counterfact", n=4)
    except FileNotFoundError as e:
        pytest.skip(str(e).splitlines()[0])
    handle = lmedit.load_model("smollm2-135m")
    before = handle.state_digest()
    res = run_benchmark(ToyEditor(scale=0.05, layer=10), handle, cases, setting="sequential", batch_size=2,
                        eval_timing="final", out_dir=tmp_path, run_info={"dataset": "counterfact", "n": 4})
    assert handle.state_digest() == before
    s = res.summary
    assert s["model"]["fingerprint"] == handle.fingerprint and s["post"]["efficacy_score"]["cases"] == 4
    assert (tmp_path / "edits" / "1" / "edit.json").exists() and len(_lines(tmp_path)) == 4


def test_edit_store_shares_single_edits_between_runs(tiny_llama, tmp_path):
    from lmedit.bench.stores import EditStore
    from lmedit.digests import request_digest

    cases, store = _cases(4), EditStore(tmp_path / "edits")
    first_editor = ToyEditor()
    first = run_benchmark(first_editor, tiny_llama, cases[:3], edit_store=store)
    assert first_editor.calls == 3
    editor = ToyEditor()
    second = run_benchmark(editor, tiny_llama, cases[1:], edit_store=store)
    assert editor.calls == 1, "cases 1 and 2 take the stored edits; only case 3 is computed"
    for a, b in zip(first.results[1:], second.results[:2], strict=True):
        assert {k: s.value for k, s in a.post.items()} == {k: s.value for k, s in b.post.items()}
        assert b.efficiency["reused_edit"] and b.efficiency["seconds"] == a.efficiency["seconds"]
    assert "reused_edit" not in second.results[2].efficiency

    other = ToyEditor(scale=0.5)  # another config never meets these edits
    run_benchmark(other, tiny_llama, cases[:2], edit_store=store)
    assert other.calls == 2
    batch = ToyEditor()
    run_benchmark(batch, tiny_llama, cases[:2], setting="batch", batch_size=2, edit_store=store)
    assert batch.calls == 1, "a batch edit is not a single request's edit: the store is not used"

    entry = next(p for p in (tmp_path / "edits").glob("*/*") if p.name == request_digest(cases[0].request))
    (entry / "edit.json").write_text("{ torn")
    again = ToyEditor()
    run_benchmark(again, tiny_llama, cases[:1], edit_store=store)
    assert again.calls == 1, "a corrupt entry is recomputed, not trusted"

    picky = EditStore(tmp_path / "picky", requests=[request_digest(cases[0].request)])
    run_benchmark(ToyEditor(), tiny_llama, cases[:3], edit_store=picky)
    assert len(list((tmp_path / "picky").glob("*/*"))) == 1, "only the wanted request is kept"
    small = EditStore(tmp_path / "small", max_bytes=10)
    run_benchmark(ToyEditor(), tiny_llama, cases[:1], edit_store=small)
    assert not list((tmp_path / "small").glob("*/*")), "an edit above max_bytes is not kept"


def test_edit_scope_refuses_stateful_and_unidentified_editors(tiny_llama):
    from lmedit.bench import run_header
    from lmedit.bench.stores import edit_scope
    from lmedit.registry import get_editor

    cases = _cases(1)
    assert edit_scope(ToyEditor(), run_header(ToyEditor(), tiny_llama, cases))
    alpha = get_editor("alphaedit")
    assert edit_scope(alpha, {"method": "alphaedit", "config_hash": "x", "model": {"fingerprint": "y"}}) is None
    mend = get_editor("mend")  # trained, but no checkpoint on disk identifies its state
    assert edit_scope(mend, {"method": "mend", "config_hash": "x", "model": {"fingerprint": "y"}}) is None


def test_baseline_store_scores_the_unedited_model_once(tiny_llama, tmp_path, monkeypatch):
    import lmedit.metrics.scorers as scorers
    from lmedit.bench.stores import BaselineStore

    computed = []
    real = scorers.baseline
    monkeypatch.setattr(scorers, "baseline", lambda handle, cases, **kw: computed.append(len(cases)) or
                        real(handle, cases, **kw))
    store, cases = BaselineStore(tmp_path / "base"), _cases(4)
    first = run_benchmark(ToyEditor(), tiny_llama, cases[:3], baseline_store=store)
    second = run_benchmark(ToyEditor(scale=0.1), tiny_llama, cases, baseline_store=store)
    assert computed == [3, 1], "another method on the same cases scores only the new case"
    for a, b in zip(first.results, second.results, strict=False):
        assert a.pre == b.pre
    plain = run_benchmark(ToyEditor(scale=0.1), tiny_llama, cases)
    assert [r.pre for r in plain.results] == [r.pre for r in second.results]
    assert [r.post for r in plain.results] == [r.post for r in second.results], "same locality reference"

    with torch.no_grad():  # other weights: the stored scores are not theirs
        tiny_llama.model.get_parameter(tiny_llama.adapter.mlp_out.format(0) + ".weight").add_(0.01)
    run_benchmark(ToyEditor(), tiny_llama, cases[:1], baseline_store=store)
    assert computed[-1] == 1 and len(computed) == 4
    for f in (tmp_path / "base").glob("*/*.json"):
        f.write_text("{ torn")
    run_benchmark(ToyEditor(), tiny_llama, cases[:2], baseline_store=store)
    assert computed[-1] == 2, "corrupt entries are scored again"
