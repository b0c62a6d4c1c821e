"""Run one cell on a loaded model: check it can run, read the cache, else benchmark and store the result.

Both backends call :func:`run_cell`, so a cell computed locally and one computed on a Ray worker go through
the same code with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..bench.stores import BaselineStore, EditStore
from ..io import LockedError
from ..metrics.coverage import MISSING
from ..metrics.evaluate import ALL_PROTOCOLS, TEACHER_FORCED
from ..metrics.gen_protocol import GEN
from ..metrics.generate import GenSettings
from ..metrics.records import CaseResult, summarize
from .cells import CellCache, CellResult, CellSpec, cases_digest, cell_key, digest, git_commit
from .efficiency import efficiency_stats
from .postscore import DRIFT_INFO, cell_drift

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

# Metric -> the EditCase field it needs; explains a missing row ("dataset has no <field>").
# Where `lmedit train` writes a trained editor by default (its --out), relative to the working directory.
DEFAULT_CHECKPOINT = "runs/{method}"
EDIT_STORE_DIR = "edits"  # beside cells/: edits that several cells make (see run_cell's shared_requests)
BASELINE_STORE_DIR = "baselines"  # beside cells/: the unedited model's scores, which every method's cell shares


class CellSkipped(Exception):
    """The cell cannot run for a reason the user can act on; the table shows '-' with this reason."""


def requests_per_case(dataset: str) -> int:
    """How many edit requests a case of ``dataset`` applies together (its declaration in lmedit.data)."""
    from ..data import get_dataset

    return get_dataset(dataset).requests_per_case


def load_cases(spec: CellSpec, data_path: str | None = None) -> list[Any]:
    """The dataset slice of a cell: EditCases, or the dataset's multi-edit cases (MQuAKE)."""
    from .. import data

    return data.load_dataset(spec.dataset, n=spec.n, offset=spec.offset, path=data_path)


def field_counts(cases: list[Any]) -> dict[str, int]:
    """How many cases carry each field a metric needs (a zero explains a '-' in the table)."""
    return {f: sum(bool(getattr(c, f, ())) for c in cases) for f in ("paraphrases", "locality", "portability")}


def cannot_run(editor_cls: Any, handle: ModelHandle, spec: CellSpec, per_case: int = 1) -> str | None:
    """Why this method cannot run this cell (from its capabilities), or None."""
    caps = editor_cls.capabilities
    if handle.is_encoder_decoder and not caps.encoder_decoder:
        return f"{spec.method} cannot edit encoder-decoder models such as {type(handle.model).__name__}"
    if spec.setting == "sequential" and not caps.sequential:
        return f"{spec.method} cannot stack edits, so it has no sequential setting"
    if per_case > 1 and not (caps.batch or caps.sequential):
        return (f"{spec.method} can neither batch nor stack edits, so a {spec.dataset} case of {per_case} edits "
                "cannot be applied")
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency; without it there is simply nothing to seed
        pass


def shared_requests(specs: list[CellSpec], data_path: str | None) -> list[str]:
    """Digests of the requests that the cases of more than one of the cells' (edit-case) datasets hold."""
    from ..digests import request_digest

    seen: dict[str, int] = {}
    for spec in {s.dataset: s for s in specs}.values():  # one cell per dataset: its slice is theirs
        if requests_per_case(spec.dataset) != 1:  # the edit store keeps single-request edits only
            continue
        for d in {request_digest(c.request) for c in load_cases(spec, data_path)}:
            seen[d] = seen.get(d, 0) + 1
    return sorted(d for d, k in seen.items() if k > 1)


def find_runs(roots: list[str] | tuple[str, ...], method: str) -> list[Path]:
    """Finished-or-not ``lmedit bench`` folders of ``method`` in ``roots`` (each a run folder, or a folder of
    run folders), in the order given."""
    found: list[Path] = []
    for root in map(Path, roots):
        for run_json in ([root / "run.json"] if (root / "run.json").exists() else sorted(root.glob("*/run.json"))):
            try:
                if json.loads(run_json.read_text()).get("method") == method:
                    found.append(run_json.parent)
            except (OSError, ValueError):
                log.warning("ignoring %s: not a readable run.json", run_json)
    return found


