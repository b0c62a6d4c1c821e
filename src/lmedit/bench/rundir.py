"""The run directory of a benchmark: what a run is (``run.json``), its finished cases (``cases.jsonl``,
flushed case by case), the applied edits of a sequential run (``edits/<chunk>/``), resume and extension of an
interrupted or shorter run, and cases lent by earlier runs of the same method, config and model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digests import case_digest
from ..edits import Edit, EditFileError
from ..io import atomic_write
from ..metrics import coverage
from ..metrics.evaluate import ALL_PROTOCOLS
from ..metrics.gen_protocol import GEN
from ..metrics.generate import GenSettings
from ..metrics.records import CaseResult
from ..training.checkpoint import state_id
from ..types import EditCase

if TYPE_CHECKING:
    from ..models.handle import ModelHandle
    from .run import _Run

log = logging.getLogger(__name__)


class BenchmarkError(RuntimeError):
    """The run cannot go on as asked (a resume that does not match, a model that was not restored)."""


CASES_FILE, SUMMARY_FILE, TABLE_FILE = "cases.jsonl", "summary.json", "table.md"
RUN_FILE, EDITS_DIR = "run.json", "edits"
NEWER_FIELDS = ("case_digests", "checkpoint_state", "generation")  # run.json fields that older runs on disk do not have
# run.json fields compared through another: the resolved config through config_hash, which leaves out
# locations such as a checkpoint's path (checkpoint_state identifies the checkpoint by content)
BY_HASH = ("config",)


def case_keys(cases: Sequence[EditCase]) -> list[Any]:
    """Each case's key in a run: its case_id, or its position when it has none."""
    return [c.case_id if c.case_id is not None else i for i, c in enumerate(cases)]


def run_header(editor: Any, handle: ModelHandle, cases: Sequence[EditCase], *, setting: str = "single",
               batch_size: int = 1, eval_timing: str = "final", protocols: Sequence[str] = ALL_PROTOCOLS,
               generation: GenSettings | None = None) -> dict[str, Any]:
    """What a run is (``run.json``): method, resolved config, model, setting and case ids; resume checks it."""
    cfg = editor.config_for(handle)
    keys = case_keys(cases)
    return {"method": editor.name or type(editor).__name__, "config": cfg.to_dict(), "config_hash": cfg.hash(),
            "model": {"name": handle.name, "fingerprint": handle.fingerprint}, "setting": setting,
            "batch_size": batch_size if setting != "single" else 1,
            "eval_timing": eval_timing if setting == "sequential" else None,
            "protocols": list(protocols), "case_ids": json.loads(json.dumps(keys, default=str)),
            "case_digests": [case_digest(c) for c in cases],
            # a trained editor is its checkpoint's content, not its path (retraining in place changes it)
            **({"checkpoint_state": state_id(ckpt)} if (ckpt := editor.options.checkpoint) else {}),
            **({"generation": (generation or GenSettings()).key()} if GEN in protocols else {})}


def dataset_of(run_dir: Path) -> str | None:
    """The dataset name a finished run's summary.json records (``lmedit bench`` or a table cell), if any."""
    try:
        data = json.loads((run_dir / SUMMARY_FILE).read_text()).get("data") or {}
    except (OSError, ValueError):
        return None
    return data.get("dataset") or (data.get("cell") or {}).get("dataset")


