"""Dataset loaders on the real shared data files, their error messages, slicing and file search."""

from __future__ import annotations

import json
import logging

import pytest

from lmedit.data import (
    DatasetError,
    find_data_file,
    get_dataset,
    list_datasets,
    load_dataset,
    load_known,
    load_mquake,
)
from lmedit.data import paths as data_paths
from lmedit.types import EditRequest


def _shared(relative: str):
    try:
        return find_data_file(relative, download=False)
    except FileNotFoundError as e:
        pytest.skip(f"shared benchmark data not available here ({e.args[0].splitlines()[0]}); set LMEDIT_DATA")


def _raw(relative: str) -> list[dict]:
    return json.loads(_shared(relative).read_text())


def test_zsre_mapping_matches_raw_records():
    raw = _raw("zsre/zsre_mend_eval_1000.json")
    cases = load_dataset("zsre", n=5)
    assert len(cases) == 5
    for i, c in enumerate(cases):
        r = raw[i]
        assert c.request.text == r["src"] and c.request.subject == r["subject"]
        assert c.request.target_new == r["alt"] and c.request.target_true == r["answers"][0]
        assert c.paraphrases == (r["rephrase"],)
        assert [(q.prompt, q.answer) for q in c.locality] == [(r["loc"], r["loc_ans"])]
        assert c.locality[0].prompt.startswith("nq question: ")
        assert c.case_id == i and c.source == f"zsre_mend_eval_1000.json#{i}"


def test_zsre_skips_empty_alt_and_slices_after_skipping(caplog):
    raw = _raw("zsre/zsre_mend_eval_1000.json")
    empty = [i for i, r in enumerate(raw) if not r["alt"].strip()]
    assert empty, "the eval file has records with an empty alt"
    first = empty[0]
    with caplog.at_level(logging.INFO, logger="lmedit.data"):
        cases = load_dataset("zsre", n=5, offset=first - 2)
    ids = [c.case_id for c in cases]
    assert first not in ids and ids[:2] == [first - 2, first - 1] and ids[2] == first + 1
    assert f"{first} (empty alt)" in caplog.text
    everything = load_dataset("zsre")
    assert len(everything) == len(raw) - len(empty)
    assert [c.case_id for c in everything[first - 2: first + 3]] == ids


def test_counterfact_mapping_matches_raw_records():
    raw = _raw("counterfact/easyedit_counterfact-edit.json")
    cases = load_dataset("counterfact", n=5, offset=3)
    for c, r in zip(cases, raw[3:8], strict=True):
        assert c.case_id == r["case_id"] and c.request.text == r["prompt"]
        assert c.request.target_new == r["target_new"] and c.request.target_true == r["ground_truth"]
        assert c.paraphrases == (r["rephrase_prompt"],)
        assert c.locality[0].prompt == r["locality_prompt"] and c.locality[0].answer == r["locality_ground_truth"]
        assert c.neighborhood == (r["locality_prompt"],)
    first = _raw("counterfact/easyedit_counterfact-train.json")[0]
    assert load_dataset("counterfact-train", n=5)[0].case_id == first["case_id"]


def test_zsre_train_and_portability():
    assert len(load_dataset("zsre-train", n=5)) == 5
    raw = _raw("portability/zsre_mend_eval_portability_gpt4_800.json")
    cases = load_dataset("zsre-portability", n=5)
    for c, r in zip(cases, raw[:5], strict=True):
        (qa,) = c.portability["one_hop"]
        assert qa.prompt == r["portability"]["New Question"] and qa.answer == r["portability"]["New Answer"]


def test_mquake_and_known():
    _shared("portability/MQuAKE-hard_300.json")
    (case,) = load_mquake(n=1, offset=1)
    raw = _raw("portability/MQuAKE-hard_300.json")[1]
    assert case.case_id == raw["case_id"] and len(case.requests) == len(raw["requested_rewrite"])
    r0 = case.requests[0]
    rewrite = raw["requested_rewrite"][0]
    assert r0.template == rewrite["prompt"] and r0.target_new == rewrite["target_new"]["str"]
    assert case.new_answer == raw["new_answer"] and case.questions == tuple(raw["questions"])
    _shared("misc/known_1000.json")
    facts = load_known(n=5)
    assert len(facts) == 5
    prompt, subject, attribute = facts[0]
    assert subject in prompt and attribute
    assert load_dataset("mquake", n=1, offset=1) == [case], "MQuAKE cases are benchmark cases too"
    with pytest.raises(DatasetError, match="load_known"):
        load_dataset("known")