def _adopt(editor: Any, handle: ModelHandle, cases: list[Any], spec: CellSpec, setting: str, target: Path,
           reuse: list[str] | tuple[str, ...], scoring: dict[str, Any]) -> dict[str, Any] | None:
    """Seed ``target`` with finished cases of an earlier ``lmedit bench`` run of the same method, config,
    model and setting (see :func:`lmedit.bench.adopt_cases`); what was adopted, or None."""
    from ..bench import adopt_cases, run_header

    header = run_header(editor, handle, cases, setting=setting, batch_size=spec.batch_size,
                        eval_timing=spec.eval_timing, **scoring)
    n, source = adopt_cases(target, find_runs(reuse, header["method"]), header, dataset=spec.dataset)
    if not n:
        log.info("cell %s: nothing to reuse: %s", spec.name, source)
        return None
    log.info("cell %s: %d of %d case(s) taken from %s", spec.name, n, len(cases), source)
    return {"from": source, "cases": n}


def _benchmark(editor: Any, handle: ModelHandle, cases: list[Any], spec: CellSpec, folder: Path, resume: bool,
               run_info: dict[str, Any], progress: bool, reuse: list[str] | tuple[str, ...] = (),
               edit_store: Any = None, baseline_store: Any = None, scoring: dict[str, Any] | None = None,
               drift: Any = None) -> tuple[list[CaseResult], list[dict[str, Any]], dict[str, Any] | None]:
    """run_benchmark over the cell's cases: once (single), or once per sequence of T edits (sequential).
    A fresh single/batch cell first adopts what ``reuse`` (earlier bench runs) already computed; a single
    cell takes and keeps edits in ``edit_store``; every cell shares the unedited model's scores through
    ``baseline_store``. ``scoring``: the protocols and generation settings (run_benchmark's keywords);
    ``drift``: DriftSettings of batch and sequential runs (a single run measures none)."""
    from ..bench import run_benchmark

    scoring = scoring or {}
    if spec.setting == "sequential":
        chunks = [cases[i:i + spec.edits] for i in range(0, len(cases), spec.edits)]
        setting = "sequential"
    else:
        chunks = [cases]
        setting = "batch" if spec.batch_size > 1 else "single"
    adopted = None
    if reuse and setting != "sequential" and not resume:
        adopted = _adopt(editor, handle, cases, spec, setting, folder / "run-000", reuse, scoring)
    results: list[CaseResult] = []
    summaries: list[dict[str, Any]] = []
    for i, chunk in enumerate(chunks):
        out = run_benchmark(editor, handle, chunk, setting=setting, batch_size=spec.batch_size,
                            eval_timing=spec.eval_timing, out_dir=folder / f"run-{i:03d}",
                            resume=resume or adopted is not None,
                            progress=progress, run_info={**run_info, "sequence": i}, edit_store=edit_store,
                            baseline_store=baseline_store, drift=drift, **scoring)
        results.extend(out.results)
        summaries.append(out.summary)
    return results, summaries, adopted


def _editor(cls: Any, spec: CellSpec, handle: ModelHandle, checkpoints: dict[str, str] | None) -> Any:
    """The cell's editor; a trained editor gets its checkpoint as a run option (or the cell is skipped)."""
    from ..config import RunOptions
    from ..registry import get_editor

    overrides = spec.config_overrides()
    editor = get_editor(spec.method, overrides)
    if cls.capabilities.needs_fit and not editor.options.checkpoint:
        ckpts = checkpoints or {}  # "method@dataset" (trained on that dataset) wins over "method"
        ckpt = ckpts.get(f"{spec.method}@{spec.dataset}") or ckpts.get(spec.method) \
            or DEFAULT_CHECKPOINT.format(method=spec.method)
        if not Path(ckpt).is_dir():
            raise CellSkipped(missing_checkpoint(editor, handle, ckpt))
        editor = get_editor(spec.method, overrides, options=RunOptions(checkpoint=ckpt))
    return editor


