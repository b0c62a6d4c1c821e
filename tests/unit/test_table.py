"""lmedit table: the cell cache, the layout, and whole (tiny) tables through the local backend.

The tables run a throwaway in-context editor (registered for the test only) on a tiny random Llama saved to
disk, over 2-case slices of the real benchmark files.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest
import torch

from lmedit.config import Config, option
from lmedit.edits import PromptContext
from lmedit.methods.base import Capabilities, Editor
from lmedit.metrics.generate import GenSettings
from lmedit.registry import UnknownMethodError, editor_class, register_editor
from lmedit.table import build_table, resolve_methods
from lmedit.table.cells import CellCache, CellResult, CellSpec, cell_key
from lmedit.table.layout import build_rows, markdown
from lmedit.types import EditInputError

TOY = "table-toy"
TOY_FIT = "table-toy-fit"


@dataclasses.dataclass
class ToyConfig(Config):
    template: str = option("Fact: {} {}. ", "context written before every prompt")


class ToyEditor(Editor):
    """Puts the new fact in front of every prompt; counts its computes and can be told to crash."""

    Config = ToyConfig
    capabilities = Capabilities(batch=True, sequential=True, edit_kind="prompt_context")
    calls: ClassVar[int] = 0
    crash_after: ClassVar[int | None] = None
    reject: ClassVar[bool] = False

    def _compute(self, handle: Any, requests: list, cfg: ToyConfig) -> PromptContext:
        if ToyEditor.reject:
            raise EditInputError("toy cannot edit this")
        if ToyEditor.crash_after is not None and ToyEditor.calls >= ToyEditor.crash_after:
            raise RuntimeError("simulated crash")
        ToyEditor.calls += 1
        return PromptContext("".join(cfg.template.format(r.text, r.target_new) for r in requests))


@dataclasses.dataclass
class ToyFitConfig(ToyConfig):
    moved: ClassVar[dict[str, str]] = {"checkpoint": "checkpoint"}  # a trained editor's: RunOptions.checkpoint


class ToyFitEditor(ToyEditor):
    Config = ToyFitConfig
    capabilities = Capabilities(batch=False, sequential=False, needs_fit=True, edit_kind="prompt_context")


@pytest.fixture
def toy():
    from lmedit import registry

    registry.list_editors()  # discover the real editors first, so ours is only added
    register_editor(TOY)(ToyEditor)
    register_editor(TOY_FIT)(ToyFitEditor)
    ToyEditor.calls, ToyEditor.crash_after, ToyEditor.reject = 0, None, False
    yield ToyEditor
    ToyEditor.reject = False
    registry._EDITORS.pop(TOY, None)
    registry._EDITORS.pop(TOY_FIT, None)


@pytest.fixture
def model_dir(tiny_dir):
    return str(tiny_dir)


def _table(model_dir, out, **kw):
    kw.setdefault("methods", TOY)
    kw.setdefault("datasets", ["zsre"])
    kw.setdefault("n", 2)
    return build_table(model_dir, out=out, threads=1, **kw)


# --- cache -----------------------------------------------------------------------------------------------

def _cell(spec: CellSpec, key: dict, value: float = 0.5) -> CellResult:
    return CellResult(spec, "ok", post={"reliability": {"mean": value, "protocol": "token_acc", "cases": 2}}, key=key)


def test_cache_hit_stale_and_corrupt(tmp_path):
    cache = CellCache(tmp_path)
    spec = CellSpec("m", "zsre", n=2)
    key = cell_key(spec, fingerprint="f", config_hash="c", data_digest="d")
    assert cache.load(spec, key) is None
    folder, resume = cache.prepare(spec, key)
    assert not resume and (folder / "key.json").exists()
    assert cache.prepare(spec, key)[1], "a partial run with the same key resumes"
    cache.store(_cell(spec, key))
    hit = cache.load(spec, key)
    assert hit is not None and hit.cached and hit.post["reliability"]["mean"] == 0.5

    stale = cell_key(spec, fingerprint="f", config_hash="other", data_digest="d")
    assert cache.load(spec, stale) is None and not folder.exists(), "a stale cell is wiped"

    cache.prepare(spec, key)
    cache.store(_cell(spec, key))
    path = folder / "cell.json"
    doc = json.loads(path.read_text())
    doc["body"]["post"]["reliability"]["mean"] = 0.99  # tampered: the digest no longer matches
    path.write_text(json.dumps(doc))
    assert cache.load(spec, key) is None and not folder.exists(), "a corrupt cell is not trusted"
    cache.prepare(spec, key)
    path.write_text('{"sha256": "x", "bo')  # torn write
    assert cache.load(spec, key) is None


def test_multihop_slice_defaults_to_a_quarter():
    from lmedit.table import slice_sizes

    assert slice_sizes(["zsre", "mquake"], 100, None) == {"zsre": 100, "mquake": 25}
    assert slice_sizes(["mquake"], 2, None) == {"mquake": 1}
    assert slice_sizes(["mquake"], 100, 7) == {"mquake": 7}


def test_key_changes_with_every_component():
    spec = CellSpec("m", "zsre", n=2)
    base = cell_key(spec, fingerprint="f", config_hash="c", data_digest="d")
    variants = [cell_key(dataclasses.replace(spec, n=3), fingerprint="f", config_hash="c", data_digest="d"),
                cell_key(dataclasses.replace(spec, setting="sequential"), fingerprint="f", config_hash="c",
                         data_digest="d"),
                cell_key(spec, fingerprint="g", config_hash="c", data_digest="d"),
                cell_key(spec, fingerprint="f", config_hash="e", data_digest="d"),
                cell_key(spec, fingerprint="f", config_hash="c", data_digest="x")]
    assert all(v != base for v in variants)


# --- layout ----------------------------------------------------------------------------------------------

def test_layout_bold_pre_and_footnotes():
    def ok(method, rel, gen=None, fields=None):
        post = {"reliability": {"mean": rel, "protocol": "token_acc", "cases": 2},
                "locality": {"mean": 1.0, "protocol": "token_acc", "cases": 2}}
        if gen is not None:
            post["generalization"] = {"mean": gen, "protocol": "token_acc", "cases": 2}
        pre = {"reliability": {"mean": 0.25, "protocol": "token_acc", "cases": 2}}
        return CellResult(CellSpec(method, "zsre", n=2), "ok", post=post, pre=pre,
                          fields=fields or {"paraphrases": 2, "locality": 2, "portability": 0})

    cells = [ok("a", 0.5, 0.4), ok("b", 0.9, None, {"paraphrases": 0, "locality": 2, "portability": 0}),
             CellResult(CellSpec("c", "zsre", n=2), "skipped", "c needs a checkpoint")]
    rows = build_rows(cells, ["a", "b", "c"], ["zsre"])
    assert [r.metric for r in rows] == ["reliability", "generalization", "locality"]
    meta = {"model": "tiny", "model_fingerprint": "f", "lmedit_version": "0", "commit": "abc",
            "setting_label": "single edits", "n": 2}
    md = markdown(rows, ["a", "b", "c"], meta)
    rel = next(line for line in md.splitlines() if "Reliability" in line)
    assert "| 25.0 | 50.0 | **90.0** | -[^" in rel, rel
    loc = next(line for line in md.splitlines() if "Locality" in line)
    assert "**" not in loc, "equal values are not bolded"
    assert "c needs a checkpoint" in md
    assert "the zsre cases have no 'paraphrases' field, which generalization needs" in md


# --- whole tables ----------------------------------------------------------------------------------------

def test_table_end_to_end_then_cached(toy, model_dir, tmp_path):
    t = _table(model_dir, tmp_path, datasets=["zsre", "mquake"], multihop_n=2)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"table1.md", "table1.csv", "table1.json", "efficiency.md", "table1.png", "efficiency.png"} <= files
    assert (tmp_path / "table1.png").read_bytes()[:4] == b"\x89PNG"
    gen = ("gen_em", "gen_f1", "gen_contains")
    assert [r.metric for r in t.rows] == [
        "reliability", *(f"reliability@{g}" for g in gen), "generalization", *(f"generalization@{g}" for g in gen),
        "locality", "locality@gen_em", "locality@gen_f1", *(f"locality_truth@{g}" for g in gen), "multihop"]
    assert all(c.status == "ok" for c in t.cells), [c.reason for c in t.cells]
    doc = json.loads((tmp_path / "table1.json").read_text())
    rec = [r for r in doc["rows"] if r["method"] == TOY]
    assert {r["protocol"] for r in rec} == {"token_acc", "greedy_exact", *gen}
    assert all(r["protocol"] == r["metric"].partition("@")[2] for r in rec if "@" in r["metric"])
    assert all(r["n_cases"] == 2 and r["model_fingerprint"] == doc["meta"]["model_fingerprint"] for r in rec)
    assert doc["meta"]["lmedit_version"] and "config_hash" in rec[0]
    header = (tmp_path / "table1.csv").read_text().splitlines()[0]
    assert header.startswith("dataset,metric,method,value,protocol,n_cases")
    assert "s/edit zsre" in (tmp_path / "efficiency.md").read_text()
    _check_headline(tmp_path, doc)
    mquake = next(c for c in t.cells if c.spec.dataset == "mquake")
    assert mquake.efficiency["benchmark_wall_seconds"] > 0, "a multi-hop cell sums its cases' wall times"
    calls = toy.calls
    assert calls == 2 + 2, "one edit per ZsRE case; one batched edit of 4 requests per MQuAKE case"

    again = _table(model_dir, tmp_path, datasets=["zsre", "mquake"], multihop_n=2)
    assert toy.calls == calls, "a rerun computes nothing"
    assert all(c.cached for c in again.cells)
    assert again.markdown.split("\n", 4)[4] == t.markdown.split("\n", 4)[4]  # same body (the header has the time)

    cell_file = tmp_path / "cells" / f"{TOY}__zsre" / "cell.json"
    cell_file.write_text(cell_file.read_text()[:-20])  # corrupt one entry
    third = _table(model_dir, tmp_path, datasets=["zsre", "mquake"], multihop_n=2)
    assert [c.cached for c in third.cells] == [False, True]
    assert toy.calls == calls + 2, "only the corrupt cell was recomputed"


def _check_headline(out, doc):
    """headline.md puts each method's teacher-forced and generated scores side by side, from table1.json."""
    assert (out / "gap.png").read_bytes()[:4] == b"\x89PNG"
    value = {(r["dataset"], r["metric"], r["method"]): r["value"] for r in doc["rows"]}
    lines = [ln for ln in (out / "headline.md").read_text().splitlines() if ln.startswith("| ZsRE") or
             ln.startswith("|  |")]
    assert [ln.split(" | ")[1] for ln in lines] == ["Reliability", "Generalization", "Locality"]
    for line, metric, tags in zip(lines, ("reliability", "generalization", "locality"),
                                  (("", "@gen_em", "@gen_contains"), ("", "@gen_em", "@gen_contains"), ("", "@gen_em")),
                                  strict=True):
        cell = line.rstrip(" |").split(" | ")[-1]
        want = " · ".join(f"{100 * value[('zsre', metric + t, TOY)]:.1f}" for t in tags)
        assert cell == want, (line, want)
    assert "MQuAKE" not in (out / "headline.md").read_text(), "multi-hop has one protocol: not in the headline"


