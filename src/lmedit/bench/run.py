"""Benchmark runner: edit cases one by one, in batches, or cumulatively, and score every edit.

Settings (methods-spec A.3):

- ``single``: for each case, compute an edit on the unedited model, apply it, score the case, revert.
- ``batch``: chunks of ``batch_size`` cases; one edit per chunk; every member is scored on the
  chunk-edited model; then revert. Per-case time = chunk time / chunk size (the chunk time is kept too).
- ``sequential``: chunks are applied cumulatively and never reverted in between. ``eval_timing`` is
  ``"immediate"`` (score a chunk's cases right after applying it) or ``"final"`` (score every case on the
  model holding all edits). At the end every edit is reverted in reverse order.

Scores always compare against a :class:`~lmedit.metrics.evaluate.Baseline` computed once, on the unedited
model, before any edit (so sequential locality is measured against the *original* model). Timing covers the
editor's ``compute`` only (A.5); ``apply`` time is recorded separately.

Output folder: ``cases.jsonl`` (one line per finished case, flushed as it finishes), ``summary.json``,
``table.md``, ``run.json`` (what the run is, checked on resume) and, for sequential runs, ``edits/<chunk>/``
(each applied edit, so that ``resume=True`` can rebuild the edited model). An edit that fails with
:class:`EditInputError` or :class:`EditError` is recorded in its cases' ``info["error"]`` and the run goes on;
failed cases are left out of the metric means and counted in ``summary["n_errors"]``.

A case may carry several requests (``case.requests``; MQuAKE's multi-edit cases hold 4): they are applied
together (:mod:`lmedit.bench.apply`: one batch, or stacked when the editor does not batch) and the case is
scored by the scorer its type declares (:mod:`lmedit.metrics.scorers`), so a multi-edit dataset is a setting
of this runner, not a second one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..edits import Edit, EditError
from ..io import atomic_write, folder_lock
from ..metrics import coverage
from ..metrics.drift import DriftSettings, DriftTracker
from ..metrics.efficiency import Measurement, combined, efficiency_record, release_freed_memory
from ..metrics.evaluate import ALL_PROTOCOLS, Baseline, check_protocols
from ..metrics.gen_protocol import GEN
from ..metrics.generate import GenSettings, frame
from ..metrics.records import CaseResult
from ..metrics.scorers import CaseScorer, scorer_for
from ..types import EditInputError, EditRequest
from .apply import EVAL_TIMINGS, SETTINGS, apply_together, check_args, revert_checked  # noqa: F401 (settings re-exported)
from .rundir import (
    CASES_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    BenchmarkError,
    case_keys,
    load_chunk,
    prepare_out,
    run_header,
    save_chunk,
    write_json,
)
from .sequential import SCORE_SLICE, CollapseGuard, budget_summary, check_budget, lifelong_for
from .stores import RunBaselines, score_baseline
from .summary import METRIC_ORDER, build_summary, render_table

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

RECOVERABLE = (EditInputError, EditError)  # a failed edit of one case; anything else stops the run
_clock = time.perf_counter  # what the edit budget is measured with (a test replaces it)


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` returns: every case's result and the summary (also on disk)."""
    results: list[CaseResult]
    summary: dict[str, Any]


