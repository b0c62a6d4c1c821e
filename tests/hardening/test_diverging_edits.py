"""Diverging edits are refused with nothing written (issue 15, defect 4: ``lmedit edit --method ft-m --set
lr=1e6`` exited 0 with ‖ΔW‖/‖W‖ ≈ 3·10⁷ and garbage output)."""

from __future__ import annotations

import pytest

from lmedit import edits, get_editor
from lmedit.bench import run_benchmark
from lmedit.config import ConfigError
from lmedit.edits import EditDivergedError
from lmedit.types import EditCase, EditRequest

DEFAULT = edits.MAX_RELATIVE_UPDATE  # the library's default (tests/conftest.py raises it for tiny models)


@pytest.fixture(autouse=True)
def _library_default_bound(monkeypatch):
    monkeypatch.setattr(edits, "MAX_RELATIVE_UPDATE", DEFAULT)


REQ = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", case_id=0)


def test_ft_with_a_huge_learning_rate_is_refused_and_the_model_is_unchanged(tiny_llama):
    h = tiny_llama
    before = h.state_digest()
    edit = get_editor("ft-m", lr=1e6, steps=3).compute(h, [REQ])
    rel = max(edit.meta["stats"]["relative_norm"].values())
    assert rel > 10 * edits.MAX_RELATIVE_UPDATE
    assert DEFAULT == 100
    with pytest.raises(EditDivergedError, match=r"above max_relative_update = 100 .*its lr"):
        edit.apply(h)
    assert h.state_digest() == before and h.applied_edits == ()
    with pytest.raises(EditDivergedError, match=r"max_relative_update = 5e-09"):
        get_editor("ft-m", lr=1e-2, steps=3).compute(h, [REQ]).apply(h, max_relative_update=5e-9)
    # the bound is configurable per apply (None turns it off), and a normal edit passes the default
    with edit.applied(h, max_relative_update=None):
        assert h.state_digest() != before
    assert h.state_digest() == before
    with get_editor("ft-m", lr=1e-2, steps=3).compute(h, [REQ]).applied(h):
        pass
    assert h.state_digest() == before


def test_bench_records_a_diverged_edit_as_a_failed_case_and_goes_on(tiny_llama):
    h = tiny_llama
    before = h.state_digest()
    res = run_benchmark(get_editor("ft-m", lr=1e6, steps=3), h, [EditCase(REQ)])
    assert "EditDivergedError" in res.results[0].info["error"]
    assert res.summary["n_errors"] == 1 and h.state_digest() == before


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_config_values_fail_validation(value):
    with pytest.raises(ConfigError, match="not a finite number"):
        get_editor("ft-m", lr=value)


def test_cli_refuses_the_diverged_edit(tiny_dir, capsys):
    from lmedit.cli import main

    rc = main(["edit", "--model", str(tiny_dir), "--method", "ft-m", "--prompt", "The capital of {} is",
               "--subject", "France", "--target", "Rome", "--set", "lr=1e6", "--set", "steps=3"])
    err = capsys.readouterr().err
    assert rc == 1 and "max_relative_update" in err and "the model is unchanged" in err
    assert "on the command line: --max-relative-update" in err
