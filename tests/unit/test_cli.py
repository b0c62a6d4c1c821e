"""The CLI run in-process on tiny random models saved to disk (no network, no real model)."""

from __future__ import annotations

import json

import pytest

from lmedit.cli import main

# enough fine-tuning for the tiny random model to learn a 3-token target (the defaults are tuned for SmolLM2)
FT = ["--set", "steps=30", "--set", "lr=0.02"]


def edit_args(tiny_dir, *extra: str) -> list[str]:
    return ["edit", "--model", str(tiny_dir), "--method", "ft-m", "--prompt", "The mother tongue of {} is",
            "--subject", "Danielle Darrieux", "--target", "English", *FT, *extra]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- listings ------------------------------------------------------------------------------------------
def test_models_lists_aliases_and_architectures(capsys):
    rc, out, _ = run_cli(capsys, "models")
    assert rc == 0
    assert "smollm2-135m" in out and "LlamaForCausalLM" in out and "GPT2LMHeadModel" in out


def test_methods_lists_registered_editors(capsys):
    from lmedit.registry import list_editors

    rc, out, _ = run_cli(capsys, "methods")
    assert rc == 0
    for name in list_editors():
        assert name in out
    assert "ft-m" in out


def test_methods_config_shows_fields_with_defaults(capsys):
    from lmedit.registry import editor_class

    rc, out, _ = run_cli(capsys, "methods", "--config", "ft-m")
    assert rc == 0
    for name, _type, default, _help in editor_class("ft-m").Config.describe_fields():
        assert name in out and repr(default) in out


def test_data_lists_datasets_with_sizes(capsys):
    from lmedit.data import list_datasets

    rc, out, _ = run_cli(capsys, "data")
    assert rc == 0
    for row in list_datasets():
        assert row["name"] in out
    assert "zsre" in out and "counterfact" in out


def test_every_model_flag_defaults_to_the_same_model():
    """`lmedit trace` once required --model while the other subcommands defaulted to SmolLM2 (issue 16)."""
    from lmedit.cli import build_parser
    from lmedit.cli._common import DEFAULT_MODEL

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    with_model = {name: next((a for a in p._actions if "--model" in a.option_strings), None)
                  for name, p in subparsers.items()}
    with_model = {name: action for name, action in with_model.items() if action is not None}
    assert "trace" in with_model and "edit" in with_model
    for name, action in with_model.items():
        assert not action.required and action.default == DEFAULT_MODEL, name


# --- edit ----------------------------------------------------------------------------------------------
def test_edit_json_reports_scores_and_saves_a_loadable_edit(capsys, tiny_dir, tmp_path):
    import lmedit
    from lmedit.edits import Edit

    save = tmp_path / "edit"
    rc, out, _ = run_cli(capsys, *edit_args(tiny_dir, "--paraphrase", "Danielle Darrieux speaks",
                                            "--locality-prompt", "The capital of France is",
                                            "--locality-answer", "Paris", "--json", "--save", str(save)))
    assert rc == 0
    rec = json.loads(out)  # exactly one JSON object on stdout
    assert rec["method"] == "ft-m"
    assert [g["kind"] for g in rec["continuations"]] == ["prompt", "paraphrase", "locality"]
    (metrics,) = rec["metrics"]
    assert metrics["reliability"]["post"] >= 0.99  # FT settings above must make the edit take
    assert 0.0 <= metrics["locality"]["post"] <= 1.0
    assert rec["efficiency"]["compute_seconds"] > 0
    handle = lmedit.load_model(str(tiny_dir))
    before = handle.state_digest()
    edit = Edit.load(save)
    with edit.applied(handle):
        assert handle.state_digest() != before
    assert handle.state_digest() == before


def test_edit_text_output_and_request_file(capsys, tiny_dir, tmp_path):
    reqs = [{"prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
             "paraphrases": ["France has its capital in"], "locality": [{"prompt": "Tokyo is in", "answer": "Japan"}]}]
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps(reqs))
    rc, out, _ = run_cli(capsys, "edit", "--model", str(tiny_dir), "--method", "ft-m", "--request-file", str(path),
                         *FT)
    assert rc == 0
    assert "before:" in out and "after:" in out and "reliability" in out and "generalization" in out