def test_mquake_edits_are_batched_or_stacked(toy, model_dir, tmp_path):
    _table(model_dir, tmp_path, datasets=["mquake"], n=1)
    assert toy.calls == 1, "a batching editor applies the 4 MQuAKE edits as one batch"
    ToyEditor.capabilities = Capabilities(batch=False, sequential=True, edit_kind="prompt_context")
    try:
        _table(model_dir, tmp_path / "seq", datasets=["mquake"], n=1)
    finally:
        ToyEditor.capabilities = Capabilities(batch=True, sequential=True, edit_kind="prompt_context")
    assert toy.calls == 1 + 4, "a non-batching editor stacks them one at a time"


def test_interrupted_cell_resumes_finished_cases(toy, model_dir, tmp_path):
    toy.crash_after = 1  # the second edit crashes: one case is finished and on disk
    t = _table(model_dir, tmp_path, n=3)
    assert t.cells[0].status == "failed" and "simulated crash" in t.cells[0].reason
    assert "-[^1]" in t.markdown
    lines = (tmp_path / "cells" / f"{TOY}__zsre" / "run-000" / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 1
    toy.crash_after = None
    t = _table(model_dir, tmp_path, n=3)
    assert t.cells[0].status == "ok" and t.cells[0].info["cases"] == 3
    assert toy.calls == 3, "the finished case was not edited again"


def test_cell_whose_every_edit_fails_is_retried(toy, model_dir, tmp_path):
    toy.reject = True
    t = _table(model_dir, tmp_path)
    assert t.cells[0].status == "skipped" and "toy cannot edit this" in t.cells[0].reason
    assert not (tmp_path / "cells" / f"{TOY}__zsre").exists(), "nothing kept: the next run tries again"
    toy.reject = False
    assert _table(model_dir, tmp_path).cells[0].status == "ok"


def test_sequential_setting_same_shape(toy, model_dir, tmp_path):
    single = _table(model_dir, tmp_path / "s")
    seq = _table(model_dir, tmp_path / "q", setting="sequential", edits=2, eval_timing="immediate")
    assert [r.metric for r in seq.rows] == [r.metric for r in single.rows]
    assert "sequential, T=2 edits per sequence, immediate evaluation" in seq.markdown


def test_unknown_method_lists_available(toy):
    with pytest.raises(UnknownMethodError, match="Available: .*table-toy"):
        resolve_methods("table-toy,nope")


def test_cli_unknown_method(toy, capsys):
    from lmedit.cli import main

    assert main(["table", "--methods", "nope", "--out", "unused"]) == 1
    assert "Available:" in capsys.readouterr().err
    assert main(["table", "--methods", TOY, "--datasets", "zsre,nope", "--out", "unused"]) == 1
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["table", "--methods", TOY, "--datasets", "known", "--out", "unused"]) == 1
    assert "not edit cases" in capsys.readouterr().err


