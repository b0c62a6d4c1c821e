"""Figures for the table: grouped bars per dataset and metric, quality against time per edit, and the gap
between teacher-forced and generated scores per method.

matplotlib is an optional extra (``pip install lmedit[viz]``); it is imported here, on first use, with the
non-interactive Agg backend so plotting works without a display.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'lmedit[viz]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def bars(rows: list[Any], methods: list[str], path: Path, title: str) -> Path:
    """table1.png: one panel per dataset; in it one group of bars per metric, one bar per method (x100)."""
    plt = _pyplot()
    from .layout import DATASET_LABELS

    datasets = list(dict.fromkeys(r.dataset for r in rows)) or ["(none)"]
    widths = [max(1, sum(r.dataset == ds for r in rows)) for ds in datasets]  # panel width ~ its metrics
    fig, axes = plt.subplots(1, len(datasets), figsize=(1.6 * sum(widths) + 2.5, 4.2), squeeze=False,
                             sharey=True, gridspec_kw={"width_ratios": widths})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    width = 0.8 / max(1, len(methods))
    for ax, ds in zip(axes[0], datasets, strict=False):
        ds_rows = [r for r in rows if r.dataset == ds]
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(ds_rows))]
            ys = [100 * r.values[m] if r.values.get(m) is not None else 0.0 for r in ds_rows]
            ax.bar(xs, ys, width, color=cmap(j % cmap.N), label=m)
            for x, y, r in zip(xs, ys, ds_rows, strict=True):
                if r.values.get(m) is None:  # a cell that could not run: mark it instead of a zero bar
                    ax.text(x, 1, "-", ha="center", va="bottom", fontsize=8, color="grey")
                elif len(methods) <= 4:  # few bars: print the value (a 0.0 bar is otherwise invisible)
                    ax.text(x, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ds_rows)))
        ax.set_xticklabels([r.label for r in ds_rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(DATASET_LABELS.get(ds, ds), fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("score (x100)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gap(entries: list[dict[str, Any]], path: Path, title: str) -> Path:
    """gap.png: one row of panels per dataset (Reliability, Generalization); per method three bars, teacher
    forced, generated with the answer contained, generated exact match (x100). ``entries``: one dict per
    (dataset, method) with "method", "dataset" and metric keys ("reliability", "reliability@gen_em", ...)."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(e["dataset"] for e in entries)) or ["(none)"]
    most = max([sum(e["dataset"] == ds for e in entries) for ds in datasets] + [1])
    fig, axes = plt.subplots(len(datasets), 2, figsize=(max(8.0, 1.1 * most + 3), 3.0 * len(datasets) + 0.7),
                             sharey=True, squeeze=False)
    bars_ = (("", "teacher forced (token_acc)"), ("@gen_contains", "generated, answer contained (gen_contains)"),
             ("@gen_em", "generated, exact match (gen_em)"))
    for row_axes, ds in zip(axes, datasets, strict=True):
        mine = [e for e in entries if e["dataset"] == ds]
        for ax, metric in zip(row_axes, ("reliability", "generalization"), strict=True):
            for k, (tag, name) in enumerate(bars_):
                ys = [100 * (e.get(metric + tag) or 0.0) for e in mine]
                ax.bar([i + (k - 1) * 0.27 for i in range(len(mine))], ys, 0.27, label=name)
            ax.set_xticks(range(len(mine)))
            ax.set_xticklabels([e["method"] for e in mine], fontsize=8, rotation=30 if len(mine) > 6 else 0)
            ax.set_title(f"{ds}: {metric}", fontsize=10)
            ax.set_ylim(0, 105)
            ax.grid(axis="y", alpha=0.3)
        row_axes[0].set_ylabel("x100")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter(summary: list[dict[str, Any]], path: Path, title: str) -> Path:
    """efficiency.png: mean quality (token_acc, x100) against seconds per edit (log x axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    pts = [(s["method"], s["seconds_per_edit"], s["mean_quality"]) for s in summary
           if s["seconds_per_edit"] and s["mean_quality"] is not None and s["seconds_per_edit"] > 0]
    for i, (name, x, y) in enumerate(sorted(pts, key=lambda p: (p[2], p[1]))):
        ax.scatter([x], [100 * y], s=40)
        # stagger labels so methods with close scores stay readable
        ax.annotate(name, (x, 100 * y), textcoords="offset points", xytext=(6, -10 + 9 * (i % 3)), fontsize=8)
    if pts:
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _: f"{v:g}")
        # minor ticks: only 2x and 5x get a label, so they never crowd the decade labels
        sparse = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5)
                               else "")
        lo = min(x for _, x, _ in pts)
        hi = max(x for _, x, _ in pts)
        ax.set_xscale("log")
        ax.set_xlim(10 ** (math.floor(math.log10(lo) * 2) / 2 - 0.25), 10 ** (math.ceil(math.log10(hi) * 2) / 2 + 0.25))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(sparse)
        ax.tick_params(axis="x", which="minor", labelsize=7)
    else:
        ax.text(0.5, 0.5, "no method reported both time and quality", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, 105)
    ax.set_xlabel("seconds per edit (log scale)")
    ax.set_ylabel("mean quality (token_acc rows, x100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lifelong_curves(summary: dict[str, Any], path: Path, title: str | None = None) -> Path:
    """lifelong.png of a sequential run with checkpoints (``summary["lifelong"]``): left, reliability of all
    edits so far and of the oldest / newest tenth, and locality (x100), teacher-forced and by generation (exact
    match); right, perplexity over the unedited model's (drift corpus, and the collapse guard's probe), both
    against the number of edits."""
    plt = _pyplot()
    points = summary["lifelong"]["checkpoints"]
    if not points:
        raise ValueError("the run has no finished checkpoint to plot")
    x = [p["edits"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = ("reliability", "reliability@gen_em")  # teacher forcing and the generation protocol's headline
    names = sorted({m for p in points for m in p["scores"].get("all", {}) if m in shown})
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        suffix = name[len("reliability"):]
        label = suffix.lstrip("@:_") or points[0]["scores"]["all"][name]["protocol"]
        for part, style in (("all", "-"), ("oldest", ":"), ("newest", "--"), ("current", "-.")):
            if not any(part in p["scores"] for p in points):  # "current": the latest edit of each fact
                continue
            ys = [100 * p["scores"][part][name]["mean"] if name in p["scores"].get(part, {}) else math.nan
                  for p in points]
            left.plot(x, ys, style, marker="D" if part == "current" else "o", color=cmap(j),
                      label=f"reliability {label} ({'latest per fact' if part == 'current' else part})")
        loc = "locality" + suffix
        ys = [100 * p["scores"]["all"][loc]["mean"] if loc in p["scores"].get("all", {}) else math.nan for p in points]
        if all(math.isnan(y) for y in ys):
            continue
        left.plot(x, ys, "-.", marker="s", color=cmap(j), alpha=0.6, label=f"locality {label}")
    left.set_ylim(0, 105)
    left.set_ylabel("score (x100)")
    left.set_title("retention: every edit so far, scored at the checkpoint", fontsize=9)
    drift = [(p["edits"], p["drift"]["ratio"]) for p in points if p.get("drift")]
    guard = summary["lifelong"].get("collapse_guard") or {}
    probe = [(p["edits"], p.get("probe_ratio") or p["probe_perplexity"] / guard["base_perplexity"]) for p in points
             if p.get("probe_ratio") or (p.get("probe_perplexity") and guard.get("base_perplexity"))]
    for series, label, marker in ((drift, "perplexity / unedited (drift corpus)", "o"),
                                  (probe, "probe perplexity / unedited (guard)", "^")):
        if series:
            right.plot([a for a, _ in series], [b for _, b in series], marker=marker, label=label)
    if guard.get("ratio"):
        right.axhline(guard["ratio"], color="red", linestyle=":", label=f"collapse guard limit (x{guard['ratio']:g})")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("perplexity ratio")
    right.set_title("capability drift", fontsize=9)
    for ax in (left, right):
        if len(x) > 1 and x[-1] / x[0] >= 10:
            ax.set_xscale("log")
        ax.set_xlabel("edits made")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    model = summary.get("model", {}).get("name", "")
    fig.suptitle(title or f"{summary.get('method', '')} on {model}, sequential ({summary['lifelong']['eval_timing']} "
                          f"timing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lifelong_comparison(runs: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """One figure for several sequential runs (label -> ``summary["lifelong"]`` or
    ``lmedit.bench.sequential.progress(dir)``), against the number of edits asked for: the latest edit of each
    fact's reliability and locality (teacher-forced solid, generated exact match dashed; a checkpoint scored
    before "latest per fact" existed falls back to every edit), and perplexity over the unedited model's."""
    plt = _pyplot()
    if not runs or not any(life.get("checkpoints") for life in runs.values()):
        raise ValueError("no run with a finished checkpoint to plot")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    cmap = plt.get_cmap("tab10")
    handles = []
    for j, (label, life) in enumerate(runs.items()):
        points = life.get("checkpoints") or []
        x = [p["edits"] for p in points]
        color = cmap(j % 10)
        for ax, metric in zip(axes[:2], ("reliability", "locality"), strict=True):
            for suffix, style in (("", "-"), ("@gen_em", "--")):
                ys = [_latest_score(p["scores"], metric + suffix) for p in points]
                if not all(math.isnan(y) for y in ys):
                    ax.plot(x, ys, style, marker="o", color=color)
        drift = [(p["edits"], p["drift"]["ratio"]) for p in points if p.get("drift")]
        if drift:
            axes[2].plot([a for a, _ in drift], [b for _, b in drift], marker="o", color=color)
        handles.append(plt.Line2D([], [], color=color, marker="o", label=label))
    handles += [plt.Line2D([], [], color="black", linestyle="-", label="teacher-forced"),
                plt.Line2D([], [], color="black", linestyle="--", label="generated, exact match")]
    for ax, name in zip(axes, ("reliability, latest edit of each fact (x100)", "locality (x100)",
                               "perplexity / unedited (drift corpus)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("edits asked (refused ones included)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylim(0, 105)
    axes[1].set_ylim(0, 105)
    axes[2].axhline(1.0, color="grey", linewidth=0.8)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latest_score(scores: dict[str, Any], name: str) -> float:
    for part in ("current", "all"):
        if name in scores.get(part, {}):
            return 100 * scores[part][name]["mean"]
    return math.nan

