"""``lmedit rescore``: recompute a run's generation scores from the texts it kept (no model), optionally
with an LLM judge."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_judge_args, make_judge


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rescore", help="rescore a run's generated answers without the model",
                              description="Recompute the generation protocol's scores (gen_em, gen_f1, "
                                          "gen_contains) of an lmedit bench output folder from the texts in its "
                                          "cases.jsonl; with --judge, add an LLM judge's verdicts (gen_judge). "
                                          "Rewrites cases.jsonl, summary.json and table.md.")
    p.add_argument("run", metavar="DIR", help="an lmedit bench output folder")
    add_judge_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.rescore import rescore_run

    out = Path(args.run)
    rescore_run(out, judge=make_judge(args, out))
    print((out / "table.md").read_text().rstrip())
    return 0