def test_missing_checkpoint_and_unregistered_paper_method(toy, model_dir, tmp_path):
    t = _table(model_dir, tmp_path, methods=f"{TOY},{TOY_FIT}")
    fit = next(c for c in t.cells if c.spec.method == TOY_FIT)
    assert fit.status == "skipped" and "table-toy-fit must be trained" in fit.reason and "checkpoint" in fit.reason
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    history = [{"step": 5, "seconds": 3.0}, {"step": 10, "seconds": 7.5}]
    (ckpt / "editor.json").write_text(json.dumps({"history": history}))
    t = _table(model_dir, tmp_path / "fit", methods=TOY_FIT, checkpoints={TOY_FIT: str(ckpt)})
    assert t.cells[0].status == "ok", t.cells[0].reason
    assert t.cells[0].efficiency["one_off:training_seconds"] == 7.5
    assert "7.500 (training 7.500)" in (tmp_path / "fit" / "efficiency.md").read_text()
    # a checkpoint trained on one dataset serves only that dataset's cells
    t = _table(model_dir, tmp_path / "fit-zsre", methods=TOY_FIT, checkpoints={f"{TOY_FIT}@zsre": str(ckpt)})
    assert t.cells[0].spec.dataset == "zsre" and t.cells[0].status == "ok", t.cells[0].reason
    t = _table(model_dir, tmp_path / "fit-cf", methods=TOY_FIT, checkpoints={f"{TOY_FIT}@counterfact": str(ckpt)})
    assert t.cells[0].status == "skipped"
    names, missing = resolve_methods("paper")
    assert len(names) == 10 and all("registered" in r for r in missing.values())


