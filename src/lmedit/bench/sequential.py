"""Lifelong (sequential) runs: retention checkpoints and the collapse guard.

**Checkpoints.** ``checkpoints=(10, 100, 1000)`` scores, after the chunk that brings the number of edits
made (cases whose chunk ran, refused and failed ones included) to each value, *every edit applied so far* on the model
as it is then (the retention timing of methods-spec A.3), under every protocol of the run and against the
baseline of the unedited model (locality included). Each checkpoint is summarised for all applied edits,
the oldest tenth, the newest tenth (retention) and the latest edit of each fact ("current": an edit that a
later edit of the same fact contradicts is superseded, :attr:`EditRequest.fact`), with the capability drift
measured there when the run measures drift. With ``eval_timing="final"``, a checkpoint at the last case
*is* the final scoring: it is read from the run's case records instead of being scored twice.

**Collapse guard.** After each newly computed edit is applied, a probe (perplexity of ``tokens`` tokens of
the drift corpus, :func:`lmedit.metrics.drift.perplexity`) runs; an edit that pushes it past ``ratio`` × the
unedited model's perplexity on the same tokens is reverted at once (:class:`EditCollapseError`: the model is
as before the edit) and recorded as a failed case. The probe rotates: chunk ``k`` reads window ``k mod
windows`` of ``windows`` consecutive windows of ``tokens`` tokens, each against its own unedited reading
(all measured once, before the first edit), and the edit is also refused when it puts the estimate over all
the windows (the geometric mean of each one's ratio as last read, :func:`overall_ratio`) past ``ratio``.
A fixed probe keeps exactly the edits that spare its own few tokens, so over hundreds of edits it lets
through the damage it cannot see (``benchmarks/guard_probe.py``); a rotating one reads ``tokens × windows``
tokens every ``windows`` edits at the cost of one window per edit (two after a refusal: the window is read
again without the edit).
Checked after the rollback: the stack of applied edits is the one before, and every parameter a weight edit
touched has its digest from before.

Files in the run folder (all appended line by line and flushed, so a killed run resumes without losing a
finished edit or checkpoint): ``checkpoint_cases.jsonl`` (one line per case scored at a checkpoint:
``{"checkpoint", "case_id", "post"}``), ``checkpoints.jsonl`` (one line per finished checkpoint, the record
below) and ``guard.jsonl`` (the unedited probe, then one line per probed edit). ``summary.json`` gains
``summary["lifelong"]``::

    {"schema": "lmedit.lifelong/1", "eval_timing": "immediate" | "final",
     "checkpoints": [{"edits": 100,            # cases whose chunk ran so far
                      "chunk": 99, "applied": 98, "refused": 1, "failed": 1, "tenth": 9, "superseded": 3,
                      "source": "scored" | "final records",
                      "scores": {"all" | "oldest" | "newest" | "current": {metric: {"mean", "protocol", "cases"}}},
                      "probe_perplexity": 25.1 | null, "probe_ratio": 1.004 | null,
                      "drift": {"perplexity": 25.8, "perplexity_before": 25.76, "ratio": 1.002,
                                "ngram_entropy": 5.9} | null}],
     "collapse_guard": {"ratio": 1.3, "tokens": 128, "base_perplexity": 24.9, "limit": 32.4,
                        "windows": 16, "base_perplexities": [24.9, ...], "probed": 100,
                        "max_perplexity": 25.3, "max_ratio": 1.02, "estimate": 1.01,
                        "refused": [{"chunk", "case_ids", "edit", "probe_perplexity", "probe_ratio"}]} | null}

(``limit`` is ``ratio × base_perplexity``, the first window's, and null for a rotating guard, whose limit is
``ratio`` × each window's own reading; ``estimate`` is the guard's estimate over all its windows at the end,
:func:`overall_ratio` of each window's latest ratio, and a checkpoint's ``probe_ratio`` the estimate after
its last kept edit.)
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digests import tensor_digest
from ..errors import EditCollapseError
from ..hooks import get_parameter
from ..io import append_jsonl, read_jsonl
from ..metrics.drift import NGRAM_ENTROPY, PERPLEXITY, DriftSettings, corpus_ids, perplexity
from ..metrics.records import CaseResult, summarize

if TYPE_CHECKING:
    from ..edits import Edit
    from ..models.handle import ModelHandle
    from .run import _Run

log = logging.getLogger(__name__)

SCHEMA = "lmedit.lifelong/1"
CHECKPOINTS_FILE, CHECKPOINT_CASES_FILE, GUARD_FILE = "checkpoints.jsonl", "checkpoint_cases.jsonl", "guard.jsonl"
SCORE_SLICE = 32  # cases scored (and written) at a time at a checkpoint and in the final scoring


PROBE_WINDOW = DriftSettings.window  # a longer probe reads its text in windows of this many tokens, as drift does


@dataclass(frozen=True)
class CollapseGuard:
    """Refuse an edit that pushes the probe perplexity past ``ratio`` × the unedited model's.

    Attributes:
        ratio: the allowed factor over the unedited model's probe perplexity (> 1).
        tokens: probe length: this many tokens of the drift corpus, read in windows of up to
            :data:`PROBE_WINDOW` tokens (the drift measurement's window).
        corpus: a text file instead of the shared WikiText-2 test split.
        windows: the probe rotates over this many consecutive stretches of ``tokens`` tokens (the first
            ``tokens × windows`` tokens of the corpus), one per edit, each compared with the unedited model's
            perplexity on the same stretch; 1: always the first ``tokens`` tokens (the guard of runs made
            before it rotated, whose run folders still resume).
    """

    ratio: float = 1.3
    tokens: int = 128
    corpus: str | None = None
    windows: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, int | float) and math.isfinite(self.ratio) and self.ratio > 1):
            raise ValueError(f"the collapse guard's ratio must be a number above 1, got {self.ratio!r} "
                             "(e.g. 1.3: refuse an edit that raises the probe perplexity by more than 30%)")
        if self.tokens < 8:
            raise ValueError(f"the collapse guard's probe needs at least 8 tokens, got {self.tokens}")
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f"the collapse guard's windows must be a whole number of at least 1, got "
                             f"{self.windows!r} (1: a fixed probe; 16: the default rotation)")

    def to_dict(self) -> dict[str, Any]:
        """What the guard is (run.json: a run resumes only with the same guard). A fixed probe (one window)
        is written as before the guard rotated, so that older run folders resume."""
        fixed = {"ratio": self.ratio, "tokens": self.tokens, "corpus": self.corpus}
        return fixed if self.windows == 1 else {**fixed, "windows": self.windows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CollapseGuard:
        """The guard :meth:`to_dict` wrote (a record without ``windows`` is a fixed probe)."""
        return cls(ratio=d["ratio"], tokens=d["tokens"], corpus=d.get("corpus"), windows=d.get("windows", 1))


def check_checkpoints(checkpoints: Any, n: int, batch_size: int = 1) -> tuple[int, ...]:
    """The checkpoints as a tuple of edit counts, or :class:`ValueError` saying what to fix.

    They must be whole numbers from 1 to ``n``, strictly increasing, and fall on chunk boundaries (a
    multiple of ``batch_size``, or ``n``)."""
    cps = list(checkpoints)
    if not cps:
        raise ValueError("checkpoints is empty; give edit counts such as 10,100,1000 or leave them out")
    bad = [c for c in cps if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if bad:
        raise ValueError(f"checkpoints must be whole numbers of edits, at least 1; got {bad}")
    dup = sorted({c for c in cps if cps.count(c) > 1})
    if dup:
        raise ValueError(f"checkpoint(s) {dup} appear more than once; list each edit count once")
    if cps != sorted(cps):
        raise ValueError(f"checkpoints must be in increasing order, got {cps}; write them as {sorted(cps)}")
    if cps[-1] > n:
        raise ValueError(f"checkpoint {cps[-1]} is past the {n} edits of this run; raise n or drop the "
                         f"checkpoints above {n}")
    off = [c for c in cps if c % batch_size and c != n]
    if off:
        raise ValueError(f"checkpoint(s) {off} fall inside a chunk of {batch_size} edits; use multiples of the "
                         f"batch size ({batch_size}) or the last edit ({n})")
    return tuple(cps)


def probe_perplexity(handle: ModelHandle, guard: CollapseGuard, window: int = 0) -> float:
    """The collapse guard's probe on the model as it is now: its stretch number ``window`` (from 0) of
    ``guard.tokens`` tokens."""
    if not 0 <= window < guard.windows:
        raise ValueError(f"probe window {window} is outside the guard's {guard.windows} window(s)")
    span = min(guard.tokens, PROBE_WINDOW)
    ids = corpus_ids(handle, DriftSettings(tokens=guard.tokens * guard.windows, window=span, corpus=guard.corpus))
    return perplexity(handle, ids[window * guard.tokens:(window + 1) * guard.tokens], window=span)


def base_perplexities(handle: ModelHandle, guard: CollapseGuard) -> list[float]:
    """The unedited model's reading of every probe window (what each probe is compared with)."""
    try:
        return [probe_perplexity(handle, guard, w) for w in range(guard.windows)]
    except ValueError as e:
        if guard.windows == 1:
            raise
        raise ValueError(f"the collapse guard reads {guard.windows} windows of {guard.tokens} tokens "
                         f"({guard.tokens * guard.windows} tokens) and its corpus is shorter: {e}. Give a longer "
                         "corpus, or fewer windows (--guard-windows) or tokens (--guard-tokens)") from e


def overall_ratio(latest: Sequence[float], window: int, ratio: float) -> float:
    """The guard's estimate of the perplexity ratio over all its windows: the geometric mean of each window's
    latest ratio, ``ratio`` for ``window`` (the perplexity of equal stretches together is the geometric mean
    of theirs)."""
    vals = [ratio if i == window else r for i, r in enumerate(latest)]
    if not all(math.isfinite(v) and v > 0 for v in vals):
        return math.inf
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def refuse_if_collapsed(handle: ModelHandle, edit: Edit, guard: CollapseGuard, base: float, window: int = 0,
                        latest: Sequence[float] | None = None) -> float:
    """Probe the model holding ``edit`` (its newest edit) on probe window ``window``; return the probe
    perplexity, or revert the edit and raise :class:`EditCollapseError` when it is past ``guard.ratio ×
    base`` (``base``: the unedited model's reading of that window) or when it puts the estimate over all the
    windows (:func:`overall_ratio`; ``latest``: each window's ratio as last read, 1.0 for one never read
    since the unedited model) past ``guard.ratio``."""
    ppl = probe_perplexity(handle, guard, window)
    limit = guard.ratio * base
    est = overall_ratio(latest or [1.0] * guard.windows, window, ppl / base) if math.isfinite(ppl) else math.inf
    if math.isfinite(ppl) and ppl <= limit and est <= guard.ratio:
        return ppl
    stack = list(handle.applied_edits)
    edit.revert(handle)
    touched = getattr(edit, "base_digests", {}).items()  # weight edits: each parameter's digest before the edit
    if list(handle.applied_edits) != stack[:-1] or any(
            tensor_digest(get_parameter(handle.model, name)) != d for name, d in touched):
        raise EditCollapseError(f"rolling back {edit.label()} did not restore the model; stop and reload it")
    where = (f" on probe window {window + 1} of {guard.windows} (tokens {window * guard.tokens}–"
             f"{(window + 1) * guard.tokens} of the drift corpus)" if guard.windows > 1 else "")
    why = (f"it pushed the probe perplexity{where} to {ppl:.4g}, past {guard.ratio:g} × the unedited model's "
           f"{base:.4g} = {limit:.4g}" if not ppl <= limit else
           f"with it the probe reads {ppl:.4g} (×{ppl / base:.3f}){where}, which puts the guard's estimate over all "
           f"{guard.windows} windows ({guard.tokens * guard.windows} tokens, the others as last read) at "
           f"×{est:.3f}, past ×{guard.ratio:g}")
    raise EditCollapseError(
        f"refused {edit.label()}: {why}; the edit was rolled back and the model is as before it. Raise the guard's "
        "ratio or turn the guard off to keep such edits", perplexity=ppl, limit=limit, window=window, estimate=est,
        option="collapse_guard")


def check_budget(seconds: Any, setting: str) -> None:
    """An edit budget must be a positive number of seconds, in a sequential run; else ValueError."""
    if seconds is None:
        return
    if setting != "sequential":
        raise ValueError("an edit budget belongs to sequential runs (it stops a long sequence where the time runs "
                         "out); use setting='sequential' or leave it out")
    number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
    if not (number and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"the edit budget must be a positive number of seconds, got {seconds!r}")


def budget_summary(record: dict[str, Any], results: list[CaseResult]) -> dict[str, Any]:
    """``summary["edit_budget"]``: where the budget stopped the run, the editor's seconds per edit over every
    edit the run made (earlier sittings included) and the projection of editing all the cases asked for."""
    secs = [r.efficiency["seconds"] for r in results if r.efficiency.get("seconds") is not None]
    mean = sum(secs) / len(secs) if secs else None
    return {**record, "edit_seconds_median": statistics.median(secs) if secs else None, "edit_seconds_mean": mean,
            "projected_seconds": mean * record["asked"] if mean is not None else None}


class Lifelong:
    """The checkpoints and the collapse guard of one sequential run (driven by the runner's loop)."""

    def __init__(self, run: _Run, checkpoints: tuple[int, ...], guard: CollapseGuard | None) -> None:
        self.run, self.checkpoints, self.guard = run, checkpoints, guard
        out = run.out if checkpoints or guard is not None else None  # an idle one reads and writes nothing
        self.paths = {name: (out / name if out is not None else None)
                      for name in (CHECKPOINTS_FILE, CHECKPOINT_CASES_FILE, GUARD_FILE)}
        self.done = {r["edits"]: r for r in read_jsonl(self.paths[CHECKPOINTS_FILE])}
        self.partial: dict[int, dict[str, dict]] = {}
        for r in read_jsonl(self.paths[CHECKPOINT_CASES_FILE]):
            self.partial.setdefault(r["checkpoint"], {})[str(r["case_id"])] = r["post"]
        self.probes = read_jsonl(self.paths[GUARD_FILE])
        self.bases = _bases(self.probes)  # the unedited reading of each probe window ([] until measured)
        self.base_ppl = self.bases[0] if self.bases else None
        self.latest = _latest(self.probes, guard.windows if guard is not None else 1)  # each window's last ratio
        self.seen: list[int] = []  # case indices whose chunk ran, in order
        self.applied: list[int] = []  # ... whose edit is applied
        self.refused: set[int] = set()
        self.fact_of = {str(k): _fact(c, k) for k, c in zip(run.keys, run.cases, strict=True)}

    def header(self) -> dict[str, Any]:
        """Fields for run.json: a run resumes only with the same guard (it changes which edits are kept)."""
        return {"collapse_guard": self.guard.to_dict()} if self.guard is not None else {}

    def _scored_here(self) -> list[int]:
        """The checkpoints this runner scores itself (the last one of a final-timing run is its final scoring)."""
        n = len(self.run.cases)
        return [c for c in self.checkpoints if not (c == n and self.run.eval_timing == "final")]

    def need(self, pending: list[int]) -> list[int]:
        """The cases whose unedited baseline the run needs: the pending ones and those of unfinished checkpoints."""
        todo = [c for c in self._scored_here() if c not in self.done]
        return sorted(set(pending) | set(range(max(todo, default=0))))

    def before(self) -> None:
        """Measure the unedited model's probe windows (once per run folder: a resumed run reuses them)."""
        if self.guard is None or self.base_ppl is not None:
            return
        self.bases = base_perplexities(self.run.handle, self.guard)
        self.base_ppl = self.bases[0]
        rec = {"point": "before", "perplexity": self.base_ppl, "tokens": self.guard.tokens}
        if self.guard.windows > 1:
            rec["windows"] = self.bases
        self.probes.append(rec)
        append_jsonl(self.paths[GUARD_FILE], [rec])
        if self.guard.windows > 1:
            log.info("collapse guard: unedited probe perplexity %.4g–%.4g over %d windows of %d tokens; an edit is "
                     "refused past ×%g of its window's", min(self.bases), max(self.bases), self.guard.windows,
                     self.guard.tokens, self.guard.ratio)
        else:
            log.info("collapse guard: unedited probe perplexity %.4g, limit %.4g", self.base_ppl,
                     self.guard.ratio * self.base_ppl)

    def check(self, k: int, chunk: list[int], edit: Edit | None, err: str | None) -> tuple[Edit | None, str | None]:
        """The guard on a newly applied edit: (edit, None) when kept, (None, message) when rolled back (a
        failed edit, None and its error, passes through)."""
        if self.guard is None or edit is None:
            return edit, err
        ids = [str(self.run.keys[i]) for i in chunk]
        g = self.guard
        w = k % g.windows  # by chunk index, so a resumed run probes each chunk where it would have
        base = self.bases[w]
        where = {"window": w} if g.windows > 1 else {}
        try:
            ppl = refuse_if_collapsed(self.run.handle, edit, g, base, window=w, latest=self.latest)
        except EditCollapseError as e:
            msg = f"{type(e).__name__}: {e}"
            log.warning("collapse guard, chunk %d (case(s) %s): %s", k, ", ".join(ids), e)
            got = e.data.get("perplexity")
            rec = {"chunk": k, "case_ids": ids, "perplexity": got, **where,
                   "ratio": got / base if got is not None else None, "refused": True, "edit": edit.label()}
            if g.windows > 1 and got is not None:  # the window as the model now reads it, without the edit
                rec["estimate"] = e.data.get("estimate")
                rec["ratio_after_rollback"] = self.latest[w] = probe_perplexity(self.run.handle, g, w) / base
            self.probes.append(rec)
            append_jsonl(self.paths[GUARD_FILE], [rec])
            if "perplexity" not in e.data:  # the rollback itself failed: the run cannot go on
                raise
            return None, msg
        rec = {"chunk": k, "case_ids": ids, "perplexity": ppl, **where, "ratio": ppl / base, "refused": False}
        self.latest[w] = ppl / base
        if g.windows > 1:
            rec["estimate"] = overall_ratio(self.latest, w, ppl / base)
        self.probes.append(rec)
        append_jsonl(self.paths[GUARD_FILE], [rec])
        return edit, None

    def after_chunk(self, k: int, chunk: list[int], applied: bool, err: str | None) -> None:
        """Called once per chunk, in order (also for chunks a resumed run re-applies from disk); scores a
        checkpoint that ends here."""
        self.seen.extend(chunk)
        if applied:
            self.applied.extend(chunk)
        elif err and err.startswith(EditCollapseError.__name__):
            self.refused.update(chunk)
        c = len(self.seen)
        if not self.checkpoints or c not in self._scored_here() or c in self.done:
            return
        self._score_point(c, k)

    def end_early(self, m: int, k: int) -> None:
        """The run stops after its first ``m`` cases (chunk ``k`` was the last to run: the edit budget ran out).
        Checkpoints past ``m`` are dropped and ``m`` becomes the last one, so the curves end where the editing
        did; a final-timing run's last point is its final scoring, an immediate-timing run's is scored now."""
        if not self.checkpoints:
            return
        self.checkpoints = (*(c for c in self.checkpoints if c < m), m)
        if self.run.eval_timing == "immediate" and m not in self.done:
            self._score_point(m, k)

    def _score_point(self, c: int, k: int) -> None:
        """Score every applied edit at checkpoint ``c`` (after chunk ``k``) and record the point."""
        run = self.run
        if run.drift is not None:
            run.drift.checkpoint(k, len(self.applied))
        log.info("checkpoint at %d edits: scoring the %d applied edit(s) on the model as it is now", c,
                 len(self.applied))
        scored = self.partial.setdefault(c, {})
        todo = [i for i in self.applied if str(run.keys[i]) not in scored]
        for s in range(0, len(todo), SCORE_SLICE):
            part = todo[s:s + SCORE_SLICE]
            posts, _ = run.scorer.score(run.handle, [run.cases[i] for i in part], run.sub_base(part),
                                        protocols=run.protocols, generation=run.generation)
            lines = [{"checkpoint": c, "case_id": run.keys[i], "post": {m: v.to_dict() for m, v in p.items()}}
                     for i, p in zip(part, posts, strict=True)]
            append_jsonl(self.paths[CHECKPOINT_CASES_FILE], lines)
            scored.update({str(rec["case_id"]): rec["post"] for rec in lines})
        results = [CaseResult.from_dict({"case_id": run.keys[i], "post": scored[str(run.keys[i])]})
                   for i in self.applied]
        rec = self._point(c, k, results, refused=len(self.refused), failed=c - len(self.applied) - len(self.refused),
                          source="scored", probe=self._last_probe())
        self.done[c] = rec
        append_jsonl(self.paths[CHECKPOINTS_FILE], [rec])

    def _last_probe(self) -> tuple[float, float] | None:
        """(perplexity, the guard's estimate over all its windows right after it) of the last kept probe (a
        fixed probe's estimate is its ratio); the unedited first window before any."""
        kept = [r for r in self.probes if "chunk" in r and not r.get("refused")]
        if kept:
            return kept[-1]["perplexity"], kept[-1].get("estimate") or _ratio(kept[-1], self.bases)
        return (self.base_ppl, 1.0) if self.base_ppl is not None else None

    def _point(self, c: int, k: int, results: list[CaseResult], *, refused: int, failed: int, source: str,
               probe: tuple[float, float] | None) -> dict[str, Any]:
        tenth = max(1, len(results) // 10)
        facts = [self.fact_of[str(r.case_id)] for r in results]
        last = {f: i for i, f in enumerate(facts)}
        current = [r for i, (r, f) in enumerate(zip(results, facts, strict=True)) if last[f] == i]
        parts = {"all": results, "oldest": results[:tenth], "newest": results[-tenth:],
                 "current": current} if results else {}
        return {"edits": c, "chunk": k, "applied": len(results), "refused": refused, "failed": failed,
                "tenth": tenth if results else 0, "superseded": len(results) - len(current), "source": source,
                "scores": {name: summarize(rs, "post") for name, rs in parts.items()},
                "probe_perplexity": probe[0] if probe else None, "probe_ratio": probe[1] if probe else None}

    def summary(self, results: list[CaseResult]) -> dict[str, Any]:
        """``{"lifelong": ...}`` (schema in the module docstring) from the files and the finished cases; ``{}``
        for a run without checkpoints and guard."""
        run = self.run
        if not self.checkpoints and self.guard is None:
            return {}
        points = dict(self.done)
        for c, p in points.items():  # a checkpoint scored before "current" existed: add it from its case rows
            if "current" not in p["scores"] and self.partial.get(c):
                rows = [CaseResult.from_dict({"case_id": i, "post": post}) for i, post in self.partial[c].items()]
                fresh = self._point(c, p["chunk"], rows, refused=p["refused"], failed=p["failed"],
                                    source=p["source"], probe=None)
                points[c] = {**p, "superseded": fresh["superseded"],
                             "scores": {**p["scores"], "current": fresh["scores"]["current"]}}
        n = len(run.cases)
        if n in self.checkpoints and run.eval_timing == "final":
            ok = [r for r in results if "error" not in r.info]
            refused = sum(str(r.info.get("error", "")).startswith(EditCollapseError.__name__) for r in results)
            points[n] = self._point(n, len(run.chunks()) - 1, ok, refused=refused, failed=n - len(ok) - refused,
                                    source="final records", probe=self._last_probe())
            if n not in self.done and len(results) == n:  # kept on disk: a run extended later keeps this point
                self.done[n] = points[n]
                append_jsonl(self.paths[CHECKPOINTS_FILE], [points[n]])
            points[n] = dict(points[n])  # (the drift added below is not part of the record)
        drift = run.drift.records if run.drift is not None else []
        out = _assemble(points, drift, self.probes, self.guard, self.bases, run.eval_timing)
        return {"lifelong": out}


def _fact(case: Any, key: Any) -> Any:
    """The fact a case rewrites (a case of several requests: its own key, so never superseded)."""
    return case.request.fact if hasattr(case, "request") else ("case", str(key))


def _bases(probes: list[dict[str, Any]]) -> list[float]:
    """The unedited reading of each probe window from the guard's records ([] before it was measured)."""
    before = next((r for r in probes if r.get("point") == "before"), None)
    return [] if before is None else list(before.get("windows") or [before["perplexity"]])


def _latest(probes: list[dict[str, Any]], windows: int) -> list[float]:
    """Each probe window's ratio as last read (1.0: not read since the unedited model), from the guard's
    records in order: a kept edit's probe, or the re-reading after a refused edit's rollback."""
    latest = [1.0] * windows
    for r in probes:
        w = r.get("window", 0)
        if "chunk" not in r or w >= windows:
            continue
        if not r.get("refused") and r.get("ratio") is not None:
            latest[w] = r["ratio"]
        elif r.get("ratio_after_rollback") is not None:
            latest[w] = r["ratio_after_rollback"]
    return latest


def _ratio(probe: dict[str, Any], bases: list[float]) -> float | None:
    """A probe's perplexity over its window's unedited reading (records of older runs carry no ratio)."""
    if probe.get("ratio") is not None:
        return probe["ratio"]
    if probe.get("perplexity") is None or not bases:
        return None
    return probe["perplexity"] / bases[probe.get("window", 0)]


def _assemble(points: dict[int, dict[str, Any]], drift_records: list[dict[str, Any]], probes: list[dict[str, Any]],
              guard: CollapseGuard | None, bases: list[float], eval_timing: str | None) -> dict[str, Any]:
    """``summary["lifelong"]`` from the checkpoint records, the drift points and the guard's probes."""
    drift = {r.get("chunk"): r for r in drift_records if r.get("point") != "before"}
    before = next((r for r in drift_records if r.get("point") == "before"), None)
    for p in points.values():
        d = drift.get(p["chunk"])
        p["drift"] = None if d is None or before is None else {
            "perplexity": d["scores"][PERPLEXITY]["value"], "perplexity_before": before["scores"][PERPLEXITY]["value"],
            "ratio": d["scores"][PERPLEXITY]["value"] / before["scores"][PERPLEXITY]["value"],
            "ngram_entropy": d["scores"][NGRAM_ENTROPY]["value"]}
    out: dict[str, Any] = {"schema": SCHEMA, "eval_timing": eval_timing,
                           "checkpoints": [points[c] for c in sorted(points)], "collapse_guard": None}
    if guard is not None:
        last = {r["chunk"]: r for r in probes if "chunk" in r}  # a chunk probed twice (a crash between): last try
        vals = [r["perplexity"] for r in last.values() if r.get("perplexity") is not None]
        ratios = [x for r in last.values() if (x := _ratio(r, bases)) is not None]
        base_ppl = bases[0] if bases else None
        out["collapse_guard"] = {
            **guard.to_dict(), "windows": guard.windows, "base_perplexity": base_ppl,
            "base_perplexities": bases or None,
            "limit": guard.ratio * base_ppl if base_ppl and guard.windows == 1 else None,
            "probed": len(last), "max_perplexity": max(vals) if vals else None,
            "max_ratio": max(ratios) if ratios else None,
            "estimate": overall_ratio(latest, 0, latest[0]) if (latest := _latest(probes, guard.windows)) else None,
            "refused": [{"chunk": r["chunk"], "case_ids": r["case_ids"], "edit": r.get("edit"),
                         "probe_perplexity": r["perplexity"], "probe_ratio": _ratio(r, bases)}
                        for r in last.values() if r.get("refused")]}
    return out


def progress(run_dir: str | Path) -> dict[str, Any]:
    """``summary["lifelong"]`` of a sequential run that is still running or was stopped: its finished
    checkpoints, drift points and probes as they are on disk (``lmedit.table.plots.lifelong_curves`` draws it
    as ``{"lifelong": progress(dir)}``). A final-timing run's last checkpoint appears once the run finished."""
    from ..metrics.drift import DRIFT_FILE
    from .rundir import RUN_FILE, SUMMARY_FILE

    d = Path(run_dir)
    if (d / SUMMARY_FILE).exists() and "lifelong" in (done := json.loads((d / SUMMARY_FILE).read_text())):
        return done["lifelong"]
    header = json.loads((d / RUN_FILE).read_text())
    probes = read_jsonl(d / GUARD_FILE)
    points = {r["edits"]: r for r in read_jsonl(d / CHECKPOINTS_FILE)}
    return _assemble(points, read_jsonl(d / DRIFT_FILE), probes, guard_of(header), _bases(probes),
                     header.get("eval_timing"))


def guard_of(header: dict[str, Any]) -> CollapseGuard | None:
    """The collapse guard a run was made with, from its run.json (None: it ran without one)."""
    cfg = header.get("collapse_guard")
    return CollapseGuard.from_dict(cfg) if cfg else None


def curve_lines(lifelong: dict[str, Any]) -> list[str]:
    """A markdown table of the checkpoints of ``summary["lifelong"]`` (reliability all / oldest / newest,
    locality, drift), one row per checkpoint and protocol of reliability."""
    lines = ["Retention at the checkpoints (every applied edit so far scored on the model at that point; ×100):", "",
             "| edits | applied | refused | metric | all | oldest tenth | newest tenth | latest per fact (superseded) "
             "| generalization (latest per fact) | locality | perplexity (×unedited) |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in lifelong["checkpoints"]:
        d = p.get("drift")
        ppl = f"{d['perplexity']:.2f} (×{d['ratio']:.3f})" if d else "–"
        names = sorted(m for m in p["scores"].get("all", {}) if m.startswith("reliability"))
        cur = "current" if "current" in p["scores"] else "all"  # a summary from before "current" existed
        if not names:  # no edit applied yet (all refused or failed)
            lines.append(f"| {p['edits']} | {p['applied']} | {p['refused']} | – | – | – | – | – | – | – | {ppl} |")
        for name in names:
            tag = name[len("reliability"):]
            lines.append(f"| {p['edits']} | {p['applied']} | {p['refused']} | {name} | {_cell(p, 'all', name)} | "
                         f"{_cell(p, 'oldest', name)} | {_cell(p, 'newest', name)} | {_cell(p, cur, name)} "
                         f"({p.get('superseded', 0)}) | {_cell(p, cur, 'generalization' + tag)} | "
                         f"{_cell(p, 'all', 'locality' + tag)} | {ppl} |")
    g = lifelong.get("collapse_guard")
    if g and g["base_perplexity"] is not None:
        lines += ["", guard_line(g)]
    return lines


def guard_line(g: dict[str, Any]) -> str:
    """One sentence on the collapse guard of ``summary["lifelong"]["collapse_guard"]``."""
    top = "–" if g["max_perplexity"] is None else f"{g['max_perplexity']:.4g}"
    if g.get("windows", 1) == 1:
        return (f"Collapse guard: probe perplexity on {g['tokens']} tokens, unedited {g['base_perplexity']:.4g}, "
                f"limit {g['limit']:.4g} (×{g['ratio']:g}); {g['probed']} edit(s) probed, highest {top}; "
                f"{len(g['refused'])} refused.")
    bases = g.get("base_perplexities") or [g["base_perplexity"]]
    worst = "–" if g.get("max_ratio") is None else f"×{g['max_ratio']:.3f}"
    now = "" if g.get("estimate") is None else f", estimate over all windows now ×{g['estimate']:.3f}"
    return (f"Collapse guard: probe perplexity on {g['tokens']} tokens rotating over {g['windows']} windows "
            f"({g['tokens'] * g['windows']} tokens), each against its unedited reading ({min(bases):.4g}–"
            f"{max(bases):.4g}), limit ×{g['ratio']:g}; {g['probed']} edit(s) probed, highest {worst} of its "
            f"window{now}; {len(g['refused'])} refused.")


def _cell(point: dict[str, Any], part: str, metric: str) -> str:
    got = point["scores"].get(part, {}).get(metric)
    return f"{100 * got['mean']:.1f}" if got else "–"


def lifelong_for(run: _Run, checkpoints: Any, guard: CollapseGuard | None) -> Lifelong:
    """The :class:`Lifelong` of a run, after checking its checkpoints (idle without checkpoints and guard)."""
    if checkpoints is None and guard is None:
        return Lifelong(run, (), None)
    if run.setting != "sequential":
        raise ValueError("checkpoints and the collapse guard belong to sequential runs; use setting='sequential' "
                         "(or drop them)")
    cps = check_checkpoints(checkpoints, len(run.cases), run.batch_size) if checkpoints is not None else ()
    return Lifelong(run, cps, guard)
