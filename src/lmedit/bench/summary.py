"""A run's summary: per-metric means for each protocol (never mixed), Score S, counts and efficiency, and the
``table.md`` rendering of it.
"""

from __future__ import annotations

import logging
import math
import statistics
import subprocess
from pathlib import Path
from typing import Any

from ..metrics import coverage
from ..metrics.records import CaseResult, harmonic_mean, summarize

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    """The commit of the lmedit checkout this code runs from, or None (an installed copy, or no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


SCORE_S_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")
METRIC_ORDER = ("reliability", "generalization", "locality", "portability", "efficacy", "paraphrase", "neighborhood")


def build_summary(results: list[CaseResult], header: dict[str, Any]) -> dict[str, Any]:
    """Per-metric means (post and pre; refuses protocol mixes), Score S, counts and efficiency."""
    from .. import __version__

    ok = [r for r in results if "error" not in r.info]
    summary = {**header, "lmedit_version": __version__, "git_commit": git_commit(),
               "n_errors": len(results) - len(ok),
               "n_already_true": sum(bool(r.info.get("already_true")) for r in results),
               "post": summarize(ok, "post"), "pre": summarize(results, "pre")}
    if missing := coverage.missing_counts(results):
        summary["missing_protocols"] = missing  # cases not scored with these protocols: not zeros
    for which in ("post", "pre"):
        parts = [summary[which].get(m, {}).get("mean") for m in SCORE_S_PARTS]
        if all(p is not None and not math.isnan(p) for p in parts):
            summary[which]["score_s"] = {"mean": harmonic_mean(parts),
                                         "protocol": summary[which][SCORE_S_PARTS[0]]["protocol"],
                                         "cases": min(summary[which][m]["cases"] for m in SCORE_S_PARTS)}
    secs = [r.efficiency["seconds"] for r in ok if "seconds" in r.efficiency]
    rss = [r.efficiency["peak_rss_bytes"] for r in results if "peak_rss_bytes" in r.efficiency]
    cuda = [r.efficiency["cuda_peak_bytes"] for r in results if "cuda_peak_bytes" in r.efficiency]
    summary["efficiency"] = {
        "median_seconds_per_edit": statistics.median(secs) if secs else None,
        "mean_seconds_per_edit": statistics.fmean(secs) if secs else None,
        # "seconds" is per request: a case of several requests (MQuAKE) paid it once per request
        "total_edit_seconds": sum(r.efficiency.get("seconds", 0.0) * r.info.get("edits", 1) for r in results),
        "max_peak_rss_bytes": max(rss) if rss else None, "max_cuda_peak_bytes": max(cuda) if cuda else None,
    }
    return summary


def _metric_key(name: str) -> tuple[int, str]:
    for rank, prefix in enumerate(METRIC_ORDER):
        if name.startswith(prefix):
            return rank, name
    return (len(METRIC_ORDER) + (name == "score_s"), name)


def render_table(summary: dict[str, Any]) -> str:
    """A readable markdown table of a summary: metric, protocol, post ×100, pre ×100, N; then efficiency."""
    post, pre = summary["post"], summary["pre"]
    setting = summary["setting"] + (f", batch size {summary['batch_size']}" if summary["setting"] != "single" else "")
    if summary.get("eval_timing"):
        setting += f", eval timing {summary['eval_timing']}"
    data = ", ".join(f"{k}={v}" for k, v in summary.get("data", {}).items())
    lines = [f"# {summary['method']} on {summary['model']['name']}", "",
             f"Setting: {setting}. Cases: {summary['n_cases']} (errors: {summary['n_errors']}, already true "
             f"before the edit: {summary['n_already_true']}).{' Data: ' + data + '.' if data else ''}", "",
             "| metric | protocol | post ×100 | pre ×100 | N |", "|---|---|---:|---:|---:|"]
    for name in sorted(set(post) | set(pre), key=_metric_key):
        p, q = post.get(name, {}), pre.get(name, {})
        fmt = lambda s: f"{100 * s['mean']:.2f}" if s and not math.isnan(s["mean"]) else "–"  # noqa: E731
        lines.append(f"| {name} | {p.get('protocol') or q.get('protocol')} | {fmt(p)} | {fmt(q)} | "
                     f"{p.get('cases', q.get('cases', 0))} |")
    eff = summary["efficiency"]
    lines += ["", "Efficiency (editor compute only):"]
    if eff["median_seconds_per_edit"] is not None:
        lines.append(f"- seconds per edit: median {eff['median_seconds_per_edit']:.3f}, "
                     f"mean {eff['mean_seconds_per_edit']:.3f}; total {eff['total_edit_seconds']:.1f} s")
    if eff["max_peak_rss_bytes"]:
        lines.append(f"- max peak RSS: {eff['max_peak_rss_bytes'] / 2**20:,.0f} MiB")
    if eff["max_cuda_peak_bytes"]:
        lines.append(f"- max CUDA memory: {eff['max_cuda_peak_bytes'] / 2**20:,.0f} MiB")
    done = summary.get("resumed_with_cases_done")
    lines.append(f"- wall time of the run: {summary.get('wall_seconds', 0.0):.1f} s" if not done else
                 f"- wall time of the last sitting: {summary.get('wall_seconds', 0.0):.1f} s (resumed with {done} "
                 "of the cases finished; earlier sittings are not counted)")
    if b := summary.get("edit_budget"):
        lines.append(f"- stopped by the edit budget ({b['seconds']:.0f} s, {b['spent']:.0f} s spent in the last "
                     f"sitting) after {b['edits']} of the {b['asked']} edits asked for"
                     + (f"; at {b['edit_seconds_mean']:.2f} s per edit (mean) all {b['asked']} would take about "
                        f"{b['projected_seconds'] / 3600:.2f} h of editing" if b.get("projected_seconds") else ""))
    if summary.get("missing_protocols"):
        lines += ["", "Cases not scored with a protocol (left out of its means, not zeros): "
                  + ", ".join(f"{p}: {n}" for p, n in summary["missing_protocols"].items())]
    if summary.get("drift"):
        from ..metrics.drift import drift_lines

        lines += ["", *drift_lines(summary["drift"])]
    if summary.get("lifelong"):
        from .sequential import curve_lines

        lines += ["", *curve_lines(summary["lifelong"])]
    return "\n".join(lines) + "\n"