def test_multihop_leaves_model_untouched(toy, model_dir):
    from lmedit.bench.apply import CannotStackEdits, apply_together, revert_checked
    from lmedit.data import load_mquake
    from lmedit.metrics.multihop import score_multihop
    from lmedit.models.loading import load_model

    handle = load_model(model_dir)
    case = load_mquake(n=1)[0]
    before = score_multihop(handle, case)
    assert before["multihop"].protocol == "greedy_exact" and before["multihop"].n >= 3
    ms: list = []
    edits, apply_s = apply_together(ToyEditor(), handle, list(case.requests), ms)
    assert handle.contexts and len(ms) == 1 and ms[0].seconds >= 0 and apply_s >= 0
    revert_checked(handle, edits)
    assert handle.contexts == []
    with pytest.raises(CannotStackEdits):
        apply_together(ToyFitEditor(), handle, list(case.requests), [])
    torch.testing.assert_close(score_multihop(handle, case)["multihop_token_acc"].value,
                               before["multihop_token_acc"].value)


def test_cells_reuse_finished_bench_runs(toy, model_dir, tmp_path):
    from lmedit.bench import run_benchmark
    from lmedit.data import load_dataset
    from lmedit.metrics.records import summarize
    from lmedit.models.loading import load_model
    from lmedit.registry import get_editor

    handle = load_model(model_dir)
    runs = tmp_path / "runs"
    zsre = load_dataset("zsre", n=3)
    cf = load_dataset("counterfact", n=3)
    assert [c.case_id for c in cf[:2]] == [c.case_id for c in zsre[:2]], "the trap: ids are shared across datasets"
    run_benchmark(get_editor(TOY), handle, cf, out_dir=runs / "cf-3", run_info={"dataset": "counterfact"})
    bench = run_benchmark(get_editor(TOY), handle, zsre, out_dir=runs / "toy-3", run_info={"dataset": "zsre"})
    run_benchmark(get_editor(TOY, {"template": "Other: {} {}. "}), handle, zsre, out_dir=runs / "toy-other")
    run_benchmark(get_editor(TOY), handle, zsre[:1], out_dir=runs / "a-1")  # found first, lends less
    assert toy.calls == 10

    t = _table(model_dir, tmp_path / "t", n=2, reuse=[str(runs)])
    assert toy.calls == 10, "both cases came from the matching bench run"
    cell = t.cells[0]
    assert cell.info["reused"] == {"from": str(runs / "toy-3"), "cases": 2}, "the run lending most; not CounterFact's"
    assert cell.post == summarize(bench.results[:2], "post") and cell.pre == summarize(bench.results[:2], "pre")
    assert f"{TOY}/zsre 2 from `{runs / 'toy-3'}`" in t.markdown

    t = _table(model_dir, tmp_path / "t4", n=4, reuse=[str(runs / "toy-3")])
    assert toy.calls == 11 and t.cells[0].info["reused"]["cases"] == 3, "three adopted, the fourth computed"

    t = _table(model_dir, tmp_path / "changed", n=2, reuse=[str(runs)],
               method_overrides={TOY: {"template": "New: {} {}. "}})
    assert toy.calls == 13 and "reused" not in t.cells[0].info, "another config: nothing to reuse"

    # a run written before runs recorded their cases' content: its summary.json must name the dataset
    header = json.loads((runs / "toy-3" / "run.json").read_text())
    del header["case_digests"]
    (runs / "toy-3" / "run.json").write_text(json.dumps(header))
    assert _table(model_dir, tmp_path / "old", n=2, reuse=[str(runs / "toy-3")]).cells[0].info["reused"]
    summary = json.loads((runs / "toy-3" / "summary.json").read_text())
    (runs / "toy-3" / "summary.json").write_text(json.dumps({**summary, "data": {"dataset": "counterfact"}}))
    assert "reused" not in _table(model_dir, tmp_path / "old2", n=2, reuse=[str(runs / "toy-3")]).cells[0].info
    assert toy.calls == 15


