"""The gap between teacher-forced and generation-scored editing, per method, from finished `lmedit bench` runs.

Reads each run folder's summary.json and writes one markdown table (teacher forced next to generation
scored Reliability / Generalization / Locality, each tagged) and a figure of the gap per method and dataset.
A folder written by `lmedit table --out OUT` stands for the runs of all its single-edit cells
(``OUT/cells/<method>__<dataset>/run-000``).

    python benchmarks/eval_gap.py RUN_DIR... --out benchmarks/results/eval_gap.md --figure docs/img/eval_gap.png
    python benchmarks/eval_gap.py results/table1 --out benchmarks/results/eval_gap_table.md \
        --figure docs/img/eval_gap_table.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("reliability", "token_acc"), ("reliability@gen_em", "gen_em"), ("reliability@gen_contains", "gen_contains"),
           ("generalization", "token_acc"), ("generalization@gen_em", "gen_em"),
           ("generalization@gen_contains", "gen_contains"),
           ("locality", "token_acc"), ("locality@gen_em", "gen_em"), ("locality_truth@gen_em", "gen_em")]
HEADER = ("| method | dataset | N | Rel. TF | Rel. gen EM | Rel. gen contains | Gen. TF | Gen. gen EM | "
          "Gen. gen contains | Loc. TF | Loc. gen EM (= unedited answer) | Loc. gen EM (ground truth) |")


def read(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    data = s.get("data") or {}
    dataset = data.get("dataset") or (data.get("cell") or {}).get("dataset", "?")  # bench run / table cell
    row = {"method": s["method"], "dataset": dataset, "n": s["n_cases"],
           "pre": s["pre"]}
    for key, tag in COLUMNS:
        stat = s["post"].get(key)
        if stat is not None and stat["protocol"] != tag:
            raise ValueError(f"{run}: {key} has protocol {stat['protocol']}, expected {tag}")
        row[key] = None if stat is None else stat["mean"]
    return row


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def figure(rows: list[dict], path: Path) -> None:
    """One row of panels per dataset (Reliability, Generalization), one group of three bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 3.2 * len(datasets) + 0.6), sharey=True, squeeze=False)
    for (ax_rel, ax_gen), dataset in zip(axes, datasets, strict=True):
        mine = [r for r in rows if r["dataset"] == dataset]
        for ax, metric in ((ax_rel, "reliability"), (ax_gen, "generalization")):
            xs = range(len(mine))
            for off, (key, name) in zip((-0.27, 0, 0.27), ((metric, "teacher forced (token_acc)"),
                                                             (f"{metric}@gen_contains", "generated, gold contained"),
                                                             (f"{metric}@gen_em", "generated, exact match")),
                                        strict=True):
                ax.bar([x + off for x in xs], [100 * (r[key] or 0) for r in mine], width=0.27, label=name)
            ax.set_xticks(list(xs))
            ax.set_xticklabels([r["method"] for r in mine], fontsize=8, rotation=30 if len(mine) > 6 else 0)
            ax.set_title(f"{dataset}: {metric}", fontsize=10)
            ax.set_ylim(0, 105)
        ax_rel.set_ylabel("x100")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle("SmolLM2-135M, single edits: what teacher forcing reports vs what the edited model says")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_folders(paths: list[Path]) -> list[Path]:
    """Each path, or for an `lmedit table` output folder, its single-edit cells' runs (method, dataset order)."""
    out = []
    for p in paths:
        out += sorted(p.glob("cells/*/run-000")) if (p / "cells").is_dir() else [p]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_gap.md")
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args()
    rows = [read(r) for r in run_folders(args.runs) if (r / "summary.json").exists()]
    lines = ["# Teacher forcing vs generation, per method", "",
             "From `lmedit bench` runs (single edits, SmolLM2-135M-Instruct, first N cases; both protocols "
             "computed in the same run on the same edits). Values x100. TF = teacher-forced token accuracy "
             "(`token_acc`); gen EM = normalised exact match of the greedy answer's first line (`gen_em`); "
             "gen contains = the gold occurs in it (`gen_contains`).", "", HEADER, "|---|---|---:|" + "---:|" * 9]
    for r in rows:
        cells = " | ".join(fmt(r[k]) for k, _ in COLUMNS)
        lines.append(f"| {r['method']} | {r['dataset']} | {r['n']} | {cells} |")
    lines += ["", "Unedited model (pre-edit) on the same cases: " + "; ".join(
        f"{r['dataset']} rel. TF {fmt((r['pre'].get('reliability') or {}).get('mean'))}, gen EM "
        f"{fmt((r['pre'].get('reliability@gen_em') or {}).get('mean'))}"
        for r in {r['dataset']: r for r in rows}.values())
        + "."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
