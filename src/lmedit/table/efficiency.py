"""Efficiency numbers of a cell, from the per-case records of :func:`lmedit.bench.run_benchmark`.

Per case the benchmark records ``seconds`` (the editor's ``compute`` wall-clock divided by the requests in
that edit: time per edit, scoring excluded), ``peak_rss_bytes`` (process RSS peak during the compute) and,
on CUDA, ``cuda_peak_bytes``. A cell's canonical numbers (what efficiency.md and the plot read):

- ``seconds_per_edit``: mean of the per-case ``seconds``; ``median_seconds_per_edit`` as well;
- ``peak_memory_bytes``: the largest CUDA peak when there is one, else the largest RSS peak (``memory_kind``
  says which);
- ``one_off_seconds``: one-time costs a method reports in its edit statistics (``info["stats"]`` keys
  ending in ``_seconds``, e.g. covariance statistics or index building), each counted once (its largest
  value over the cell), also listed as ``one_off:<name>``. Methods that report none get no entry;
- ``reused_edits``: cases whose edit another cell had computed (:mod:`lmedit.bench.stores`); their
  ``seconds`` are what computing it cost there, so time per edit does not depend on the reuse, while the
  cell's ``benchmark_wall_seconds`` shows the time it saved.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..metrics.efficiency import human_bytes


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _values(results: list[Any], key: str) -> list[float]:
    return [x for x in (_num(r.efficiency.get(key)) for r in results if "error" not in r.info) if x is not None]


def _one_off(results: list[Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    for r in results:
        stats = r.info.get("stats") if isinstance(r.info, dict) else None
        for k, v in (stats or {}).items():
            x = _num(v)
            if x is not None and k.endswith("_seconds"):
                found[k] = max(found.get(k, 0.0), x)  # paid once: repeated in later edits' stats at most
    return found


def efficiency_stats(results: list[Any], summaries: list[dict[str, Any]] | None = None,
                     training_seconds: float | None = None) -> dict[str, Any]:
    """Canonical efficiency numbers of one cell (see the module docstring); ``training_seconds`` (a trained
    editor's recorded training time) joins the one-off costs."""
    out: dict[str, Any] = {}
    secs = _values(results, "seconds")
    if secs:
        out["seconds_per_edit"] = statistics.fmean(secs)
        out["median_seconds_per_edit"] = statistics.median(secs)
        out["total_edit_seconds"] = sum(secs)
    if reused := sum(bool(r.efficiency.get("reused_edit")) for r in results):
        out["reused_edits"] = reused
    cuda, rss = _values(results, "cuda_peak_bytes"), _values(results, "peak_rss_bytes")
    if cuda:
        out["peak_memory_bytes"], out["memory_kind"] = max(cuda), "cuda_max_allocated"
    elif rss:
        out["peak_memory_bytes"], out["memory_kind"] = max(rss), "cpu_peak_rss"
    one_off = _one_off(results)
    if training_seconds is not None:  # paid before any edit: apart from the per-edit time
        one_off["training_seconds"] = training_seconds
    for k, v in one_off.items():
        out[f"one_off:{k}"] = v
    if one_off:
        out["one_off_seconds"] = sum(one_off.values())
    walls = [_num(s.get("wall_seconds")) for s in summaries or []]
    if walls and all(w is not None for w in walls):
        out["benchmark_wall_seconds"] = sum(walls)  # type: ignore[arg-type]
    elif results and len(case_walls := _values(results, "wall_seconds")) == len(results):
        out["benchmark_wall_seconds"] = sum(case_walls)  # multi-hop cells time each case themselves
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def method_summary(cells: list[Any], rows: list[Any], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: seconds per edit (mean over its cells), one-off seconds and peak memory (max over cells),
    and mean quality = mean of its ``token_acc`` table values (R/G/L/P; other protocols are not mixed in)."""
    out = []
    for m in methods:
        ok = [c for c in cells if c.spec.method == m and c.status == "ok"]
        # median per cell: the first edit may carry a warm-up the method does not report (loading an
        # embedder, building an index, collecting statistics), which would dominate a 5-case mean
        spe = {c.spec.dataset: c.efficiency.get("median_seconds_per_edit", c.efficiency["seconds_per_edit"])
               for c in ok if "seconds_per_edit" in c.efficiency}
        means = [c.efficiency["seconds_per_edit"] for c in ok if "seconds_per_edit" in c.efficiency]
        one_off = [c.efficiency["one_off_seconds"] for c in ok if "one_off_seconds" in c.efficiency]
        parts: dict[str, float] = {}
        for c in ok:
            for k, v in c.efficiency.items():
                if k.startswith("one_off:") and isinstance(v, int | float):
                    parts[k.removeprefix("one_off:")] = max(parts.get(k.removeprefix("one_off:"), 0.0), v)
        peaks = [c.efficiency["peak_memory_bytes"] for c in ok if "peak_memory_bytes" in c.efficiency]
        quality = [r.values[m] for r in rows if r.protocol == "token_acc" and r.values.get(m) is not None]
        walls = [c.efficiency["benchmark_wall_seconds"] for c in ok if "benchmark_wall_seconds" in c.efficiency]
        out.append({"method": m, "cells_ok": len(ok), "seconds_per_edit": _mean(list(spe.values())),
                    "wall_seconds": sum(walls) if walls else None,
                    "reused_edits": sum(c.efficiency.get("reused_edits", 0) for c in ok),
                    "mean_seconds_per_edit": _mean(means),
                    "seconds_per_edit_by_dataset": spe, "one_off_seconds": max(one_off) if one_off else None,
                    "one_off_parts": parts,
                    "peak_memory_bytes": max(peaks) if peaks else None,
                    "mean_quality": _mean(quality), "quality_values": len(quality)})
    return out




def _secs(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _fmt_one_off(s: dict[str, Any]) -> str:
    if s["one_off_seconds"] is None:
        return "-"
    parts = ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {_secs(v)}"
                      for k, v in s["one_off_parts"].items())
    return f"{_secs(s['one_off_seconds'])} ({parts})" if parts else _secs(s["one_off_seconds"])


def efficiency_markdown(summary: list[dict[str, Any]], datasets: list[str], meta: dict[str, Any]) -> str:
    """efficiency.md: time per edit (per dataset and mean), one-off costs, peak memory, mean quality."""
    head = ["Method", "s/edit (median)", "s/edit (mean)", *[f"s/edit {d}" for d in datasets], "one-off (s)",
            "peak memory", "cells' wall (min)",
            "mean quality (token_acc, x100)"]
    lines = [f"# Efficiency on {meta['model']}", "",
             f"Setting: {meta['setting_label']}; device: {meta.get('device', 'cpu')}; torch threads: "
             f"{meta.get('threads', '?')}"
             f"{f' per process, {w} worker processes' if (w := meta.get('workers') or 1) > 1 else ''}. "
             "Time per edit is the wall-clock of the edit computation only "
             "(scoring excluded); the per-dataset and plotted values are medians, as a first edit may carry an "
             "unreported warm-up (a mean far above the median shows one). One-off costs (statistics, training) "
             "are counted once, not per edit. Peak "
             "memory during editing: the process's peak RSS on CPU (it includes the model itself), "
             "torch.cuda.max_memory_allocated on CUDA; n/a when none was reported.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summary:
        by = s["seconds_per_edit_by_dataset"]
        q = s["mean_quality"]
        vals = [s["method"], _secs(s["seconds_per_edit"]), _secs(s["mean_seconds_per_edit"]),
                *[_secs(by.get(d)) for d in datasets],
                _fmt_one_off(s),
                human_bytes(s["peak_memory_bytes"]),
                "n/a" if s["wall_seconds"] is None else f"{s['wall_seconds'] / 60:.1f}",
                "n/a" if q is None else f"{100 * q:.1f}"]
        lines.append("| " + " | ".join(vals) + " |")
    walls = [s["wall_seconds"] for s in summary if s["wall_seconds"] is not None]
    if walls:
        lines += ["", f"Cells' wall time: {sum(walls) / 3600:.2f} h in all (each cell's cases, edit and scoring, "
                      "timed where they ran; cases a cell took from an earlier run with --reuse are not counted; "
                      "cells that ran side by side in worker processes overlap)."]
    if reused := sum(s.get("reused_edits", 0) for s in summary):
        lines += ["", f"{reused} edit(s) were computed once and reused by another cell that edits the same fact "
                      "(the same method, config and model; e.g. a ZsRE-portability case that is also a ZsRE case): "
                      "their time per edit is what computing them cost; the cells' wall time is what they took."]
    return "\n".join(lines) + "\n"