def test_adopt_cases_refuses_other_runs(tmp_path):
    from lmedit.bench import adopt_cases

    header = {"method": "m", "config_hash": "a", "setting": "batch", "batch_size": 2, "case_ids": [1, 2, 3],
              "case_digests": ["d1", "d2", "d3"]}
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.json").write_text(json.dumps({**header, "case_ids": [1, 2, 3, 4],
                                              "case_digests": ["d1", "d2", "d3", "d4"]}))
    (src / "cases.jsonl").write_text("".join(json.dumps({"case_id": i, "post": {}, "pre": {}}) + "\n"
                                             for i in (1, 2, 3, 4)))
    assert adopt_cases(tmp_path / "a", [src], {**header, "config_hash": "b"})[1].endswith("(different config_hash)")
    assert adopt_cases(tmp_path / "b", [src], {**header, "setting": "sequential"})[0] == 0
    n, _ = adopt_cases(tmp_path / "c", [src], header)  # a batch run lends whole batches only: [1, 2]
    assert n == 2 and len((tmp_path / "c" / "cases.jsonl").read_text().splitlines()) == 2
    assert adopt_cases(tmp_path / "c", [src], header)[1].endswith("already holds a run")
    assert adopt_cases(tmp_path / "e", [src], {**header, "case_digests": ["x1", "d2", "d3"]})[0] == 0  # new content

    single = {**header, "setting": "single", "batch_size": 1, "case_ids": [4, 3, 9], "case_digests": ["d4", "X", "d9"]}
    (src / "run.json").write_text(json.dumps({**single, "case_ids": [1, 2, 3, 4],
                                              "case_digests": ["d1", "d2", "d3", "d4"]}))
    assert adopt_cases(tmp_path / "d", [src], single)[0] == 1  # single edits: any case with the same id and content
    assert [json.loads(x)["case_id"] for x in (tmp_path / "d" / "cases.jsonl").read_text().splitlines()] == [4]

    old = {k: v for k, v in single.items() if k != "case_digests"}
    (src / "run.json").write_text(json.dumps({**old, "case_ids": [1, 2, 3, 4]}))
    assert "does not record" in adopt_cases(tmp_path / "f", [src], single, dataset="zsre")[1]  # no summary.json
    (src / "summary.json").write_text(json.dumps({"data": {"dataset": "zsre"}}))
    assert adopt_cases(tmp_path / "g", [src], single, dataset="zsre")[0] == 2
    assert adopt_cases(tmp_path / "h", [src], single, dataset="counterfact")[0] == 0