def test_list_datasets():
    rows = {r["name"]: r for r in list_datasets()}
    assert {"zsre", "zsre-train", "counterfact", "counterfact-train", "zsre-portability", "mquake",
            "known"} <= set(rows)
    if rows["zsre"]["where"] != "missing":
        assert rows["zsre"]["records"] == 1000
    assert rows["counterfact-rome"]["where"] in ("missing",) or rows["counterfact-rome"]["records"]


def test_unknown_dataset_lists_names():
    with pytest.raises(DatasetError, match=r"(?s)unknown dataset 'zsrr'.*Did you mean zsre.*counterfact"):
        get_dataset("zsrr")


def _write(tmp_path, records, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "x",
        "rephrase": "Which university did Watts Humphrey go to?", "alt": "University of Michigan",
        "answers": ["Trinity College"], "loc": "nq question: who?", "loc_ans": "Hugo Weaving", "cond": ""}


def test_missing_field_names_file_index_and_field(tmp_path):
    broken = dict(ZSRE)
    del broken["rephrase"]
    p = _write(tmp_path, [ZSRE, broken])
    with pytest.raises(DatasetError, match=r"d\.json record 1: missing field 'rephrase'"):
        load_dataset("zsre", path=p)
    assert len(load_dataset("zsre", path=p, n=1)) == 1  # records outside the slice are not built


def test_subject_missing_from_prompt_names_file_and_index(tmp_path):
    p = _write(tmp_path, [ZSRE, ZSRE, dict(ZSRE, subject="Nobody")])
    with pytest.raises(DatasetError, match=r"(?s)d\.json record 2:.*'Nobody' does not occur"):
        load_dataset("zsre", path=p)


def test_slicing_semantics(tmp_path):
    recs = [dict(ZSRE, alt=f"A{i}") for i in range(6)]
    recs[1]["alt"] = ""
    p = _write(tmp_path, recs)
    assert [c.case_id for c in load_dataset("zsre", path=p)] == [0, 2, 3, 4, 5]
    assert [c.case_id for c in load_dataset("zsre", path=p, n=2, offset=1)] == [2, 3]
    assert load_dataset("zsre", path=p, n=0) == []
    assert [c.case_id for c in load_dataset("zsre", path=p, offset=4)] == [5]
    with pytest.raises(ValueError, match="offset"):
        load_dataset("zsre", path=p, offset=-1)


def test_rome_counterfact_format_detected(tmp_path):
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                               "target_new": {"str": "English"}, "target_true": {"str": "French"}},
           "paraphrase_prompts": ["a b. Danielle Darrieux spoke", "c. Danielle Darrieux's language is"],
           "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin speaks"],
           "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
    (c,) = load_dataset("counterfact", path=_write(tmp_path, [rec]))
    assert c.case_id == 7 and c.request == EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English",
                                                       "French", 7)
    assert len(c.paraphrases) == 2 and c.neighborhood == tuple(rec["neighborhood_prompts"])
    assert [(q.prompt, q.answer) for q in c.locality] == [(q, "French") for q in rec["neighborhood_prompts"]]
    assert c.generation_prompts == ("Danielle Darrieux's mother tongue is",)
    bad = json.loads(json.dumps(rec))
    del bad["requested_rewrite"]["target_true"]
    with pytest.raises(DatasetError, match="missing field 'requested_rewrite.target_true.str'"):
        load_dataset("counterfact", path=_write(tmp_path, [bad], "bad.json"))


# --- file search ----------------------------------------------------------------------------------------

@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No shared data reachable: empty cwd, no repo root, a private cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_paths, "repo_root", lambda: None)
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LMEDIT_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _put(root, rel):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("[]")
    return root / rel


