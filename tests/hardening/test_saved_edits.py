"""Saved edits never run code, and are refused when anything in them was changed (issue 15, defects 1 and 5)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lmedit import get_editor
from lmedit.edit_format import META_FILE, TENSOR_FILE, canonical
from lmedit.edits import Edit, EditFileError, EditMismatchError, WeightDelta
from lmedit.methods.calinet import CaliNet
from lmedit.models.handle import tensor_digest
from lmedit.swaps import ModuleSwap, SwapModule, register_swap_module
from lmedit.types import EditRequest

REQ = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")


def _delta(handle, scale=0.01):
    name = handle.adapter.mlp_out.format(1) + ".weight"
    p = handle.model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    return WeightDelta({name: torch.randn(p.shape, generator=g) * scale}, {name: tensor_digest(p)},
                       meta={"model_fingerprint": handle.fingerprint, "model_name": handle.name})


def _resign(folder):
    """Rewrite edit.json's metadata digest, as someone who edits the file on purpose would."""
    doc = json.loads((folder / META_FILE).read_text())
    doc.pop("sha256")
    doc["sha256"] = hashlib.sha256(canonical(doc)).hexdigest()
    (folder / META_FILE).write_text(json.dumps(doc))


def _edit_json(folder, change):
    doc = json.loads((folder / META_FILE).read_text())
    change(doc)
    (folder / META_FILE).write_text(json.dumps(doc))