def test_a_retrained_checkpoint_lends_nothing(toy, model_dir, tmp_path):
    from lmedit.bench import lendable_cases, run_benchmark, run_header
    from lmedit.data import load_dataset
    from lmedit.models.loading import load_model
    from lmedit.registry import get_editor

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "editor.json").write_text(json.dumps({"method": TOY_FIT, "files": {"editor.a.safetensors": "aaa"}}))
    handle, cases = load_model(model_dir), load_dataset("zsre", n=2)
    editor = get_editor(TOY_FIT, {"checkpoint": str(ck)})
    run_benchmark(editor, handle, cases, out_dir=tmp_path / "run")
    assert len(lendable_cases(tmp_path / "run", run_header(editor, handle, cases))[0]) == 2
    import shutil

    shutil.copytree(ck, tmp_path / "moved")
    moved = get_editor(TOY_FIT, {"checkpoint": str(tmp_path / "moved")})
    assert len(lendable_cases(tmp_path / "run", run_header(moved, handle, cases))[0]) == 2, "same weights, new path"
    (ck / "editor.json").write_text(json.dumps({"method": TOY_FIT, "files": {"editor.b.safetensors": "bbb"}}))
    lent, why = lendable_cases(tmp_path / "run", run_header(editor, handle, cases))
    assert not lent and "checkpoint_state" in why, "same path, retrained weights: another editor"


def test_cell_key_follows_the_checkpoints_content_not_its_path(toy, model_dir, tmp_path):
    import shutil
    import time

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "editor.json").write_text(json.dumps({"method": TOY_FIT, "files": {"editor.a.safetensors": "aaa"}}))
    first = _table(model_dir, tmp_path / "t", methods=TOY_FIT, checkpoints={TOY_FIT: str(ck)})
    assert first.cells[0].status == "ok", first.cells[0].reason
    calls = toy.calls
    time.sleep(0.01)
    shutil.copytree(ck, tmp_path / "copy")  # new path, new mtimes, same weights
    again = _table(model_dir, tmp_path / "t", methods=TOY_FIT, checkpoints={TOY_FIT: str(tmp_path / "copy")})
    assert again.cells[0].cached and toy.calls == calls, "a copied checkpoint keeps its cells"
    (ck / "editor.json").write_text(json.dumps({"method": TOY_FIT, "files": {"editor.b.safetensors": "bbb"}}))
    third = _table(model_dir, tmp_path / "t", methods=TOY_FIT, checkpoints={TOY_FIT: str(ck)})
    assert not third.cells[0].cached and toy.calls > calls, "retrained weights make the cell stale"


