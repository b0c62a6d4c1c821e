"""The bad-input matrix (issue 15, "keep the class out"): every case must raise the named error type with a
message that says what to fix, and leave the model's full state (``state_digest``, applied edits, contexts)
and every file it was given exactly as they were.

Rows tagged ``d6``/``d7`` are the issue's defects 6 (input types) and 7 (stray braces, --save, corrupt JSON,
--offset, empty model folder, offline hub id).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lmedit.config import ConfigError
from lmedit.data import DatasetError, load_dataset, load_mquake
from lmedit.edit_format import META_FILE, TENSOR_FILE, canonical
from lmedit.edits import (
    Edit,
    EditDivergedError,
    EditError,
    EditFileError,
    EditMismatchError,
    EditOrderError,
    PromptContext,
    WeightDelta,
)
from lmedit.models.handle import tensor_digest
from lmedit.models.loading import ModelNotFoundError, load_model
from lmedit.registry import UnknownMethodError, get_editor
from lmedit.swaps import ModuleSwap
from lmedit.types import QA, EditCase, EditInputError, EditRequest

OK = dict(prompt="The capital of {} is", subject="France", target_new="Rome")
ZSRE = {"src": "What is the capital of France?", "subject": "France", "alt": "Rome", "answers": ["Paris"],
        "rephrase": "Which city is the capital of France?", "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare"}
CF = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
      "rephrase_prompt": "France's capital is", "locality_prompt": "The capital of Spain is",
      "locality_ground_truth": "Madrid"}
MQ = {"requested_rewrite": [{"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"},
                             "target_true": {"str": "Paris"}}],
      "questions": ["What is the capital of France?"], "new_answer": "Rome", "answer": "Paris"}


class CLIFailed(Exception):
    """``lmedit ...`` exited non-zero; the message is what it printed on stderr."""


@dataclass
class World:
    handle: Any
    model_dir: Path
    edit_dir: Path  # a valid saved WeightDelta, copied before each mutation


@dataclass
class Bad:
    id: str
    error: type[BaseException] | tuple[type[BaseException], ...]
    match: str
    run: Callable[[World, Path], Any]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir):
    from conftest import make_handle

    h = make_handle("llama")
    name = h.adapter.mlp_out.format(1) + ".weight"
    p = h.model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    edit = WeightDelta({name: torch.randn(p.shape, generator=g) * 0.01}, {name: tensor_digest(p)},
                       meta={"model_fingerprint": h.fingerprint, "model_name": h.name, "method": "hand"})
    folder = edit.save(tmp_path_factory.mktemp("edits") / "good")
    return World(h, Path(tiny_dir), folder)


def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def cli(*argv: str) -> None:
    from lmedit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse
            rc = e.code
    if rc:
        raise CLIFailed(err.getvalue())


# --- helpers that build the bad inputs -------------------------------------------------------------------
def _copy_edit(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.edit_dir, tmp / "edit"))


def _mutated(change: Callable[[dict], Any], resign: bool = True) -> Callable[[World, Path], Any]:
    """A case that loads a copy of the good edit whose edit.json ``change`` altered (digest recomputed)."""
    def run(w: World, tmp: Path) -> Any:
        folder = _copy_edit(w, tmp)
        doc = json.loads((folder / META_FILE).read_text())
        change(doc)
        if resign and isinstance(doc, dict) and "sha256" in doc:
            doc.pop("sha256")
            doc["sha256"] = hashlib.sha256(canonical(doc)).hexdigest()
        (folder / META_FILE).write_text(json.dumps(doc))
        return _load_frozen(folder)
    return run


def _load_frozen(folder: Path) -> Any:
    """Edit.load, with the folder checked to be unchanged by the attempt."""
    before = _snapshot(folder)
    try:
        return Edit.load(folder)
    finally:
        assert _snapshot(folder) == before


def _tensor_change(act: Callable[[Path], Any]) -> Callable[[World, Path], Any]:
    def run(w: World, tmp: Path) -> Any:
        folder = _copy_edit(w, tmp)
        act(folder)
        return _load_frozen(folder)
    return run


def _bump(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(folder / TENSOR_FILE)
    k = next(iter(t))
    t[k].view(-1)[0] += 1e-3
    save_file(t, folder / TENSOR_FILE)


def _data(records: Any, name: str = "data.json", raw: str | None = None) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        f = tmp / name
        f.write_text(raw if raw is not None else json.dumps(records))
        return f
    return write


def _load(dataset: str, records: Any = None, raw: str | None = None, **kw: Any) -> Callable[[World, Path], Any]:
    def run(w: World, tmp: Path) -> Any:
        f = _data(records, raw=raw)(tmp)
        if dataset == "mquake":
            return load_mquake(path=f, **kw)
        return load_dataset(dataset, path=f, **kw)
    return run


def _zsre(**change: Any) -> list[dict]:
    rec = {**ZSRE, **change}
    return [{k: v for k, v in rec.items() if v is not _DROP}]


_DROP = object()


def _delta(w: World, scale: float = 0.01, shape: tuple | None = None, name: str | None = None,
           fp: str | None = None) -> WeightDelta:
    pname = w.handle.adapter.mlp_out.format(0) + ".weight"
    p = w.handle.model.get_parameter(pname)
    t = torch.randn(shape or p.shape) * float(p.detach().norm()) / p.numel() ** 0.5 * scale
    return WeightDelta({name or pname: t}, meta={"model_fingerprint": fp or w.handle.fingerprint})


def _out_of_order(w: World, tmp: Path) -> None:
    a, b = _delta(w).apply(w.handle), _delta(w).apply(w.handle, strict=False)
    try:
        a.revert(w.handle)
    finally:
        b.revert(w.handle)
        a.revert(w.handle)


def _twice(w: World, tmp: Path) -> None:
    d = _delta(w).apply(w.handle)
    try:
        d.apply(w.handle)
    finally:
        d.revert(w.handle)


def _req_file(items: Any) -> Callable[[World, Path], Any]:
    def run(w: World, tmp: Path) -> Any:
        f = tmp / "reqs.json"
        f.write_text(json.dumps(items))
        return cli("edit", "--model", str(tmp / "never-loaded"), "--method", "ft-m", "--request-file", str(f))
    return run


def _existing_save(w: World, tmp: Path) -> None:
    (tmp / "taken").write_text("mine")
    cli("edit", "--model", str(tmp / "never-loaded"), "--method", "ft-m", *_cli_req(), "--save", str(tmp / "taken"))


def _cli_req() -> list[str]:
    return ["--prompt", "The capital of {} is", "--subject", "France", "--target", "Rome"]


def _bench_past_end(w: World, tmp: Path) -> None:
    f = _data(_zsre())(tmp)
    cli("bench", "--model", str(tmp / "never-loaded"), "--method", "ft-m", "--dataset", "zsre", "--data", str(f),
        "--n", "1", "--offset", "5", "--out", str(tmp / "run"))


def _swap_missing_path(w: World, tmp: Path) -> None:
    from lmedit.methods.calinet import CalibratedFFN

    ModuleSwap({"model.layers.99.mlp": CalibratedFFN(32, 4, "silu", True)},
               meta={"model_fingerprint": w.handle.fingerprint}).apply(w.handle)


CASES: list[Bad] = [
    # --- EditRequest ------------------------------------------------------------------------------------
    Bad("request-prompt-none", EditInputError, "prompt must be a string", lambda w, t: EditRequest(None, "F", "R")),
    Bad("request-subject-int", EditInputError, "subject must be a string", lambda w, t: EditRequest("a {}", 5, "R")),
    Bad("request-target-none", EditInputError, "target_new must be a string",
        lambda w, t: EditRequest("a {}", "F", None)),
    Bad("request-subject-blank", EditInputError, "subject is empty", lambda w, t: EditRequest("a {}", "  ", "R")),
    Bad("request-target-blank", EditInputError, "target_new is empty", lambda w, t: EditRequest("a {}", "F", " ")),
    Bad("request-subject-absent", EditInputError, "does not occur in prompt.*'\\{\\}'",
        lambda w, t: EditRequest("The capital is", "France", "Rome")),
    Bad("request-subject-twice", EditInputError, "occurs 2 times",
        lambda w, t: EditRequest("France or France is", "France", "Rome")),
    Bad("request-two-slots", EditInputError, "2 '\\{\\}' slots; use exactly one",
        lambda w, t: EditRequest("{} and {} are", "France", "Rome")),
    Bad("d7-template-named-brace", EditInputError, "braces other than.*'\\{\\{'",
        lambda w, t: EditRequest("The {name} of {} is", "France", "Rome")),
    Bad("d7-template-index-brace", EditInputError, "braces other than",
        lambda w, t: EditRequest("The {0} of {} is", "France", "Rome")),
    Bad("d7-template-lone-close", EditInputError, "braces other than",
        lambda w, t: EditRequest("The } of {} is", "France", "Rome")),
    Bad("request-case-id-list", EditInputError, "case_id must be",
        lambda w, t: EditRequest(**OK, case_id=[1])),
    Bad("request-target-true-int", EditInputError, "target_true must be a string",
        lambda w, t: EditRequest(**OK, target_true=3)),
    Bad("request-from-dict-unknown", EditInputError, "unknown request field.*'tgt'",
        lambda w, t: EditRequest.from_dict({**OK, "tgt": "x"})),
    Bad("request-from-dict-missing", EditInputError, "missing field.*'target_new'",
        lambda w, t: EditRequest.from_dict({"prompt": "a {}", "subject": "F"})),
    # --- EditCase / QA (defect 6) -------------------------------------------------------------------------
    Bad("d6-paraphrases-string", EditInputError, "single string.*wrap it in a list",
        lambda w, t: EditCase(EditRequest(**OK), paraphrases="a string")),
    Bad("d6-paraphrase-number", EditInputError, r"paraphrases\[1\] must be a string",
        lambda w, t: EditCase(EditRequest(**OK), paraphrases=["ok", 3])),
    Bad("d6-qa-answer-none", EditInputError, "QA.answer.*must be a string, got NoneType",
        lambda w, t: QA("Who wrote Hamlet?", None)),
    Bad("d6-qa-prompt-number", EditInputError, "QA.prompt must be a string", lambda w, t: QA(7, "x")),
    Bad("d6-locality-tuples", EditInputError, r"locality\[0\] must be a QA",
        lambda w, t: EditCase(EditRequest(**OK), locality=[("q", "a")])),
    Bad("d6-case-request-str", EditInputError, "must be an EditRequest",
        lambda w, t: EditCase("The capital of France is")),
    Bad("d6-portability-str", EditInputError, "portability",
        lambda w, t: EditCase(EditRequest(**OK), portability={"one_hop": "x"})),
    Bad("d6-neighborhood-string", EditInputError, "neighborhood must be a list of strings",
        lambda w, t: EditCase(EditRequest(**OK), neighborhood="abc")),
    # --- configs ----------------------------------------------------------------------------------------
    Bad("config-lr-nan", ConfigError, "FTConfig.lr.*not a finite number", lambda w, t: get_editor("ft-m", lr="nan")),
    Bad("config-lr-inf", ConfigError, "not a finite number", lambda w, t: get_editor("ft-m", lr=float("inf"))),
    Bad("config-lr-minus-inf", ConfigError, "not a finite number", lambda w, t: get_editor("rome", v_lr="-inf")),
    Bad("config-lr-text", ConfigError, "lr: expected a number", lambda w, t: get_editor("ft-m", lr="fast")),
    Bad("config-steps-fraction", ConfigError, "steps: expected an integer", lambda w, t: get_editor("ft-m", steps=1.5)),
    Bad("config-steps-bool", ConfigError, "steps: expected an integer", lambda w, t: get_editor("ft-m", steps=True)),
    Bad("config-unknown-key", ConfigError, "unknown FTConfig key.*known keys",
        lambda w, t: get_editor("ft-m", learning_rate=1)),
    Bad("config-layers-string", ConfigError, "layers.*expected a list", lambda w, t: get_editor("ft-m", layers="3")),
    Bad("config-calinet-width", ConfigError, "width and steps must be", lambda w, t: get_editor("calinet", width=0)),
    Bad("config-ft-zero-lr", ConfigError, "lr", lambda w, t: get_editor("ft-m", lr=0)),
    Bad("method-unknown", UnknownMethodError, "unknown editing method 'rom'.*Did you mean",
        lambda w, t: get_editor("rom")),
    # --- editors and applying edits ---------------------------------------------------------------------
    Bad("compute-no-requests", EditInputError, "no requests given",
        lambda w, t: get_editor("ft-m").compute(w.handle, [])),
    Bad("compute-string-request", EditInputError, "expected EditRequest objects",
        lambda w, t: get_editor("ft-m").compute(w.handle, ["The capital of France is Rome"])),
    Bad("compute-rome-batch", EditInputError, "one request at a time",
        lambda w, t: get_editor("rome").compute(w.handle, [EditRequest(**OK), EditRequest(**OK)])),
    Bad("compute-layer-out-of-range", ValueError, "out of range",
        lambda w, t: get_editor("ft-m", layers=[99]).compute(w.handle, [EditRequest(**OK)])),
    Bad("apply-nan", EditError, "NaN/inf",
        lambda w, t: _delta(w, scale=float("nan")).apply(w.handle)),
    Bad("apply-wrong-shape", EditMismatchError, r"has shape \(3, 3\)",
        lambda w, t: _delta(w, shape=(3, 3)).apply(w.handle)),
    Bad("apply-unknown-parameter", EditMismatchError, "parameter 'no.such.weight'.*does not have",
        lambda w, t: _delta(w, name="no.such.weight").apply(w.handle)),
    Bad("d4-apply-diverged", EditDivergedError, "above max_relative_update = .*Lower the method's step size",
        lambda w, t: _delta(w, scale=1e12).apply(w.handle)),
    Bad("d4-bound-not-positive", ValueError, "max_relative_update must be a positive number",
        lambda w, t: _delta(w).apply(w.handle, max_relative_update=-1)),
    Bad("apply-other-model", EditMismatchError, "fingerprint.*recompute",
        lambda w, t: _delta(w, fp="0123456789abcdef").apply(w.handle)),
    Bad("apply-twice", EditError, "already applied", _twice),
    Bad("revert-not-applied", EditError, "not applied", lambda w, t: _delta(w).revert(w.handle)),
    Bad("d2-revert-out-of-order", EditOrderError, "revert them first", _out_of_order),
    Bad("swap-missing-module", EditMismatchError, "model.layers.99.mlp.*does not have", _swap_missing_path),
    Bad("context-other-model", EditMismatchError, "fingerprint",
        lambda w, t: PromptContext("x", meta={"model_fingerprint": "ffff"}).apply(w.handle)),
    # --- saved edits (defects 1, 5, 7) ------------------------------------------------------------------
    Bad("d1-old-format-exploit", EditFileError, "older lmedit.*recompute",
        _mutated(lambda d: d.clear() or d.update(kind="module_swap", meta={}, body={"modules": {"model.norm": {
            "class": "lmedit.benchmark:subprocess.run", "config": {"args": ["false"]}}}}))),
    Bad("d1-unregistered-module", EditFileError, "not registered",
        _mutated(lambda d: d.update(kind="module_swap", body={"modules": {"model.norm": {
            "module": "subprocess.run", "config": {"args": ["false"]}}}}, tensors={}))),
    Bad("d1-class-path-field", EditFileError, "malformed",
        _mutated(lambda d: d.update(kind="module_swap", body={"modules": {"model.norm": {
            "class": "lmedit.methods.calinet:CalibratedFFN", "config": {}}}}, tensors={}))),
    Bad("d5-metadata-changed", EditFileError, "changed after it was saved",
        _mutated(lambda d: d["meta"].update(model_name="x"), resign=False)),
    Bad("d5-digest-removed", EditFileError, "'sha256'", _mutated(lambda d: d.pop("sha256"), resign=False)),
    Bad("d5-fingerprint-removed", EditFileError, "no meta.model_fingerprint",
        _mutated(lambda d: d["meta"].pop("model_fingerprint"))),
    Bad("d5-fingerprint-empty", EditFileError, "no meta.model_fingerprint",
        _mutated(lambda d: d["meta"].update(model_fingerprint=""))),
    Bad("d5-tensor-value-changed", EditFileError, "sha256 mismatch", _tensor_change(_bump)),
    Bad("d5-tensor-file-missing", EditFileError, "lacks tensors.safetensors",
        _tensor_change(lambda f: (f / TENSOR_FILE).unlink())),
    Bad("d5-tensor-file-truncated", EditFileError, "does not load",
        _tensor_change(lambda f: (f / TENSOR_FILE).write_bytes((f / TENSOR_FILE).read_bytes()[:50]))),
    Bad("d5-manifest-shape", EditFileError, "differs from what was saved",
        _mutated(lambda d: next(iter(d["tensors"].values())).update(shape=[1, 1]))),
    Bad("d5-format-3", EditFileError, "format 3", _mutated(lambda d: d.update(format=3))),
    Bad("d7-unknown-kind", EditFileError, "unknown kind 'magic'", _mutated(lambda d: d.update(kind="magic"))),
    Bad("d7-layout-unknown", EditFileError, "malformed.*layout 'sparse'",
        _mutated(lambda d: d["body"]["layout"].update({k: "sparse" for k in d["body"]["layout"]}))),
    Bad("d7-layout-missing", EditFileError, "body.layout", _mutated(lambda d: d["body"].pop("layout"))),
    Bad("d7-json-list", EditFileError, "not a JSON object", _mutated(lambda d: None, resign=False)
        if False else _tensor_change(lambda f: (f / META_FILE).write_text("[1, 2]"))),
    Bad("d7-json-garbage", EditFileError, "does not parse",
        _tensor_change(lambda f: (f / META_FILE).write_bytes(b"\xff\xfe{"))),
    Bad("d7-body-not-dict", EditFileError, "'body'.*not a dict", _mutated(lambda d: d.update(body=[1]))),
    Bad("edit-folder-missing", FileNotFoundError, "not a saved edit", lambda w, t: Edit.load(t / "nothing")),
    Bad("save-onto-file", EditError, "it is a file",
        lambda w, t: (t / "f").write_text("x") and _delta(w).save(t / "f")),
    # --- models ---------------------------------------------------------------------------------------
    Bad("d7-model-empty-dir", ModelNotFoundError, "has no config.json",
        lambda w, t: (t / "empty").mkdir() or load_model(str(t / "empty"))),
    Bad("model-is-a-file", ModelNotFoundError, "is a file",
        lambda w, t: (t / "m.bin").write_text("x") and load_model(str(t / "m.bin"))),
    Bad("d7-model-offline-hub-id", ModelNotFoundError, "HF_HUB_OFFLINE",
        lambda w, t: load_model("no-such-org/no-such-model")),
    Bad("model-bad-dtype", ValueError, "unknown dtype 'float8'",
        lambda w, t: load_model(str(w.model_dir), dtype="float8")),
    # --- datasets (defect 6) ----------------------------------------------------------------------------
    Bad("d6-zsre-null-field", DatasetError, r"data.json record 0: field 'loc_ans' is null, expected a str",
        _load("zsre", _zsre(loc_ans=None))),
    Bad("d6-zsre-number-field", DatasetError, r"record 0: field 'src' is a int",
        _load("zsre", _zsre(src=42))),
    Bad("d6-zsre-answers-null", DatasetError, r"record 0: field 'answers' is null",
        _load("zsre", _zsre(answers=None))),
    Bad("zsre-missing-field", DatasetError, r"record 0: missing field 'alt'", _load("zsre", _zsre(alt=_DROP))),
    Bad("zsre-subject-absent", DatasetError, r"record 0: subject 'Spain' does not occur",
        _load("zsre", _zsre(subject="Spain"))),
    Bad("data-not-json", DatasetError, "neither a JSON array nor JSON lines", _load("zsre", raw="{oops")),
    Bad("data-json-object", DatasetError, "holds a JSON dict", _load("zsre", {"a": 1})),
    Bad("d7-offset-past-end", DatasetError, "no valid records from offset 5", _load("zsre", _zsre(), offset=5)),
    Bad("data-negative-n", ValueError, "n must be a non-negative integer", _load("zsre", _zsre(), n=-1)),
    Bad("data-unknown", DatasetError, "unknown dataset 'zsr'", lambda w, t: load_dataset("zsr")),
    Bad("d6-counterfact-list-field", DatasetError, r"field 'rephrase_prompt' is a list",
        _load("counterfact", [{**CF, "rephrase_prompt": ["a", "b"]}])),
    Bad("d6-mquake-questions-string", DatasetError, r"field 'questions' is a str",
        _load("mquake", [{**MQ, "questions": "What is the capital of France?"}])),
    # --- CLI (each fails before any model is loaded: --model names a folder that does not exist) -----------
    Bad("d4-cli-lr-nan", CLIFailed, "FTConfig.lr: 'nan' is not a finite number",
        lambda w, t: cli("edit", "--model", str(t / "never-loaded"), "--method", "ft-m", *_cli_req(),
                         "--set", "lr=nan")),
    Bad("d7-cli-save-exists", CLIFailed, "--save .* already exists.*nothing was computed", _existing_save),
    Bad("cli-edit-missing-target", CLIFailed, "missing --target",
        lambda w, t: cli("edit", "--model", str(t / "x"), "--method", "ft-m", "--prompt", "a {}", "--subject", "a")),
    Bad("d6-cli-request-paraphrases-string", CLIFailed, "request 0.*single string",
        _req_file([{**OK, "paraphrases": "Where is France's capital?"}])),
    Bad("d6-cli-request-locality-shape", CLIFailed, "locality must be a list of",
        _req_file([{**OK, "locality": ["q"]}])),
    Bad("d7-cli-bench-offset-past-end", CLIFailed, "no valid records from offset 5", _bench_past_end),
    Bad("cli-bench-n-zero", CLIFailed, "--n and --batch-size must be at least 1",
        lambda w, t: cli("bench", "--method", "ft-m", "--dataset", "zsre", "--n", "0")),
    Bad("d4-cli-bound-negative", CLIFailed, "--max-relative-update must be a finite number",
        lambda w, t: cli("edit", "--model", str(t / "x"), "--method", "ft-m", *_cli_req(),
                         "--max-relative-update", "-1")),
    Bad("cli-unknown-method", CLIFailed, "unknown editing method 'nope'",
        lambda w, t: cli("edit", "--model", str(t / "x"), "--method", "nope", *_cli_req())),
    Bad("cli-bad-set-syntax", CLIFailed, "lr",
        lambda w, t: cli("edit", "--model", str(t / "x"), "--method", "ft-m", *_cli_req(), "--set", "lr")),
]


def test_matrix_is_large_and_ids_are_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(bad, world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    h = world.handle
    before = (h.state_digest(), h.applied_edits, list(h.contexts))
    watched = _snapshot(world.model_dir, world.edit_dir)
    with pytest.raises(bad.error, match=bad.match) as info:
        bad.run(world, tmp_path)
    assert "Traceback" not in str(info.value)
    assert (h.state_digest(), h.applied_edits, list(h.contexts)) == before
    assert _snapshot(world.model_dir, world.edit_dir) == watched
