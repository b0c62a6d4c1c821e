"""Local worker processes give the same table as one process, and a dead worker fails only its own cell.

A 2-cell table (FT-M with its quick settings on ZsRE and CounterFact, 2 cases each) on a tiny random Llama
saved to disk, once in this process and once in 2 spawned worker processes.
"""

from __future__ import annotations

import json

from lmedit.registry import editor_class
from lmedit.table import build_table
from lmedit.table.backends import _dispatch, auto_workers
from lmedit.table.cells import CellCache, CellSpec


def _numbers(out) -> list[tuple]:
    rows = json.loads((out / "table1.json").read_text())["rows"]
    return [(r["dataset"], r["metric"], r["method"], r["value"], r["protocol"], r["n_cases"]) for r in rows]


def test_worker_processes_match_one_process(tmp_path):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    kw = dict(methods="ft-m", datasets=["zsre", "counterfact"], n=2, threads=1, plots=False,
              method_overrides={"ft-m": editor_class("ft-m").quick})

    one = build_table(str(model_dir), out=tmp_path / "one", workers=1, **kw)
    two = build_table(str(model_dir), out=tmp_path / "two", workers=2, **kw)
    assert [c.status for c in two.cells] == ["ok", "ok"], [c.reason for c in two.cells]
    assert _numbers(tmp_path / "two") == _numbers(tmp_path / "one")
    assert [c.key for c in two.cells] == [c.key for c in one.cells]
    assert two.meta["workers"] == 2 and one.meta["workers"] == 1
    assert build_table(str(model_dir), out=tmp_path / "one", **kw).meta["workers"] == 1, "library default: in-process"
    # the workers wrote the shared cell cache: a rerun in this process computes nothing
    again = build_table(str(model_dir), out=tmp_path / "two", workers=1, **kw)
    assert all(c.cached for c in again.cells)


def test_dead_worker_fails_its_cell_only(tmp_path):
    specs = [CellSpec("ft-m", "zsre", n=2), CellSpec("ft-m", "counterfact", n=2), CellSpec("rome", "zsre", n=2)]
    started: list[tuple[int, str]] = []

    def submit(slot, spec):
        started.append((slot, spec.name))
        return spec.name

    def get(name):
        if name == "ft-m/counterfact":
            raise RuntimeError("A process in the process pool was terminated abruptly")
        return {"status": "ok", "reason": ""}, False

    results = _dispatch(specs, 2, submit=submit, wait_any=lambda running, _t: running[:1], get=get,
                        progress=None, cache=CellCache(tmp_path))
    assert [r.spec.name for r in results] == [s.name for s in specs]
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "died" in results[1].reason and "terminated abruptly" in results[1].reason
    assert [s for _, s in started] == ["rome/zsre", "ft-m/zsre", "ft-m/counterfact"], "the longest cell first"
    assert {slot for slot, _ in started} == {0, 1}, "a freed slot takes the next cell"


def test_cell_cost_orders_long_cells_first():
    from lmedit.table.backends import cell_cost

    rome, ike = CellSpec("rome", "zsre", n=100), CellSpec("ike", "zsre", n=100)
    assert cell_cost(rome) > cell_cost(ike) > 0
    assert cell_cost(CellSpec("rome", "mquake", n=25)) == cell_cost(rome), "4 edits per multi-hop case"


def test_auto_workers_one_per_core_at_most_four(monkeypatch):
    import lmedit.table.backends as b

    monkeypatch.setattr(b, "_cuda", lambda: False)
    monkeypatch.setattr(b.os, "cpu_count", lambda: 2)
    assert auto_workers(40) == 2 and auto_workers(1) == 1
    monkeypatch.setattr(b.os, "cpu_count", lambda: 16)
    assert auto_workers(40) == 4
    monkeypatch.setattr(b, "_cuda", lambda: True)
    assert auto_workers(40) == 1