def test_cells_that_edit_the_same_facts_compute_each_edit_once(toy, model_dir, tmp_path):
    # the first 4 ZsRE-portability requests include ZsRE's second and fourth (same prompt, subject, targets)
    both = _table(model_dir, tmp_path / "both", datasets=["zsre", "zsre-portability"], n=4)
    assert toy.calls == 4 + 4 - 2
    assert len(list((tmp_path / "both" / "edits").glob("*/*"))) == 2, "only the shared requests' edits are kept"
    calls = toy.calls
    alone = [_table(model_dir, tmp_path / ds, datasets=[ds], n=4) for ds in ("zsre", "zsre-portability")]
    assert toy.calls == calls + 8 and not (tmp_path / "zsre" / "edits").exists()
    for cell, single in zip(both.cells, [c for t in alone for c in t.cells], strict=True):
        assert cell.post == single.post and cell.pre == single.pre
    port = both.cells[1]
    assert port.efficiency["reused_edits"] == 2 and "reused_edits" not in both.cells[0].efficiency
    assert len(list((tmp_path / "both" / "baselines").glob("*/*.json"))) == 8, "each case scored unedited once"


def test_cached_only_lays_out_finished_cells_and_computes_nothing(toy, model_dir, tmp_path):
    _table(model_dir, tmp_path)
    calls = toy.calls
    t = _table(model_dir, tmp_path, datasets=["zsre", "counterfact"], cached_only=True)
    assert toy.calls == calls
    assert [(c.spec.dataset, c.status) for c in t.cells] == [("zsre", "ok"), ("counterfact", "skipped")]
    assert "not computed yet" in t.cells[1].reason and "not computed yet" in t.markdown
    assert not (tmp_path / "cells" / f"{TOY}__counterfact").exists()


def test_a_t5_table_shows_why_decoder_only_methods_cannot_run(tmp_path):
    """--model a local T5 directory: the methods that edit encoder-decoders fill their cells, ROME and MEMIT
    show '-' with the reason (as the paper's T5 columns do)."""
    from conftest import save_tiny

    t5 = save_tiny(tmp_path / "t5", "t5")
    t = build_table(str(t5), out=tmp_path / "out", methods="ft-m,rome,memit", datasets=["zsre"], n=2, threads=1,
                    plots=False, method_overrides={"ft-m": editor_class("ft-m").quick})
    status = {c.spec.method: (c.status, c.reason) for c in t.cells}
    assert status["ft-m"][0] == "ok", status["ft-m"]
    for m in ("rome", "memit"):
        assert status[m][0] == "skipped" and "encoder-decoder" in status[m][1], status[m]
    md = (tmp_path / "out" / "table1.md").read_text()
    assert md.count("-[^") >= 6 and "encoder-decoder" in md, "rome and memit: '-' in each row, reason in a footnote"


def test_cells_cached_before_the_generation_protocol_keep_their_key_and_gain_it(toy, model_dir, tmp_path):
    old = _table(model_dir, tmp_path, protocols=["token_acc", "prob_compare"])
    cell = old.cells[0]
    assert not any("@" in m for m in cell.post) and "reliability" in cell.post
    # a cell written before cells recorded their protocols
    path = tmp_path / "cells" / f"{TOY}__zsre" / "cell.json"
    doc = json.loads(path.read_text())
    doc["body"]["info"].pop("protocols")
    from lmedit.digests import digest

    doc["sha256"] = digest(doc["body"])
    path.write_text(json.dumps(doc))
    key = json.loads((tmp_path / "cells" / f"{TOY}__zsre" / "key.json").read_text())
    calls = toy.calls

    look = _table(model_dir, tmp_path, cached_only=True)  # both protocols asked, nothing computed
    assert toy.calls == calls and look.cells[0].cached
    assert "cached before the generation protocol" in look.markdown
    gen_row = next(r for r in look.rows if r.metric == "reliability@gen_em")
    assert gen_row.values[TOY] is None, "marked missing, not zero"

    full = _table(model_dir, tmp_path)  # the default: both protocols; the cached cell is topped up
    assert toy.calls == calls + 2, "its two cases were edited again for the generation protocol"
    assert json.loads((tmp_path / "cells" / f"{TOY}__zsre" / "key.json").read_text()) == key, "same cache key"
    topped = full.cells[0]
    assert topped.post["reliability"] == cell.post["reliability"], "the teacher-forced number is kept"
    assert topped.post["reliability@gen_em"]["protocol"] == "gen_em"
    assert set(topped.info["protocols"]) >= {"token_acc", "prob_compare", "gen"}
    again = _table(model_dir, tmp_path)
    assert toy.calls == calls + 2 and again.cells[0].cached
    only_tf = _table(model_dir, tmp_path, protocols=["token_acc"])
    assert not any("@" in r.metric for r in only_tf.rows) and toy.calls == calls + 2
    qa = _table(model_dir, tmp_path, generation=GenSettings(context="qa"))
    assert not qa.cells[0].cached, "other generation settings are another cell"