@dataclass
class _Run:
    """State of one run: inputs, the baseline, finished results, the output folder and progress bar."""

    editor: Any
    handle: ModelHandle
    cases: list[Any]  # EditCase records, or a dataset's multi-edit cases (each with .requests)
    keys: list[Any]
    setting: str
    batch_size: int
    eval_timing: str | None
    protocols: tuple[str, ...]
    out: Path | None
    done: dict[Any, CaseResult] = field(default_factory=dict)
    base: dict[Any, tuple[dict, list]] = field(default_factory=dict)  # key -> (pre scores, locality preds)
    chunk_stats: list[dict[str, Any]] = field(default_factory=list)
    bar: Any = None
    running: dict[str, tuple[float, int]] = field(default_factory=dict)
    store: Any = None  # EditStore whose edits this run takes and keeps, with its scope (single setting only,
    # so every chunk is one request)
    scope: str | None = None
    generation: GenSettings | None = None  # how the generation protocol generates (when it is asked)
    texts: dict[Any, list] = field(default_factory=dict)  # key -> post-edit text records, until recorded
    reopened: dict[Any, CaseResult] = field(default_factory=dict)  # finished cases topped up with new protocols
    old_protocols: list[str] | None = None  # the protocols of the run being resumed (its run.json)
    drift: Any = None  # DriftTracker of batch and sequential runs
    lifelong: Any = None  # checkpoints and collapse guard of sequential runs (lmedit.bench.sequential.Lifelong)
    scorer: CaseScorer | None = None  # how these cases are scored (their type's scorer)
    header: dict[str, Any] = field(default_factory=dict)  # run.json (a run the edit budget stops is cut to its cases)
    budget: float | None = None  # sequential: seconds of editing this sitting may spend (None: no limit)
    budget_record: dict[str, Any] | None = None  # where the budget stopped the run (summary["edit_budget"])

    def chunks(self) -> list[list[int]]:
        step = 1 if self.setting == "single" else self.batch_size
        return [list(range(s, min(s + step, len(self.cases)))) for s in range(0, len(self.cases), step)]

    def todo(self, chunk: list[int]) -> list[int]:
        return [i for i in chunk if self.keys[i] not in self.done]

    def sub_base(self, idx: list[int]) -> Baseline:
        rows = [self.base[self.keys[i]] for i in idx]
        return Baseline(locality=[r[1] for r in rows], pre=[r[0] for r in rows], texts=[r[2] for r in rows])

    def score(self, idx: list[int]) -> list[dict]:
        posts, texts = self.scorer.score(self.handle, [self.cases[i] for i in idx], self.sub_base(idx),
                                         protocols=self.protocols, generation=self.generation)
        self.texts.update({self.keys[i]: t for i, t in zip(idx, texts, strict=True)})
        return posts

    def record(self, i: int, post: dict, efficiency: dict, info: dict, chunk: int) -> None:
        """Store one finished case, append it to cases.jsonl (flushed) and advance the progress bar."""
        key, pre = self.keys[i], self.base[self.keys[i]][0]
        n_edits = len(self.cases[i].requests)
        info = {"source": self.cases[i].source, **({"edits": n_edits} if n_edits > 1 else {}), **info}
        if "reliability" in pre and pre["reliability"].value == 1.0:
            info["already_true"] = True
            log.info("case %s: the model already gives the new target before the edit", key)
        texts = {"pre": self.base[key][2], "post": self.texts.pop(key, [])} if GEN in self.protocols else {}
        res = CaseResult(key, post=post, pre=pre, efficiency=efficiency, info=info, texts=texts,
                         protocols=list(self.protocols))
        if key in self.reopened:
            res = coverage.merge(self.reopened.pop(key), res)
        self.done[key] = res
        if self.out is not None:
            line = {**res.to_dict(), "setting": {"setting": self.setting, "batch_size": self.batch_size,
                                                 "eval_timing": self.eval_timing, "chunk": chunk}}
            with open(self.out / CASES_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, default=str) + "\n")
                f.flush()
        if self.bar is not None:
            for name in METRIC_ORDER[:3]:  # running means of reliability, generalization, locality
                if name in post:
                    total, count = self.running.get(name, (0.0, 0))
                    self.running[name] = (total + post[name].value, count + 1)
            self.bar.update(1)
            self.bar.set_postfix({k[:3]: f"{t / c:.2f}" for k, (t, c) in self.running.items()})


