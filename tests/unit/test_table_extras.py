"""lmedit table with an LLM judge (against the local stub server of test_gen_runs) and capability drift."""

from __future__ import annotations

import json
import logging

import pytest
from test_gen_runs import _Stub, stub  # noqa: F401 (the judge stub server fixture)
from test_table import TOY, ToyEditor, model_dir, toy  # noqa: F401 (fixtures)

from lmedit.metrics.drift import DriftSettings
from lmedit.metrics.judge import Judge
from lmedit.table import build_table

DRIFT = DriftSettings(tokens=200, window=64, prompts=("The capital of", "Tokyo is"), max_new_tokens=8)


def _table(model_dir, out, **kw):  # noqa: F811 (the fixture's value)
    kw.setdefault("methods", TOY)
    kw.setdefault("datasets", ["zsre"])
    kw.setdefault("n", 2)
    return build_table(model_dir, out=out, threads=1, plots=False, **kw)


def test_judge_rows_and_a_cached_table_judged_without_recomputing(toy, model_dir, stub, tmp_path):  # noqa: F811
    plain = _table(model_dir, tmp_path)
    key = json.loads((tmp_path / "cells" / f"{TOY}__zsre" / "key.json").read_text())
    assert not any(r.metric.endswith("@gen_judge") for r in plain.rows)
    calls = ToyEditor.calls

    t = _table(model_dir, tmp_path, judge=Judge(stub, cache=tmp_path / "judge_cache.jsonl"))
    assert ToyEditor.calls == calls, "the judge grades the kept answers: no edit is computed again"
    assert t.cells[0].cached
    judged = [r for r in t.rows if r.metric.endswith("@gen_judge")]
    assert {r.metric for r in judged} >= {"reliability@gen_judge", "generalization@gen_judge"}
    assert all(r.protocol == "gen_judge" and r.values[TOY] is not None for r in judged)
    assert len(_Stub.seen) > 0 and t.meta["judge"]["graded_cells"] == [f"{TOY}/zsre"]
    assert "| Reliability | gen_judge |" in t.markdown
    doc = json.loads((tmp_path / "table1.json").read_text())
    assert {r["protocol"] for r in doc["rows"] if r["metric"].endswith("@gen_judge")} == {"gen_judge"}
    assert "gen_judge" in (tmp_path / "table1.csv").read_text()
    # the other rows are the same numbers as before the judge (never averaged with it)
    before = {r.metric: r.values[TOY] for r in plain.rows}
    assert all(before[r.metric] == r.values[TOY] for r in t.rows if r.metric in before)
    assert json.loads((tmp_path / "cells" / f"{TOY}__zsre" / "key.json").read_text()) == key

    asked = len(_Stub.seen)
    again = _table(model_dir, tmp_path, judge=Judge(stub, cache=tmp_path / "judge_cache.jsonl"))
    assert len(_Stub.seen) == asked and again.meta["judge"]["graded_cells"] == [], "graded once"
    assert any(r.metric == "reliability@gen_judge" for r in again.rows)
    off = _table(model_dir, tmp_path)  # the judge off: the stored grades stay in the cell, the key the same
    assert off.cells[0].cached and any(r.metric == "reliability@gen_judge" for r in off.rows)


def test_a_judge_that_is_down_warns_and_the_table_is_written(toy, model_dir, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING):
        t = _table(model_dir, tmp_path, judge=Judge("http://127.0.0.1:9/v1", timeout=2))
    assert "unreachable" in caplog.text and t.meta["judge"]["down"]
    assert not any(r.metric.endswith("@gen_judge") for r in t.rows)
    assert any(r.metric == "reliability@gen_em" and r.values[TOY] is not None for r in t.rows)
    assert (tmp_path / "table1.md").exists() and "judge" not in t.cells[0].info, "a later table tries again"


def test_drift_row_in_a_sequential_table_not_in_a_single_one(toy, model_dir, tmp_path):  # noqa: F811
    seq = _table(model_dir, tmp_path / "q", setting="sequential", edits=2, drift=DRIFT)
    drift_rows = [r for r in seq.rows if r.metric == "perplexity_drift"]
    assert len(drift_rows) == 1 and drift_rows[0].protocol == "perplexity_ratio"
    info = seq.cells[0].info["drift"]
    assert info["perplexity_ratio"] == pytest.approx(info["perplexity_after"] / info["perplexity_before"])
    assert info["tokens"] == 200 and info["sequences"] == 1
    assert drift_rows[0].values[TOY] == info["perplexity_ratio"]
    assert "Perplexity drift (ratio edited / unedited)" in seq.markdown
    assert f"{info['perplexity_ratio']:.3f}" in seq.markdown and "200 WikiText-2 tokens" in seq.markdown
    doc = json.loads((tmp_path / "q" / "table1.json").read_text())
    assert doc["drift"][f"{TOY}/zsre"]["perplexity_ratio"] == info["perplexity_ratio"]
    assert any(r["metric"] == "perplexity_drift" for r in doc["rows"])

    single = _table(model_dir, tmp_path / "s", drift=DRIFT)
    assert not any(r.metric == "perplexity_drift" for r in single.rows)
    assert "drift" not in json.loads((tmp_path / "s" / "table1.json").read_text())


def test_cli_judge_down_warns_and_drift_flag_checked(toy, model_dir, tmp_path, capsys):  # noqa: F811
    from lmedit.cli import main

    out = tmp_path / "t"
    args = ["-q", "table", "--model", model_dir, "--methods", TOY, "--datasets", "zsre", "--n", "2", "--out", str(out),
            "--workers", "1", "--no-plots"]
    assert main([*args, "--drift-tokens", "-1"]) == 1
    assert "--drift-tokens" in capsys.readouterr().err
    assert main([*args, "--judge", "http://127.0.0.1:9/v1"]) == 0
    captured = capsys.readouterr()
    assert "warning: the LLM judge was unreachable" in captured.err and "| Reliability |" in captured.out
    assert (out / "table1.md").exists()
