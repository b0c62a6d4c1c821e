"""Figures for the table: grouped bars per dataset and metric, and quality against time per edit.

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
