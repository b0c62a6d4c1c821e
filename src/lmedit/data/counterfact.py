"""CounterFact: EasyEdit's flat split files, and ROME's original ``counterfact.json`` (detected by fields).

EasyEdit record -> case: request(``prompt``, ``subject``, ``target_new``, target_true = ``ground_truth``,
case_id = ``case_id``), paraphrases = (``rephrase_prompt``,), locality = (QA(``locality_prompt``,
``locality_ground_truth``),), neighborhood = (``locality_prompt``,).

ROME record -> case: request(``requested_rewrite.prompt`` (a ``{}`` template), subject, ``target_new.str``,
``target_true.str``), paraphrases = ``paraphrase_prompts``, neighborhood = ``neighborhood_prompts``,
locality = each neighbourhood prompt with ``target_true.str`` (EasyEdit's mapping), generation_prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..types import QA, EditCase, EditRequest
from . import DatasetError, build, read_records, register_dataset, require, select


def _skip(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    new = rec.get("target_new")
    if isinstance(rec.get("requested_rewrite"), dict):
        new = rec["requested_rewrite"].get("target_new", {})
        new = new.get("str") if isinstance(new, dict) else new
    if isinstance(new, str) and not new.strip():
        return "empty target_new"
    return None


def easyedit_case(rec: dict[str, Any], file: Path, index: int) -> EditCase:
    f = {k: require(rec, k, file, index, str) for k in ("prompt", "subject", "target_new", "ground_truth",
                                                    "rephrase_prompt", "locality_prompt", "locality_ground_truth")}
    case_id = rec.get("case_id", index)

    def make() -> EditCase:
        req = EditRequest(prompt=f["prompt"], subject=f["subject"], target_new=f["target_new"],
                          target_true=f["ground_truth"], case_id=case_id)
        return EditCase(request=req, paraphrases=(f["rephrase_prompt"],),
                        locality=(QA(f["locality_prompt"], f["locality_ground_truth"]),),
                        neighborhood=(f["locality_prompt"],), source=f"{file.name}#{index}")

    return build(file, index, make)


def rome_case(rec: dict[str, Any], file: Path, index: int) -> EditCase:
    if not isinstance(rec.get("requested_rewrite"), dict):
        kind = type(rec.get("requested_rewrite")).__name__
        raise DatasetError(f"{file} record {index}: requested_rewrite is a {kind}, not one rewrite; "
                           "multi-edit (MQuAKE) files load with lmedit.data.load_mquake()")
    rw = {k: require(rec, f"requested_rewrite.{k}", file, index, str) for k in ("prompt", "subject")}
    new = require(rec, "requested_rewrite.target_new.str", file, index, str)
    true = require(rec, "requested_rewrite.target_true.str", file, index, str)
    lists = {k: tuple(require(rec, k, file, index, list)) for k in ("paraphrase_prompts", "neighborhood_prompts")}
    gen = tuple(rec.get("generation_prompts", ()))
    case_id = rec.get("case_id", index)

    def make() -> EditCase:
        req = EditRequest(prompt=rw["prompt"], subject=rw["subject"], target_new=new, target_true=true,
                          case_id=case_id)
        neighbors = lists["neighborhood_prompts"]
        return EditCase(request=req, paraphrases=lists["paraphrase_prompts"],
                        locality=tuple(QA(q, true) for q in neighbors), neighborhood=neighbors,
                        generation_prompts=gen, source=f"{file.name}#{index}")

    return build(file, index, make)


def load_counterfact(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    """Either CounterFact format; the format is read from the first record's fields."""
    records = read_records(file)
    rome = bool(records) and isinstance(records[0], dict) and "requested_rewrite" in records[0]
    make = rome_case if rome else easyedit_case
    return [make(rec, file, i) for i, rec in select(records, file, n, offset, _skip)]


@register_dataset("counterfact", "counterfact/easyedit_counterfact-edit.json",
                  description="EasyEdit CounterFact edit split (10,000 counterfactual edits)")
def _counterfact(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_counterfact(file, n, offset)


@register_dataset("counterfact-train", "counterfact/easyedit_counterfact-train.json",
                  description="EasyEdit CounterFact train split (for trained editors)")
def _counterfact_train(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_counterfact(file, n, offset)


@register_dataset("counterfact-rome", "counterfact/counterfact.json",
                  description="ROME's original counterfact.json (21,919 records; not in the shared data)")
def _counterfact_rome(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_counterfact(file, n, offset)