def run_benchmark(editor: Any, handle: ModelHandle, cases: Sequence[Any], *, setting: str = "single",
                  batch_size: int = 1, eval_timing: str = "final", out_dir: str | Path | None = None,
                  resume: bool = False, progress: bool = False, protocols: Sequence[str] = ALL_PROTOCOLS,
                  run_info: dict[str, Any] | None = None, edit_store: Any = None,
                  baseline_store: Any = None, generation: GenSettings | None = None,
                  drift: DriftSettings | None = None, fill_missing: bool = True,
                  checkpoints: Sequence[int] | None = None, collapse_guard: CollapseGuard | None = None,
                  edit_budget: float | None = None) -> BenchmarkResult:
    """Edit and score ``cases`` with ``editor`` on ``handle`` (see the module docstring).

    Args:
        cases: EditCase records, or the multi-edit cases of a dataset such as MQuAKE (all of one kind).
        setting: ``"single"``, ``"batch"`` or ``"sequential"``.
        batch_size: cases per edit (batch and sequential settings).
        eval_timing: ``"immediate"`` or ``"final"`` (sequential only).
        out_dir: folder for cases.jsonl / summary.json / table.md (None: nothing is written).
        resume: continue a run in ``out_dir``: finished cases are kept, finished chunks are not redone.
        progress: show a tqdm progress bar.
        protocols: scoring protocols (``token_acc``, ``prob_compare``, ``gen``; a multi-edit case's scorer has
            its own and ignores them). Resuming a run with protocols
            its finished cases lack computes them for those cases (``fill_missing``) or marks them as
            missing (:mod:`lmedit.metrics.coverage`).
        run_info: facts about the data slice (dataset name, n, offset, file) copied into the summary.
        edit_store: an :class:`~lmedit.bench.stores.EditStore`; in the single setting a case whose request it
            holds (same method, config, model and checkpoint) takes that edit instead of computing it, and
            computed edits are kept in it. Efficiency still reports what computing the edit cost.
        baseline_store: a :class:`~lmedit.bench.stores.BaselineStore`: the unedited model's scores of a case are
            taken from it when it has them for these exact weights, and kept in it otherwise. Default, with
            ``out_dir``: the run folder's own ``baseline.jsonl`` (:class:`~lmedit.bench.stores.RunBaselines`),
            so a resumed run does not score the unedited model again.
        generation: how the ``gen`` protocol generates (context, token cap); default GenSettings().
        drift: capability drift (perplexity, n-gram entropy) before and after the edits of a batch or
            sequential run (:mod:`lmedit.metrics.drift`); None: not measured.
        checkpoints: sequential only: edit counts at which every edit so far is scored again (retention).
        collapse_guard: sequential only: refuse edits that collapse a probe perplexity (see
            :mod:`lmedit.bench.sequential`; the CLI turns it on by default).
        edit_budget: sequential only: seconds of editing (compute, apply, the guard's probe, saving the edit;
            not scoring) this sitting may spend. Once spent, no new edit starts: the run becomes a run of the
            cases edited so far (scored as if ``cases`` had ended there; ``run.json`` says so, so a later
            ``resume`` with the full list and a new budget extends it) and ``summary["edit_budget"]`` records
            where it stopped, the seconds per edit and the projection to every case.
    Returns:
        per-case results in case order, and the summary.
    """
    t0 = time.perf_counter()
    cases = list(cases)
    check_args(editor, handle, cases, setting, batch_size, eval_timing)
    check_budget(edit_budget, setting)
    keys = case_keys(cases)
    if len(set(map(str, keys))) != len(keys):
        raise EditInputError("case ids are not unique; give every case its own case_id")
    timing = eval_timing if setting == "sequential" else None
    scorer = scorer_for(cases)
    protocols = scorer.protocols(check_protocols(protocols))
    if GEN in protocols:
        frame(handle, cases[0].request.text, (generation or GenSettings()).context)  # e.g. no chat template
    run = _Run(editor, handle, cases, keys, setting, batch_size, timing, protocols,
               Path(out_dir) if out_dir is not None else None, generation=generation or GenSettings(), scorer=scorer)
    run.lifelong = lifelong_for(run, checkpoints, collapse_guard)  # checks the checkpoints; idle when neither
    run.budget = edit_budget
    run.header = header = {**run_header(editor, handle, cases, setting=setting, batch_size=batch_size,
                                        eval_timing=eval_timing, protocols=protocols, generation=run.generation),
                           **run.lifelong.header()}
    # one process per run directory: a second run on the same folder gets LockedError (lmedit.io)
    with folder_lock(run.out, what=f"run directory {run.out}") if run.out is not None else contextlib.nullcontext():
        if run.out is not None:
            prepare_out(run, header, resume)
            run.reopened = coverage.reopen(run.done, protocols, run.old_protocols, fill=fill_missing)
            coverage.drop_cases(run.out / CASES_FILE, set(map(str, run.reopened)))
        if drift is not None and setting != "single":
            run.drift = DriftTracker(handle, drift, run.out, n_chunks=len(run.chunks()), setting=setting)
        if edit_store is not None and setting == "single" and all(len(c.requests) == 1 for c in cases):
            from .stores import edit_scope

            run.scope = edit_scope(editor, header)
            run.store = edit_store if run.scope else None
        start_digest = handle.state_digest()
        pending = [i for i in range(len(cases)) if keys[i] not in run.done]
        work = run.lifelong.need(pending)  # the pending cases, and those of unfinished checkpoints
        if work:
            if baseline_store is None and run.out is not None:
                baseline_store = RunBaselines(run.out)
            score_baseline(run, work, start_digest, baseline_store)
            if run.drift is not None:
                run.drift.before()
            run.lifelong.before()
        if progress:
            from tqdm.auto import tqdm

            run.bar = tqdm(total=len(cases), initial=len(cases) - len(pending), unit="case", desc=header["method"])
        try:
            if work:
                (_run_sequential if setting == "sequential" else _run_independent)(run)
        finally:
            if run.bar is not None:
                run.bar.close()
        return _finish(run, header, start_digest, run_info, t0, resumed_with=len(cases) - len(pending))


