"""Learning-curve plot of a training history (optional ``[viz]`` extra; nothing else imports matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Train/validation loss, edit accuracy and locality terms against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("edit_acc", "edit accuracy (rephrase + edit prompt)"),
              ("loc_kl", "locality KL"), ("loc_fp", "out-of-scope routed in (false positive rate)")]
    panels = [(k, t) for k, t in panels if any(f"train_{k}" in r or f"val_{k}" in r for r in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(r["step"], r[f"{split}_{key}"]) for r in history if f"{split}_{key}" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, ms=3, label=split)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