def test_find_order(isolated, monkeypatch):
    rel = "zsre/zsre_mend_eval_1000.json"
    cache = _put(isolated / "home" / "data", rel)
    assert find_data_file(rel) == cache
    (isolated / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(isolated / "a" / "b")
    repo = isolated / "r" / "repo"
    monkeypatch.setattr(data_paths, "repo_root", lambda: repo)
    beside_repo = _put(isolated / "r" / "shared" / "data", rel)
    assert find_data_file(rel).resolve() == beside_repo.resolve()  # ../shared/data of the checkout
    beside_cwd = _put(isolated / "a" / "shared" / "data", rel)
    assert find_data_file(rel).resolve() == beside_cwd.resolve()  # ../shared/data of the cwd comes first
    env = _put(isolated / "env", rel)
    monkeypatch.setenv("LMEDIT_DATA", str(isolated / "env"))
    assert find_data_file(rel) == env
    explicit = _put(isolated / "explicit", rel)
    assert find_data_file(rel, explicit) == explicit  # an explicit file beats everything
    assert find_data_file(rel, isolated / "explicit") == explicit  # so does a data folder holding it
    assert find_data_file(rel, explicit.parent) == explicit  # or the file's own folder
    with pytest.raises(FileNotFoundError, match="given path"):
        find_data_file(rel, isolated / "nope.json")  # never silently replaced by another copy


def test_not_found_error_names_places_and_fix(isolated, monkeypatch):
    monkeypatch.setenv("LMEDIT_DATA", str(isolated / "mydata"))
    with pytest.raises(FileNotFoundError) as e:
        find_data_file("counterfact/easyedit_counterfact-edit.json")
    msg = str(e.value)
    assert str(isolated / "mydata" / "counterfact" / "easyedit_counterfact-edit.json") in msg
    assert str(isolated / "home" / "data" / "counterfact") in msg
    assert "LMEDIT_DATA" in msg and "path=" in msg and "Not downloading" in msg
    assert e.value.data == {"option": "data"}  # the CLI adds its --data flag (lmedit.cli._hints)


def test_download_only_when_allowed(isolated, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("[]")
        return dest

    monkeypatch.setattr(data_paths, "_download", fake_download)
    rel = "misc/known_1000.json"
    with pytest.raises(FileNotFoundError):
        find_data_file(rel)  # HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("LMEDIT_OFFLINE", "1")
    with pytest.raises(FileNotFoundError):
        find_data_file(rel)
    monkeypatch.delenv("LMEDIT_OFFLINE")
    with pytest.raises(FileNotFoundError):
        find_data_file(rel, download=False)
    assert calls == []
    got = find_data_file(rel)
    assert calls == [data_paths.SOURCES[rel]] and got == isolated / "home" / "data" / rel
    assert find_data_file(rel) == got and len(calls) == 1  # now served from the cache

    def failing(url, dest):
        raise OSError("network unreachable")

    monkeypatch.setattr(data_paths, "_download", failing)
    with pytest.raises(FileNotFoundError, match="(?s)failed: network unreachable.*LMEDIT_DATA"):
        find_data_file("zsre/zsre_mend_train_1k.json")


def test_qaedit_mapping_keys_and_repeated_subjects(tmp_path):
    raw = _raw("qaedit/QAEdit_inter_1k_800.json")
    cases = load_dataset("qaedit")
    assert len(cases) == 800 == len(raw)
    assert len({c.case_id for c in cases}) == 800, "(source, id) is the key"
    first = cases[0]
    assert first.case_id == f"{raw[0]['source']}:{raw[0]['id']}" == "NQ:1104"
    assert first.request.target_new == raw[0]["target"] == "Wilt Chamberlain *"  # kept as upstream has it
    assert first.request.target_true is None and first.paraphrases == (raw[0]["rephrase"],)
    assert [(q.prompt, q.answer) for q in first.locality] == [(raw[0]["locality"][0]["loc"],
                                                               raw[0]["locality"][0]["loc_ans"])]
    assert len(load_dataset("qaedit-loc5", n=1)[0].locality) == 5
    # 'tandoor' occurs inside 'tandoori' first: the whole word is the subject, the prompt text is unchanged
    tandoor = next(c for c, r in zip(cases, raw, strict=True) if r["subject"] == "tandoor")
    assert tandoor.request.text == raw[cases.index(tandoor)]["prompt"]
    assert "'tandoori'" in tandoor.request.template and "a {}." in tandoor.request.template
    assert {c.case_id.split(":")[0] for c in cases} == {"NQ", "TQA", "SQA"}

    dup = [dict(raw[0]), dict(raw[0])]
    (tmp_path / "qa.json").write_text(json.dumps(dup))
    with pytest.raises(DatasetError, match="occurs twice"):
        load_dataset("qaedit", path=tmp_path / "qa.json")
    bad = [{**raw[0], "locality": []}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="record 0: locality"):
        load_dataset("qaedit", path=tmp_path / "bad.json")