# --- defect 1: loading runs no code --------------------------------------------------------------------
def test_issue_exploit_file_does_not_run_code(tmp_path):
    """The edit.json of the issue made the old loader call subprocess.run(["touch", ...])."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / META_FILE).write_text(json.dumps({
        "kind": "module_swap", "meta": {},
        "body": {"modules": {"model.norm": {"class": "lmedit.benchmark:subprocess.run",
                                            "config": {"args": ["touch", str(marker)]}}}}}))
    with pytest.raises(EditFileError, match="older lmedit.*recompute"):
        Edit.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("spec", [
    {"class": "lmedit.benchmark:subprocess.run", "config": {"args": ["touch", "{marker}"]}},
    {"module": "lmedit.benchmark:subprocess.run", "config": {"args": ["touch", "{marker}"]}},
    {"module": "subprocess.run", "config": {"args": ["touch", "{marker}"]}},
    {"module": "os.system", "config": {"command": "touch {marker}"}},
])
def test_current_format_with_valid_digest_still_imports_nothing(tmp_path, spec):
    """Even a file whose digests were recomputed by an attacker only reaches registered module names."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "evil"
    folder.mkdir()
    spec = json.loads(json.dumps(spec).replace("{marker}", str(marker)))
    doc = {"format": 2, "kind": "module_swap", "meta": {"model_fingerprint": "x"},
           "body": {"modules": {"model.norm": spec}}, "tensors": {}}
    doc["sha256"] = hashlib.sha256(canonical(doc)).hexdigest()
    (folder / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(EditFileError, match="not registered|malformed"):
        Edit.load(folder)
    assert not marker.exists()


def test_registered_module_round_trips_and_unregistered_is_refused_at_save(tiny_llama, tmp_path):
    class Unregistered(SwapModule):
        def forward(self, *a, **k):
            return self.base(*a, **k)

    path = tiny_llama.adapter.mlp.format(0)
    swap = ModuleSwap({path: Unregistered()}, meta={"model_fingerprint": tiny_llama.fingerprint})
    with pytest.raises(Exception, match="not a registered swap module.*register_swap_module"):
        swap.save(tmp_path / "u")
    with pytest.raises(ValueError, match="already taken"):
        register_swap_module("calinet.ffn")(Unregistered)


# --- defect 5: integrity -------------------------------------------------------------------------------
def test_changed_tensor_value_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _delta(tiny_llama).save(tmp_path / "e")
    t = load_file(folder / TENSOR_FILE)
    name = next(iter(t))
    t[name][0, 0] += 1.0
    save_file(t, folder / TENSOR_FILE)
    before = tiny_llama.state_digest()
    with pytest.raises(EditFileError, match="sha256 mismatch.*recompute"):
        Edit.load(folder)
    assert tiny_llama.state_digest() == before


def test_missing_model_fingerprint_is_refused(tiny_llama, tmp_path):
    folder = _delta(tiny_llama).save(tmp_path / "e")
    _edit_json(folder, lambda d: d["meta"].pop("model_fingerprint"))
    with pytest.raises(EditFileError, match="changed after it was saved"):
        Edit.load(folder)
    _resign(folder)  # even with a matching digest the model check cannot be switched off
    with pytest.raises(EditFileError, match="no meta.model_fingerprint"):
        Edit.load(folder)


def test_changed_metadata_is_refused(tiny_llama, tmp_path):
    folder = _delta(tiny_llama).save(tmp_path / "e")
    _edit_json(folder, lambda d: d["meta"].update(model_name="other"))
    with pytest.raises(EditFileError, match="digest of edit.json does not match"):
        Edit.load(folder)


@pytest.mark.parametrize("field", ["format", "kind", "meta", "body", "tensors", "sha256"])
def test_missing_top_level_field_is_refused(tiny_llama, tmp_path, field):
    folder = _delta(tiny_llama).save(tmp_path / "e")
    _edit_json(folder, lambda d: d.pop(field))
    with pytest.raises(EditFileError, match=f"older lmedit|'{field}'"):
        Edit.load(folder)


def test_calinet_with_emptied_tensors_is_refused(tiny_llama, tmp_path):
    """The old loader used load_state_dict(strict=False): an edit without its tensors loaded as a no-op."""
    from safetensors.torch import save_file

    edit = get_editor("calinet", **{**CaliNet.quick, "steps": 2}).compute(tiny_llama, [REQ])
    folder = edit.save(tmp_path / "c")
    save_file({"unused": torch.zeros(1)}, folder / TENSOR_FILE)
    with pytest.raises(EditFileError, match="do not match its manifest"):
        Edit.load(folder)
    doc = json.loads((folder / META_FILE).read_text())
    doc["tensors"] = {}
    (folder / TENSOR_FILE).unlink()
    (folder / META_FILE).write_text(json.dumps(doc))
    _resign(folder)  # a consistent-looking file that has no tensors at all
    with pytest.raises(EditFileError, match="do not fit its config"):
        Edit.load(folder)


def test_calinet_config_that_does_not_fit_its_tensors_is_refused(tiny_llama, tmp_path):
    edit = get_editor("calinet", **{**CaliNet.quick, "steps": 2}).compute(tiny_llama, [REQ])
    folder = edit.save(tmp_path / "c")

    def grow(d):
        for spec in d["body"]["modules"].values():
            spec["config"]["width"] = 10**9  # would allocate GBs if built before the shapes are checked
    _edit_json(folder, grow)
    _resign(folder)
    with pytest.raises(EditFileError, match="do not fit its config"):
        Edit.load(folder)


def test_saved_edit_round_trips_and_still_checks_its_model(tiny_llama, tokenizer, tmp_path):
    from conftest import make_handle

    d = _delta(tiny_llama)
    loaded = Edit.load(d.save(tmp_path / "e"))
    before = tiny_llama.state_digest()
    with loaded.applied(tiny_llama):
        assert tiny_llama.state_digest() != before
    assert tiny_llama.state_digest() == before
    other = make_handle("gpt2", tokenizer)
    with pytest.raises(EditMismatchError, match="fingerprint"):
        loaded.apply(other)


def test_save_refuses_a_file_path_and_an_edit_without_fingerprint(tiny_llama, tmp_path):
    d = _delta(tiny_llama)
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="it is a file"):
        d.save(tmp_path / "file")
    d.meta.pop("model_fingerprint")
    with pytest.raises(Exception, match="model_fingerprint"):
        d.save(tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_every_swap_module_in_lmedit_is_registered():
    """Every concrete SwapModule that lmedit's editors install can be saved and loaded by name."""
    from lmedit.registry import list_editors
    from lmedit.swaps import _SWAP_MODULES

    list_editors()

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    concrete = {c for c in subclasses(SwapModule) if c.__module__.startswith("lmedit.")
                and "get_config" in vars(c)}
    assert concrete and concrete <= set(_SWAP_MODULES.values()), concrete - set(_SWAP_MODULES.values())


def test_sequential_resume_refuses_an_altered_saved_chunk(tiny_llama, tmp_path):
    from lmedit.bench import BenchmarkError, run_benchmark
    from lmedit.types import EditCase

    cases = [EditCase(EditRequest(prompt="The capital of {} is", subject=s, target_new="Rome", case_id=i))
             for i, s in enumerate(["France", "Spain"])]
    kw = dict(setting="sequential", batch_size=1, eval_timing="immediate", out_dir=tmp_path)
    run_benchmark(get_editor("ft-m", steps=1), tiny_llama, cases, **kw)
    (tmp_path / "cases.jsonl").write_text("")  # as if it crashed before scoring
    _edit_json(tmp_path / "edits" / "0", lambda d: d["meta"].update(model_name="x"))
    before = tiny_llama.state_digest()
    with pytest.raises(BenchmarkError, match="cannot resume.*changed after it was saved.*new folder"):
        run_benchmark(get_editor("ft-m", steps=1), tiny_llama, cases, resume=True, **kw)
    assert tiny_llama.state_digest() == before and tiny_llama.applied_edits == ()