def _finish(run: _Run, header: dict[str, Any], start_digest: str, run_info: dict | None, t0: float,
            resumed_with: int = 0) -> BenchmarkResult:
    """Check the model is the original again, then summarise and write summary.json and table.md."""
    end_digest = run.handle.state_digest()
    restored = end_digest == start_digest
    log.info("model digest after the run: %s (start %s)%s", end_digest, start_digest, "" if restored else " MISMATCH")
    results = [run.done[k] for k in run.keys]
    summary = build_summary(results, {**{k: v for k, v in header.items() if k != "case_ids"},
                                      "data": dict(run_info or {}), "n_cases": len(run.cases),
                                      "model_restored": restored, "wall_seconds": time.perf_counter() - t0})
    if resumed_with:  # wall_seconds is this sitting's only
        summary["resumed_with_cases_done"] = resumed_with
    if run.chunk_stats:
        summary["chunk_stats"] = run.chunk_stats
    if run.drift is not None:
        summary["drift"] = run.drift.summary()
    summary.update(run.lifelong.summary(results))
    if run.budget_record is not None:
        summary["edit_budget"] = budget_summary(run.budget_record, results)
    if run.out is not None:
        write_json(run.out / SUMMARY_FILE, summary)
        atomic_write(run.out / TABLE_FILE, render_table(summary))
    if not restored:
        raise BenchmarkError(f"the model's weights differ after reverting every edit (digest {end_digest}, was "
                             f"{start_digest}); results were written, but the model in memory is not the original")
    return BenchmarkResult(results, summary)


def _compute_apply(run: _Run, idx: list[int]) -> tuple[Edit | None, dict[str, Any], str | None]:
    """The one edit of cases ``idx`` (the sequential setting: one compute per chunk), computed and applied;
    a recoverable failure returns its message."""
    edits, eff, err = _compute_apply_all(run, idx)
    return (edits[0] if edits else None), eff, err


def _compute_apply_all(run: _Run, idx: list[int]) -> tuple[list[Edit], dict[str, Any], str | None]:
    """Compute (measured) and apply the edits of cases ``idx``, every request of theirs together
    (:func:`~lmedit.bench.apply.apply_together`); a recoverable failure returns its message, with the model
    as it was. With an edit store, a stored edit of the same request is applied instead, and a computed
    one is kept."""
    requests = [r for i in idx for r in run.cases[i].requests]
    if run.store is not None and (stored := _stored(run, requests)) is not None:
        return [stored[0]], stored[1], None
    ms: list[Measurement] = []
    try:
        edits, apply_s = apply_together(run.editor, run.handle, requests, ms)
    except RECOVERABLE as e:
        msg = f"{type(e).__name__}: {e}"
        log.warning("edit of case(s) %s failed: %s", [run.keys[i] for i in idx], msg)
        return [], efficiency_record(combined(ms), len(requests), None), msg
    eff = efficiency_record(combined(ms), len(requests), apply_s)
    if run.store is not None:
        run.store.put(run.scope, requests[0], edits[0], eff)
    return edits, eff, None


def _stored(run: _Run, requests: list[EditRequest]) -> tuple[Edit, dict[str, Any], None] | None:
    """The store's edit of this single request, applied; None when it has none or the edit does not fit."""
    got = run.store.get(run.scope, requests[0])
    if got is None:
        return None
    edit, eff = got
    try:
        edit.apply(run.handle)  # strict: refuses weights other than those it was computed on
    except RECOVERABLE as e:
        log.warning("the stored edit of %r does not apply (%s); computing it again", requests[0].text, e)
        return None
    log.info("reusing the stored edit of %r", requests[0].text)
    return edit, {**eff, "reused_edit": True}, None


def _info(edit: Edit | None, chunk: int, err: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"chunk": chunk}
    if err:
        info["error"] = err
    elif edit is not None and edit.meta.get("stats"):
        info["stats"] = edit.meta["stats"]
    return info


