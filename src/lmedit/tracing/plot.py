"""Heatmaps of causal traces in the style of ROME's figures (needs the optional ``viz`` extra: matplotlib).

Rows are the prompt's tokens (subject tokens marked ``*``), columns are layers (for MLP/attention: the centre
of the restored window); colour maps Purples / Greens / Reds for hidden states / MLP / attention, with the
colour floor at the corrupted probability. Figures are drawn on the Agg canvas without pyplot, so no global
backend is touched and nothing opens a window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .aggregate import CATEGORIES, AverageEffect
from .causal import TraceResult

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
NAMES = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}
LINE_COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'lmedit[viz]'") from None
    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, formats: Sequence[str]) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, bbox_inches="tight")
        out.append(target)
    return out


def _token_labels(result: TraceResult) -> list[str]:
    b, e = result.subject_range
    return [repr(t)[1:-1] + ("*" if b <= i < e else "") for i, t in enumerate(result.tokens)]


def _layer_ticks(ax: Any, n_layers: int) -> None:
    step = 5 if n_layers > 12 else 1
    ticks = list(range(0, n_layers, step))
    ax.set_xticks([0.5 + i for i in ticks])
    ax.set_xticklabels([str(i) for i in ticks])


def draw_trace(ax: Any, result: TraceResult, *, title: str | None = None, model_name: str | None = None) -> Any:
    """Draw one trace on a matplotlib Axes; returns the mesh (for a colour bar)."""
    scores = np.ma.masked_invalid(result.scores)  # untraced rows stay blank
    mesh = ax.pcolormesh(scores, cmap=CMAPS[result.kind], vmin=result.low_score,
                         vmax=max(float(np.nanmax(result.scores)), result.low_score + 1e-9))
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(result.tokens))])
    ax.set_yticklabels(_token_labels(result), fontsize=7)
    _layer_ticks(ax, result.n_layers)
    ax.tick_params(axis="x", labelsize=7)
    name = NAMES[result.kind]
    ax.set_title(title or f"Impact of restoring {name} after corrupted input", fontsize=8)
    if result.kind == "hidden":
        ax.set_xlabel(f"single restored layer within {model_name or 'the model'}", fontsize=7)
    else:
        ax.set_xlabel(f"center of interval of {result.window} restored {name} layers", fontsize=7)
    return mesh


def _colorbar(fig: Any, mesh: Any, ax: Any, label: str) -> None:
    cb = fig.colorbar(mesh, ax=ax)
    cb.formatter.set_useOffset(False)  # an offset label would overlap the title on near-flat tables
    cb.update_ticks()
    cb.ax.tick_params(labelsize=6)
    cb.ax.set_title(label, fontsize=7, y=-0.12)


def plot_trace(result: TraceResult, path: str | Path, *, formats: Sequence[str] = ("png", "svg"),
               title: str | None = None, model_name: str | None = None) -> list[Path]:
    """One heatmap (ROME Fig. 1 panel); writes ``path`` with each suffix in ``formats``."""
    fig = _figure(3.8, 0.25 * len(result.tokens) + 1.2)
    ax = fig.add_subplot()
    mesh = draw_trace(ax, result, title=title, model_name=model_name)
    _colorbar(fig, mesh, ax, f"p({result.answer.strip()})")
    return _save(fig, path, formats)


def plot_trace_all(results: dict[str, TraceResult], path: str | Path, *, formats: Sequence[str] = ("png", "svg"),
                   model_name: str | None = None) -> list[Path]:
    """The three kinds side by side (hidden / MLP / attention)."""
    kinds = [k for k in ("hidden", "mlp", "attn") if k in results]
    n_tokens = len(results[kinds[0]].tokens)
    fig = _figure(3.9 * len(kinds), 0.25 * n_tokens + 1.4)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        res = results[kind]
        mesh = draw_trace(ax, res, model_name=model_name)
        _colorbar(fig, mesh, ax, f"p({res.answer.strip()})")
    fig.tight_layout()
    return _save(fig, path, formats)


def plot_average(averages: AverageEffect | Sequence[AverageEffect], path: str | Path, *,
                 formats: Sequence[str] = ("png", "svg"), model_name: str | None = None) -> list[Path]:
    """Average indirect effect by token category: a heatmap per kind and, below, the last-subject-token curve."""
    avgs = [averages] if isinstance(averages, AverageEffect) else list(averages)
    fig = _figure(3.9 * len(avgs), 4.2)
    axes = fig.subplots(2, len(avgs), squeeze=False, gridspec_kw={"height_ratios": [1.2, 1]})
    for col, avg in enumerate(avgs):
        ax, line_ax = axes[0, col], axes[1, col]
        effects = np.ma.masked_invalid(avg.effects)
        mesh = ax.pcolormesh(effects, cmap=CMAPS[avg.kind], vmin=min(0.0, float(np.nanmin(avg.effects))))
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(len(CATEGORIES))])
        ax.set_yticklabels([f"{c} ({n})" for c, n in zip(CATEGORIES, avg.counts, strict=True)], fontsize=6)
        _layer_ticks(ax, avg.n_layers)
        ax.tick_params(axis="x", labelsize=6)
        who = f" in {model_name}" if model_name else ""
        ax.set_title(f"Average indirect effect of {NAMES[avg.kind]}{who}\n"
                     f"over {avg.n_facts} facts (skipped {avg.n_skipped})", fontsize=7)
        _colorbar(fig, mesh, ax, "AIE")
        for cat, style in (("last subject token", "-"), ("last token", "--")):
            row = avg.effects[CATEGORIES.index(cat)]
            line_ax.plot(np.arange(avg.n_layers), row, style, color=LINE_COLOURS[avg.kind], label=cat)
        line_ax.axhline(0, color="grey", lw=0.5)
        line_ax.set_xlabel("layer" if avg.kind == "hidden" else f"center of {avg.window}-layer window", fontsize=7)
        line_ax.set_ylabel("AIE", fontsize=7)
        line_ax.tick_params(labelsize=6)
        line_ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path, formats)
