"""Sequential runs of several methods in one figure: retention, locality and drift against edits made.

    cd benchmarks/results/lifelong_runs
    python ../../lifelong_compare.py --out ../../../docs/img/lifelong_compare_zsre.png \\
        --title "Sequential ZsRE edits on SmolLM2-135M (each run as far as it went)" \\
        kv-memory=kv-memory-zsre-n998 GRACE=grace-zsre-n998 AlphaEdit=alphaedit-zsre-n998-partial \\
        MEMIT=memit-zsre-n598 WISE=wise-zsre-n114 "LoRA, one FFN=lora-ffn19-zsre-n196"

Each argument is LABEL=RUN_DIR, a folder of `lmedit bench --setting sequential --checkpoints ...` (finished or
stopped: its finished checkpoints are read with `lmedit.bench.sequential.progress`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmedit.bench.sequential import progress
from lmedit.table.plots import lifelong_comparison


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    runs = {}
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            ap.error(f"{item!r}: write LABEL=RUN_DIR with an existing run folder")
        runs[label] = progress(folder)
    print(lifelong_comparison(runs, args.out, args.title))


if __name__ == "__main__":
    main()