def run_cell(handle: ModelHandle, spec: CellSpec, cache: CellCache, *, checkpoints: dict[str, str] | None = None,
             data_path: str | None = None, progress: bool = False,
             reuse: list[str] | tuple[str, ...] = (),
             cached_only: bool = False, shared_requests: list[str] | tuple[str, ...] = (),
             protocols: tuple[str, ...] = ALL_PROTOCOLS, generation: GenSettings | None = None,
             drift: Any = None) -> CellResult:
    """The result of one cell: from the cache when intact and current, else computed now and stored.

    ``reuse``: ``lmedit bench`` output folders (or folders of them) whose finished cases a new single/batch
    cell takes instead of recomputing, when they are the same run (method, resolved config, model
    fingerprint, setting) and the same cases (id and content); the cell's info says how many came from where.
    ``cached_only``: a cell that is not in the cache is skipped ("not computed yet") instead of computed.
    ``shared_requests``: digests of requests that other cells edit too: a single-setting cell keeps its
    edits of these in ``<out>/edits/`` and takes those another cell of the same method stored there
    (:mod:`lmedit.bench.stores`); the numbers are the same, only computed once. Every cell scores the unedited
    model on a case once for all methods: the scores are kept in ``<out>/baselines/``.
    ``protocols`` / ``generation``: how cases are scored. The protocols are not part of the cell's key: a
    cached cell that lacks one of them (a cell computed before the generation protocol existed) is resumed
    to compute it for its finished cases (:mod:`lmedit.metrics.coverage`), or, with ``cached_only``, shown
    with that protocol marked missing. Generation settings other than the default enter the key.
    ``drift``: a :class:`~lmedit.metrics.drift.DriftSettings`: a batch or sequential cell measures the
    perplexity drift of its edited model (``info["drift"]``, :func:`lmedit.table.postscore.cell_drift`); not
    part of the key (a cell cached without it shows its drift as missing).

    Raises:
        CellSkipped: the method cannot run this cell (capabilities, or a missing trained checkpoint).
    """
    from ..metrics.scorers import scorer_for
    from ..registry import editor_class

    seed_everything(spec.seed)
    cls = editor_class(spec.method)
    reason = cannot_run(cls, handle, spec, requests_per_case(spec.dataset))
    if reason:
        raise CellSkipped(reason)
    editor = _editor(cls, spec, handle, checkpoints)
    cases = load_cases(spec, data_path)
    scored = scorer_for(cases).protocols(tuple(protocols))  # the asked protocols these cases are scored with
    config = editor.config_for(handle)
    generation = generation or GenSettings()
    extra: dict[str, Any] = {"checkpoint": checkpoint_identity(editor.options.checkpoint)}
    if GEN in protocols and generation.key() != GenSettings().key():  # default settings keep older keys valid
        extra["generation"] = generation.key()
    key = cell_key(spec, fingerprint=handle.fingerprint, config_hash=config.hash(),
                   data_digest=cases_digest(cases), extra=extra)
    with contextlib.ExitStack() as held:  # one process computes a cell; another gets it skipped, not doubled
        try:
            held.enter_context(cache.locked(spec))
        except LockedError as e:
            raise CellSkipped(f"another process is computing it now: {e}") from None
        hit = cache.load(spec, key)
        missing = cell_lacks(hit, scored) if hit is not None else []
        if hit is not None and (not missing or cached_only):
            log.info("cell %s: cached", spec.name)
            if missing:
                hit.info[MISSING] = missing
            return hit
        if missing:
            log.info("cell %s: cached without protocol(s) %s; computing them for its cases", spec.name, missing)
        if cached_only:
            raise CellSkipped("not computed yet (this table was laid out from cached cells only)")
        folder, resume = cache.prepare(spec, key)
        run_info = {"command": "lmedit table", "cell": spec.to_dict(), "model": handle.name}
        seed_everything(spec.seed)
        store = EditStore(cache.root.parent / EDIT_STORE_DIR, requests=shared_requests) if shared_requests else None
        baselines = BaselineStore(cache.root.parent / BASELINE_STORE_DIR)
        results, summaries, adopted = _benchmark(editor, handle, cases, spec, folder, resume, run_info, progress,
                                                 reuse, store, baselines,
                                                 {"protocols": protocols, "generation": generation}, drift)
        efficiency = efficiency_stats(results, summaries, training_seconds(editor.options.checkpoint))
        errors = [r.info["error"] for r in results if r.info.get("error")]
        if results and len(errors) == len(results):
            cache.wipe(spec)  # not cached, not resumable: a rerun tries these edits again
            raise CellSkipped(f"every {spec.method} edit on {spec.dataset} failed, e.g. {errors[0]}")
        result = CellResult(
            spec=spec, status="ok", post=summarize(results, "post"), pre=summarize(results, "pre"),
            efficiency=efficiency, fields=field_counts(cases), key=key,
            info={"model": handle.name, "cases": len(results) - len(errors), "failed_edits": len(errors),
                  "config": config.to_dict(), "commit": git_commit(), "setting_label": setting_label(spec),
                  "protocols": sorted(set(protocols) | set(hit.info.get("protocols") or TEACHER_FORCED))
                  if hit is not None else list(protocols),
                  **({"reused": adopted} if adopted else {}),
                  **({DRIFT_INFO: measured} if (measured := cell_drift(summaries)) else {})})
        cache.store(result)
        return result


