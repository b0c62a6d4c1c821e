"""Property-based tests (hypothesis): arbitrary inputs to requests, cases, configs, dataset loaders and saved
edits either work or raise the library's own typed error -- never a stray TypeError/KeyError, never a change
to the model."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmedit.config import ConfigError
from lmedit.data import DatasetError, load_dataset
from lmedit.edit_format import META_FILE, canonical
from lmedit.edits import Edit, EditError, EditFileError, WeightDelta
from lmedit.models.handle import tensor_digest
from lmedit.types import QA, EditCase, EditInputError, EditRequest

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
texts = st.text(alphabet=st.sampled_from("ab {}}{Fr ance?"), max_size=16)


@SETTINGS
@given(prompt=texts | json_scalars, subject=texts | json_scalars, target=texts | json_scalars,
       case_id=json_scalars)
def test_edit_request_builds_or_says_why(prompt, subject, target, case_id):
    try:
        r = EditRequest(prompt, subject, target, case_id=case_id)
    except EditInputError:
        return
    assert r.text.count(r.subject) >= 1 and r.template.format(r.subject) == r.text


@SETTINGS
@given(paraphrases=json_values, locality=json_values | st.lists(st.builds(QA, st.text(max_size=5),
                                                                          st.text(max_size=5)), max_size=2),
       portability=json_values)
def test_edit_case_builds_or_says_why(paraphrases, locality, portability):
    req = EditRequest("The capital of {} is", "France", "Rome")
    try:
        case = EditCase(req, paraphrases=paraphrases, locality=locality, portability=portability)
    except EditInputError:
        return
    assert all(isinstance(p, str) for p in case.paraphrases)
    assert all(isinstance(q, QA) for q in case.locality)


FT_FIELDS = ["lr", "steps", "layers", "weight_decay", "norm_constraint", "batch_size", "early_stop_loss"]


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(FT_FIELDS + ["nonsense"]),
                              json_values | st.sampled_from(["nan", "inf", "-inf", "1e6", "3", "[1, 2]"]),
                              max_size=3))
def test_config_parses_or_says_why(values):
    import math

    from lmedit.registry import editor_class

    cls = editor_class("ft-m").Config
    try:
        cfg = cls.from_dict(values)
    except ConfigError:
        return
    for v in cfg.to_dict().values():
        assert not (isinstance(v, float) and not math.isfinite(v))


ZSRE = {"src": "What is the capital of France?", "subject": "France", "alt": "Rome", "answers": ["Paris"],
        "rephrase": "Which city is the capital of France?", "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare"}


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(sorted(ZSRE)), json_values | st.just("<drop>"), max_size=3),
       wrap=st.sampled_from(["record", "scalar", "list"]))
def test_zsre_loader_on_mutated_records(changes, wrap):
    rec = {k: v for k, v in {**ZSRE, **changes}.items() if v != "<drop>"}
    item = rec if wrap == "record" else (7 if wrap == "scalar" else [rec])
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "zsre.json"
        f.write_text(json.dumps([item, ZSRE]))
        try:
            cases = load_dataset("zsre", path=f, n=2)
        except (DatasetError, EditInputError) as e:
            assert "zsre.json" in str(e)
            return
    assert all(isinstance(c, EditCase) for c in cases)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import make_handle

    h = make_handle("llama")
    name = h.adapter.mlp_out.format(1) + ".weight"
    p = h.model.get_parameter(name)
    edit = WeightDelta({name: torch.randn(p.shape) * 0.01}, {name: tensor_digest(p)},
                       meta={"model_fingerprint": h.fingerprint, "method": "hand",
                             "requests": [{"prompt": "a", "target_new": "b"}]})
    return h, edit.save(tmp_path_factory.mktemp("prop") / "good")


@SETTINGS
@given(data=st.data(), resign=st.booleans())
def test_edit_load_on_mutated_files(saved, data, resign):
    h, good = saved
    doc = json.loads((good / META_FILE).read_text())
    paths = sorted((p for p in _paths(doc) if p), key=repr)
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["replace", "delete"]))
    new = copy.deepcopy(doc)
    parent = new
    for k in path[:-1]:
        parent = parent[k]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    if resign and isinstance(new.get("sha256"), str):
        body = {k: v for k, v in new.items() if k != "sha256"}
        new["sha256"] = hashlib.sha256(canonical(body)).hexdigest()
    before = h.state_digest()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(shutil.copytree(good, Path(d) / "e"))
        (folder / META_FILE).write_text(json.dumps(new))
        try:
            edit = Edit.load(folder)
        except EditFileError:
            assert h.state_digest() == before
            return
        try:  # a mutation that still loads (e.g. a value changed to itself) must apply and revert cleanly
            with edit.applied(h):
                pass
        except EditError:
            pass
    assert h.state_digest() == before and h.applied_edits == ()