def lendable_cases(source: str | Path, header: dict[str, Any], *, dataset: str | None = None
                   ) -> tuple[dict[str, str], str]:
    """The finished cases of an earlier run in ``source`` that the run described by ``header`` may take.

    The earlier run must be the same run but for its case list (method, resolved config and its hash,
    model fingerprint, setting, batch size, protocols: everything in ``header`` but the case list), and a
    case is lent only when it is the same case: same id and same content digest. A run written before
    runs recorded content digests is trusted only when its summary.json names ``dataset``. A single-edit
    case does not depend on the others, so any shared case is lent; a batch run lends only a prefix of
    whole batches; a sequential run lends nothing (its scores depend on every edit).

    Returns:
        ({case id: its cases.jsonl line}, why nothing is lent when empty).
    """
    src = Path(source)
    try:
        old = json.loads((src / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        return {}, f"{src / RUN_FILE} is unreadable ({e})"
    ignore = ("case_ids", "case_digests", *BY_HASH, *coverage.tolerated_differences(old, header))
    diff = sorted(k for k in header if k not in ignore and old.get(k) != header[k])
    if diff:
        return {}, f"{src} is another run (different {', '.join(diff)})"
    if header["setting"] == "sequential":
        return {}, "sequential runs cannot lend cases"
    # (id, content digest) pairs: a case is the same case when both match
    if "case_digests" in old:
        wanted = list(zip(map(str, header["case_ids"]), header["case_digests"], strict=True))
        had = list(zip(map(str, old["case_ids"]), old["case_digests"], strict=True))
    elif dataset is not None and dataset_of(src) == dataset:  # an older run: its summary names the dataset
        wanted = [(str(k), None) for k in header["case_ids"]]
        had = [(str(k), None) for k in old.get("case_ids") or []]
    else:
        return {}, (f"{src} does not record its cases' content, and its summary.json does not say it ran on "
                    f"{dataset!r}" if dataset else f"{src} does not record its cases' content")
    if header["setting"] == "batch":
        n = len(wanted) - len(wanted) % max(1, int(header["batch_size"]))
        wanted = wanted[:n] if had[:n] == wanted[:n] else []
    take = {key for key, _ in set(wanted) & set(had)}
    lines: dict[str, str] = {}
    found = take and (src / CASES_FILE).exists()
    for line in (src / CASES_FILE).read_text(encoding="utf-8").splitlines() if found else []:
        try:
            res = CaseResult.from_dict(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn line: that case is simply computed again
        if str(res.case_id) in take:  # stamped with the protocols it holds: the borrower tops up the others
            lines.setdefault(str(res.case_id), coverage.stamp(line, res, old.get("protocols")))
    return lines, "" if lines else f"{src} has no finished case among these"


def adopt_cases(out_dir: str | Path, sources: Sequence[str | Path], header: dict[str, Any], *,
                dataset: str | None = None) -> tuple[int, str]:
    """Seed ``out_dir`` (which must not hold a run yet) with what the best of ``sources`` can lend (see
    :func:`lendable_cases`: the source that lends the most cases); ``run_benchmark(..., resume=True)`` on
    ``out_dir`` then keeps the adopted cases and computes the rest.

    Returns:
        (cases adopted, the source they came from; or 0 and why no source could lend any).
    """
    out = Path(out_dir)
    if (out / CASES_FILE).exists() and (out / CASES_FILE).stat().st_size:
        return 0, f"{out} already holds a run"
    best: tuple[dict[str, str], str] = ({}, "")
    why = []
    for src in sources:
        lines, reason = lendable_cases(src, header, dataset=dataset)
        if len(lines) > len(best[0]):
            best = (lines, str(src))
        elif reason:
            why.append(reason)
    lines, src = best
    if not lines:
        return 0, "; ".join(why) or "no earlier run was given"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, header)
    order = {str(k): i for i, k in enumerate(header["case_ids"])}
    atomic_write(out / CASES_FILE, "".join(lines[k] + "\n" for k in sorted(lines, key=order.__getitem__)))
    log.info("adopted %d finished case(s) from %s", len(lines), src)
    return len(lines), src


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, replaced atomically."""
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def _extends(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A run over a longer slice whose first cases are the old run's (``--n`` raised on resume).

    Not a batch or sequential run whose last old chunk was partial (the longer slice would chunk those cases
    differently). A sequential run goes on from its saved edits; with final timing its old final scores are
    moved aside (:func:`prepare_out`), since the final scores depend on every edit.
    """
    ids = old.get("case_ids") or []
    whole_chunks = new.get("setting") == "single" or (
        new.get("setting") in ("batch", "sequential") and len(ids) % max(1, int(new.get("batch_size") or 1)) == 0)
    same_content = "case_digests" not in old or new["case_digests"][: len(ids)] == old["case_digests"]
    return whole_chunks and new["case_ids"][: len(ids)] == ids and same_content


def prepare_out(run: _Run, header: dict[str, Any], resume: bool) -> None:
    """Create the folder; on resume check that it holds the same run and read its finished cases."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    cases_file = out / CASES_FILE
    if not resume:
        if (cases_file.exists() and cases_file.stat().st_size) or (out / EDITS_DIR).exists():
            raise BenchmarkError(f"{out} already holds a run; pass resume=True to continue it, or use another folder")
        write_json(out / RUN_FILE, header)
        cases_file.write_text("")
        return
    if (out / RUN_FILE).exists():
        old = json.loads((out / RUN_FILE).read_text())
        # fields newer than some runs on disk: for those, the case ids and the run's other fields decide
        tolerated = (*BY_HASH, *coverage.tolerated_differences(old, header))
        diff = sorted(k for k in header if k not in tolerated and old.get(k) != header[k]
                      and (k in old or k not in NEWER_FIELDS))
        run.old_protocols = old.get("protocols")
        if diff in (["case_ids"], ["case_digests", "case_ids"]) and _extends(old, header):
            log.info("resuming %s with more cases: %d -> %d", out, len(old["case_ids"]), len(header["case_ids"]))
            diff = []
            if header.get("setting") == "sequential" and header.get("eval_timing") == "final":
                _set_aside_finals(cases_file, len(old["case_ids"]))
        if diff:
            raise BenchmarkError(f"cannot resume {out}: it was run with different {', '.join(diff)}; use the same "
                                 "method, config, model, data slice and setting, or another folder")
    write_json(out / RUN_FILE, header)
    run.done = read_cases(cases_file, set(map(str, run.keys)))
    log.info("resuming %s: %d of %d case(s) already done", out, len(run.done), len(run.keys))


def _set_aside_finals(cases_file: Path, n_old: int) -> None:
    """An extended final-timing sequential run: the old run's final scores were made with its ``n_old`` edits
    and no longer are final; they move to ``cases.after-<n_old>.jsonl`` (the run's checkpoint at ``n_old``,
    when it had one, keeps them in ``checkpoints.jsonl``) and every case is scored again at the new end."""
    if cases_file.exists() and cases_file.stat().st_size:
        aside = cases_file.with_name(f"cases.after-{n_old}.jsonl")
        cases_file.replace(aside)
        cases_file.write_text("")
        log.info("extending a final-timing sequential run: its final scores after %d edits moved to %s", n_old,
                 aside.name)


def read_cases(path: Path, wanted: set[str]) -> dict[Any, CaseResult]:
    """Finished cases of an earlier try; a torn last line (a crash mid-write) is dropped and the file rewritten."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    done: dict[Any, CaseResult] = {}
    keep: list[str] = []
    for j, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            res = CaseResult.from_dict(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if j == len(lines) - 1:
                log.warning("%s: dropping a torn last line (the earlier run stopped while writing it)", path)
                continue
            raise BenchmarkError(f"{path} line {j + 1} is not a case record ({e}); fix or delete the file") from None
        if str(res.case_id) not in wanted:
            raise BenchmarkError(f"{path} holds case {res.case_id!r}, which is not in this run's cases")
        if res.case_id not in done:
            done[res.case_id] = res
            keep.append(line)
    atomic_write(path, "".join(line + "\n" for line in keep))
    return done


def save_chunk(run: _Run, k: int, chunk: list[int], edit: Edit | None, eff: dict, err: str | None) -> None:
    """Keep an applied sequential edit (or its failure) so that a resumed run can rebuild the edited model."""
    if run.out is None:
        return
    d = run.out / EDITS_DIR / str(k)
    if d.exists():
        shutil.rmtree(d)  # an unfinished earlier try of this chunk
    if edit is not None:
        edit.save(d)
    d.mkdir(parents=True, exist_ok=True)
    keys = json.loads(json.dumps([run.keys[i] for i in chunk], default=str))
    write_json(d / "chunk.json", {"case_ids": keys, "efficiency": eff, "error": err})  # written last: "done"


def load_chunk(run: _Run, k: int, chunk: list[int]) -> tuple[Edit | None, dict, str | None] | None:
    """The sequential edit (or failure) :func:`save_chunk` kept for chunk ``k``, or None when there is none."""
    if run.out is None or not (run.out / EDITS_DIR / str(k) / "chunk.json").exists():
        return None
    d = run.out / EDITS_DIR / str(k)
    rec = json.loads((d / "chunk.json").read_text())
    if rec["case_ids"] != json.loads(json.dumps([run.keys[i] for i in chunk], default=str)):
        raise BenchmarkError(f"{d} was saved for other cases; resume with the same data slice and batch size")
    try:
        edit = Edit.load(d) if rec["error"] is None else None
    except EditFileError as e:
        raise BenchmarkError(f"cannot resume {run.out}: {e}. A sequential run rebuilds the edited model from "
                             "these edits, so start it again in a new folder") from None
    log.info("resume: re-applying saved chunk %d", k)
    return edit, rec["efficiency"], rec["error"]