def cell_lacks(cell: CellResult, protocols: tuple[str, ...]) -> list[str]:
    """The protocols a cached cell was not computed with, of those its cases are scored with (a multi-hop
    case's scorer has its own protocol and takes none of the asked ones)."""
    held = cell.info.get("protocols") or TEACHER_FORCED  # cells from before the info was kept
    return [p for p in protocols if p not in held]


def missing_checkpoint(editor: Any, handle: ModelHandle, where: str) -> str:
    """The '-' reason of a trained editor without a checkpoint: the command that trains one."""
    return (f"{editor.name} must be trained before it can edit and there is no checkpoint at {where}; train "
            f"one for {handle.name} (the train command, or editor.fit(..., out=DIR)) and give the table that "
            "folder as its checkpoint")


def checkpoint_identity(directory: str | None) -> str | None:
    """A trained editor's identity in a cell key: its content (:func:`~lmedit.training.checkpoint.state_id`,
    the weights' hashes in editor.json), so a copied checkpoint keeps its cells and a retrained one makes
    them stale; for a folder without a readable editor.json, the names, sizes and mtimes of its files."""
    if not directory:
        return None
    from ..training.checkpoint import state_id

    if (content := state_id(directory)) is not None:
        return content
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return digest([(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])[:16]


def training_seconds(directory: str | None) -> float | None:
    """Training time recorded in a trained editor's checkpoint (its history's elapsed seconds), if any."""
    if not directory:
        return None
    from ..training import checkpoint as ckpt

    try:
        info = json.loads((Path(directory) / f"{ckpt.EDITOR}.json").read_text())
        secs = [float(h["seconds"]) for h in info.get("history", []) if "seconds" in h]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(secs) if secs else None  # the history's seconds count from the start of training


def setting_label(spec: CellSpec) -> str:
    """How the numbers were produced, as printed under the table."""
    if spec.setting == "sequential":
        return f"sequential, T={spec.edits} edits per sequence, {spec.eval_timing} evaluation"
    if spec.batch_size > 1:
        return f"batch edits of {spec.batch_size}"
    return "single edits (each case edited alone, then reverted)"
