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
    end = (s.get("config") or {}).get("answer_end")
    method = s["method"] + (f" + answer_end {end!r}" if end else "")
    row = {"method": method, "dataset": dataset, "n": s["n_cases"],
           "pre": s["pre"]}
    for key, tag in COLUMNS:
        stat = s["post"].get(key)
        if stat is not None and stat["protocol"] != tag:
            raise ValueError(f"{run}: {key} has protocol {stat['protocol']}, expected {tag}")
        row[key] = None if stat is None else stat["mean"]
    return row


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


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
             "gen contains = the gold occurs in it (`gen_contains`).", "", "<!-- --8<-- [start:table] -->", HEADER,
             "|---|---|---:|" + "---:|" * 9]
    for r in rows:
        cells = " | ".join(fmt(r[k]) for k, _ in COLUMNS)
        lines.append(f"| {r['method']} | {r['dataset']} | {r['n']} | {cells} |")
    lines += ["<!-- --8<-- [end:table] -->", "", "Unedited model (pre-edit) on the same cases: " + "; ".join(
        f"{r['dataset']} rel. TF {fmt((r['pre'].get('reliability') or {}).get('mean'))}, gen EM "
        f"{fmt((r['pre'].get('reliability@gen_em') or {}).get('mean'))}"
        for r in {r['dataset']: r for r in rows}.values())
        + "."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if args.figure:
        from lmedit.table.plots import gap

        gap(rows, args.figure, "SmolLM2-135M, single edits: what teacher forcing reports vs what the edited model says")


if __name__ == "__main__":
    main()