def _run_independent(run: _Run) -> None:
    """single and batch: every chunk starts from the unedited model."""
    for k, chunk in enumerate(run.chunks()):
        todo = run.todo(chunk)
        if not todo:
            continue
        edits, eff, err = _compute_apply_all(run, chunk)
        if edits:
            try:
                if run.drift is not None:
                    run.drift.after_chunk(k, len(chunk))
                posts = run.score(todo)
            finally:
                revert_checked(run.handle, edits)
        else:
            posts = [{} for _ in todo]
        info = _info(next((e for e in edits if e.meta.get("stats")), None), k, err)  # stacked: the first with stats
        for i, post in zip(todo, posts, strict=True):
            run.record(i, post, eff, info, k)
        release_freed_memory()


def _run_sequential(run: _Run) -> None:
    """Chunks applied cumulatively; every applied edit is reverted in reverse order at the end."""
    applied: list[Edit] = []
    later: dict[int, tuple[dict, dict, int]] = {}  # case index -> (efficiency, info, chunk): scored at the end
    chunks = run.chunks()
    spent = 0.0  # seconds of editing in this sitting (the budget's measure)
    try:
        for k, chunk in enumerate(chunks):
            saved = load_chunk(run, k, chunk)
            if saved is None and run.budget is not None and spent >= run.budget:
                chunks = _end_early(run, k, spent, len(applied))
                break
            t = _clock()
            if saved is None:
                edit, eff, err = _compute_apply(run, chunk)
                edit, err = run.lifelong.check(k, chunk, edit, err)  # the collapse guard may roll it back
            else:
                edit, eff, err = saved
                if edit is not None:
                    edit.apply(run.handle)  # strict: refuses weights other than those it was computed on
            if edit is not None:
                applied.append(edit)
                if run.drift is not None:
                    run.drift.after_chunk(k, chunk[-1] + 1)  # chunks are consecutive from case 0
                if edit.meta.get("stats"):
                    run.chunk_stats.append({"chunk": k, "stats": edit.meta["stats"]})
            if saved is None:
                save_chunk(run, k, chunk, edit, eff, err)
                spent += _clock() - t
            todo, info = run.todo(chunk), _info(edit, k, err)
            if err or run.eval_timing == "immediate":
                posts = [{} for _ in todo] if err else (run.score(todo) if todo else [])
                for i, post in zip(todo, posts, strict=True):
                    run.record(i, post, eff, info, k)
            else:
                later.update({i: (eff, info, k) for i in todo})
            run.lifelong.after_chunk(k, chunk, edit is not None, err)
            release_freed_memory()  # else the heap keeps what each edit freed: ~30 MB per MEMIT edit
        todo = [i for chunk in chunks for i in chunk if i in later]
        for s in range(0, len(todo), SCORE_SLICE):  # final timing: a slice at a time (its generations batched
            part = todo[s : s + SCORE_SLICE]  # together), each recorded at once, so a crash keeps what was scored
            for i, post in zip(part, run.score(part), strict=True):
                run.record(i, post, *later[i])
    finally:
        for edit in reversed(applied):
            edit.revert(run.handle)


def _end_early(run: _Run, k: int, spent: float, n_applied: int) -> list[list[int]]:
    """The edit budget is spent before chunk ``k``: the run becomes the run of its first cases (those of
    chunks 0..k-1), with run.json saying so; returns its chunks."""
    m = k * run.batch_size  # chunks are consecutive and whole up to k
    log.warning("edit budget of %.0f s spent after %d of %d edits (%.0f s this sitting); scoring those %d "
                "(resume with the full --n and a new budget to go on)", run.budget, m, len(run.cases), spent, m)
    run.budget_record = {"seconds": run.budget, "spent": spent, "edits": m, "asked": len(run.cases)}
    run.cases, run.keys = run.cases[:m], run.keys[:m]
    for name in ("case_ids", "case_digests"):
        if name in run.header:
            run.header[name] = run.header[name][:m]
    if run.out is not None:
        write_json(run.out / RUN_FILE, run.header)
    if run.drift is not None:  # the drift at the run's new end
        run.drift.n_chunks = k
        run.drift.checkpoint(k - 1, n_applied)
    run.lifelong.end_early(m, k - 1)
    if run.bar is not None:
        run.bar.total = m
        run.bar.refresh()
    return run.chunks()