def test_qaedit_block(toy, model_dir, tmp_path):
    t = _table(model_dir, tmp_path, datasets=["qaedit"], protocols=["token_acc", "gen"])
    assert t.cells[0].status == "ok", t.cells[0].reason
    assert "| QAEdit | Reliability | token_acc |" in t.markdown
    assert "| Reliability | gen_em |" in t.markdown and "Locality (ground truth)" in t.markdown


def test_a_teacher_forced_bench_run_lends_its_cases_and_the_cell_computes_the_generation_protocol(
        toy, model_dir, tmp_path):
    from lmedit.bench import run_benchmark
    from lmedit.data import load_dataset
    from lmedit.models.loading import load_model
    from lmedit.registry import get_editor

    handle = load_model(model_dir)
    zsre = load_dataset("zsre", n=2)
    bench = run_benchmark(get_editor(TOY), handle, zsre, out_dir=tmp_path / "runs" / "tf",
                          protocols=("token_acc", "prob_compare"), run_info={"dataset": "zsre"})
    calls = toy.calls
    t = _table(model_dir, tmp_path / "t", reuse=[str(tmp_path / "runs")])
    cell = t.cells[0]
    assert cell.info["reused"]["cases"] == 2
    assert toy.calls == calls + 2, "the lent cases lack the generation protocol: edited again for it"
    assert cell.post["reliability"]["mean"] == bench.summary["post"]["reliability"]["mean"]
    assert cell.post["reliability@gen_em"]["protocol"] == "gen_em"


def test_multihop_run_resumes_through_the_runners_reader(toy, model_dir, tmp_path):
    from lmedit.bench import run_benchmark
    from lmedit.data import load_mquake
    from lmedit.models.loading import load_model

    handle, cases = load_model(model_dir), load_mquake(n=2)
    first = run_benchmark(ToyEditor(), handle, cases, out_dir=tmp_path).results
    path = tmp_path / "cases.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:15])  # killed while writing the second case
    calls = toy.calls
    again = run_benchmark(ToyEditor(), handle, cases, out_dir=tmp_path, resume=True).results
    assert toy.calls == calls + 1, "only the torn case is edited again"
    assert [(r.case_id, r.pre, r.post) for r in again] == [(r.case_id, r.pre, r.post) for r in first]
    assert again[0].to_dict() == first[0].to_dict(), "the finished case is read back, not recomputed"
    assert len(path.read_text().splitlines()) == 2


def test_headline_marks_cells_whose_generation_scored_fewer_cases():
    """A generated score out of fewer cases than the teacher-forced one (a gold answer such as ')' has no words
    to match) carries a footnote with both counts; a cell scored on every case carries none."""
    from lmedit.table.layout import Row, headline_markdown

    def row(metric, a, b, cases_a, cases_b):
        return Row("qaedit", metric, values={"a": a, "b": b}, cases={"a": cases_a, "b": cases_b})

    rows = [row("reliability", 0.99, 0.5, 100, 100), row("reliability@gen_em", 0.17, 0.2, 99, 100),
            row("reliability@gen_contains", 0.8, 0.3, 99, 100)]
    text = headline_markdown(rows, ["a", "b"], {"model": "toy", "setting_label": "single edits", "n": 100})
    line = next(ln for ln in text.splitlines() if ln.startswith("| QAEdit"))
    assert line.split(" | ")[3] == "99.0 · 17.0 · 80.0[^1]" and line.split(" | ")[4] == "50.0 · 20.0 · 30.0 |"
    assert "[^1]: generated: scored on 99 of the 100 cases" in text
