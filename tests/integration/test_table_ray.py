"""The Ray backend gives the same table as the local one (same seeds, same threads per process).

A 2-cell table (FT-M with its quick settings on ZsRE and CounterFact, 2 cases each) on a tiny random Llama
saved to disk, once locally and once on a local Ray cluster of 2 workers.
"""

from __future__ import annotations

import json

import pytest

try:
    import ray  # noqa: F401
except ImportError:
    pytest.skip("the Ray backend test needs ray (pip install ray); it is an optional extra",
                allow_module_level=True)

from lmedit.registry import editor_class
from lmedit.table import build_table


def _numbers(out) -> list[tuple]:
    rows = json.loads((out / "table1.json").read_text())["rows"]
    return [(r["dataset"], r["metric"], r["method"], r["value"], r["protocol"], r["n_cases"]) for r in rows]


class Recorder:
    inner_bars = False

    def __init__(self) -> None:
        self.events: list[str] = []

    def cell_started(self, spec, n_cases) -> None:
        self.events.append(f"start {spec.name}")

    def cell_done(self, result) -> None:
        self.events.append(f"done {result.spec.name}")

    def status(self, text) -> None:
        self.events.append(f"status {text}")


def test_ray_matches_local(tmp_path):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    kw = dict(methods="ft-m", datasets=["zsre", "counterfact"], n=2, threads=1, plots=False,
              method_overrides={"ft-m": editor_class("ft-m").quick})

    local = build_table(str(model_dir), out=tmp_path / "local", backend="local", **kw)
    rec = Recorder()
    remote = build_table(str(model_dir), out=tmp_path / "ray", backend="ray", workers=2, progress=rec, **kw)
    assert sorted(e for e in rec.events if e.startswith(("start", "done"))) == [
        "done ft-m/counterfact", "done ft-m/zsre", "start ft-m/counterfact", "start ft-m/zsre"]

    assert [c.status for c in remote.cells] == ["ok", "ok"], [c.reason for c in remote.cells]
    assert _numbers(tmp_path / "ray") == _numbers(tmp_path / "local")
    for a, b in zip(local.cells, remote.cells, strict=True):
        assert a.spec == b.spec
        assert json.dumps(a.to_dict()["post"], sort_keys=True) == json.dumps(b.to_dict()["post"], sort_keys=True)
        assert a.key == b.key, "same model fingerprint, config hash and data slice in both backends"
    # the Ray run wrote its cells to its own cache: a local rerun there computes nothing
    again = build_table(str(model_dir), out=tmp_path / "ray", backend="local", **kw)
    assert all(c.cached for c in again.cells)