# --- errors: one line on stderr, exit 1 ----------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["edit", "--method", "no-such-method", "--prompt", "A {} b", "--subject", "x", "--target", "y"],
     "unknown editing method"),
    (["edit", "--method", "ft-m", "--set", "no_such_key=1", "--prompt", "A {} b", "--subject", "x",
      "--target", "y"], "no_such_key"),
    (["edit", "--method", "ft-m", "--set", "novalue", "--prompt", "A {} b", "--subject", "x", "--target", "y"],
     "key=value"),
    (["edit", "--method", "ft-m", "--prompt", "A b", "--subject", "x", "--target", "y"], "does not occur"),
    (["edit", "--method", "ft-m", "--subject", "x"], "missing --prompt"),
    (["edit", "--method", "ft-m", "--editor-checkpoint", "somewhere", "--prompt", "A {} b", "--subject", "x",
      "--target", "y"], "checkpoint"),
    (["bench", "--method", "ft-m", "--dataset", "no-such-dataset", "--n", "1"], "no-such-dataset"),
    (["bench", "--method", "ft-m", "--dataset", "zsre", "--n", "2", "--batch-size", "2"], "--setting single"),
    (["methods", "--config", "no-such-method"], "unknown editing method"),
])
def test_bad_input_is_one_clear_line(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_unknown_model_is_one_clear_line(capsys, tmp_path):
    rc, _, err = run_cli(capsys, *["edit", "--model", str(tmp_path / "nowhere"), "--method", "ft-m", "--prompt",
                                   "A {} b", "--subject", "x", "--target", "y"])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "nowhere" in err


# --- bench and demo on the tiny model -----------------------------------------------------------------
def test_bench_writes_results_and_prints_the_table(capsys, tiny_dir, tmp_path):
    out_dir = tmp_path / "run"
    rc, out, _ = run_cli(capsys, "bench", "--model", str(tiny_dir), "--method", "ft-m", "--dataset", "zsre",
                         "--n", "2", "--out", str(out_dir), *FT)
    assert rc == 0
    for name in ("cases.jsonl", "summary.json", "table.md"):
        assert (out_dir / name).exists()
    assert (out_dir / "table.md").read_text().strip().splitlines()[0] in out
    assert len((out_dir / "cases.jsonl").read_text().strip().splitlines()) == 2


def test_bench_runs_mquakes_multi_edit_cases_with_run_options(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))  # the tiny model's statistics stay here
    out_dir = tmp_path / "run"
    rc, out, _ = run_cli(capsys, "bench", "--model", str(tiny_dir), "--method", "memit", "--dataset", "mquake",
                         "--n", "1", "--out", str(out_dir), "--set", "v_num_grad_steps=2", "--set", "mom2_tokens=200",
                         "--row-batch", "2", "--value-cache", str(tmp_path / "values"))
    assert rc == 0 and "| multihop | greedy_exact |" in out
    (line,) = (out_dir / "cases.jsonl").read_text().splitlines()
    case = json.loads(line)
    assert case["info"]["edits"] == 4 and case["efficiency"]["chunk_size"] == 4 and "error" not in case["info"]
    assert len(list((tmp_path / "values").rglob("*.pt"))) == 4, "the 4 requests' values went to --value-cache"


def test_demo_edits_scores_and_restores_the_model(tiny_dir):
    from lmedit.demo import choose_method, run_demo

    assert choose_method() in __import__("lmedit").list_editors()
    steps = []
    rep = run_demo(str(tiny_dir), "ft-m", max_new_tokens=3, on_step=steps.append)
    assert rep.restored and rep.digest_before == rep.digest_after
    assert [c.label for c in rep.continuations] == ["prompt", "paraphrase", "unrelated"]
    metrics = {"reliability", "generalization", "locality"}
    assert set(rep.scores) == metrics | {f"{m}@gen_em" for m in metrics}  # never teacher forcing alone
    assert rep.compute_seconds > 0 and steps
