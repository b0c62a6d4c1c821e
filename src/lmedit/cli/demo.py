"""``lmedit demo``: rewrite one fact in SmolLM2, show it worked, measure it, and undo it bit-exactly."""

from __future__ import annotations

import argparse
import sys
import time

from ._common import DEFAULT_MODEL, human_bytes, quiet_libraries

LABELS = {"reliability": "Reliability", "generalization": "Generalization", "locality": "Locality"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="edit one fact in a small model, evaluate it and revert it",
                              description="Rewrite 'The mother tongue of Danielle Darrieux is French' to English, "
                                          "show continuations and scores, then revert the edit.")
    p.add_argument("--method", help="editing method (default: the best one available, see `lmedit methods`)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or directory (default {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per continuation")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..demo import DEMO_CASE, run_demo

    quiet_libraries(args, quiet_lmedit=True)
    t0 = time.perf_counter()
    rep = run_demo(args.model, args.method, max_new_tokens=args.max_new_tokens, on_step=_say)
    total = time.perf_counter() - t0

    how = " (converted from GGUF this run; cached for next time)" if rep.converted else ""
    print(f"\nModel   {rep.model}, loaded in {rep.load_seconds:.1f} s{how}")
    req = DEMO_CASE.request
    print(f"Edit    {req.text!r}: {req.target_true!r} -> {req.target_new!r}, with {rep.method}\n")
    width = max(len(c.label) for c in rep.continuations)
    for c in rep.continuations:
        print(f"  {c.label:<{width}}  {c.prompt!r}")
        print(f"  {'':<{width}}    before: {c.before!r}")
        print(f"  {'':<{width}}    after:  {c.after!r}")
    for protocol, title in (("", "teacher-forced token accuracy"),
                            ("@gen_em", "the generated answer, exact match, no teacher forcing")):
        print(f"\nScores ({title}, before -> after the edit)")
        for name, (pre, post) in rep.scores.items():
            metric, _, tag = name.partition("@")
            if ("@" + tag if tag else "") != protocol:
                continue
            local = metric == "locality"
            before = "   " if local or pre is None else f"{pre:.2f}"
            note = ("  (agreement with the unedited model)" if not tag else "  (same answer as the unedited "
                    "model)") if local else ""
            print(f"  {LABELS.get(metric, metric):<15} {before} {'  ' if local else '->'} {post:.2f}{note}")
    mem = human_bytes(rep.peak_rss_bytes)
    if rep.cuda_peak_bytes:
        mem += f", GPU peak {human_bytes(rep.cuda_peak_bytes)}"
    print(f"\nCost    edit computed in {rep.compute_seconds:.1f} s, peak memory (RSS) {mem}")
    if rep.first_use_seconds is not None:
        print(f"        + {rep.first_use_seconds:.1f} s of one-time statistics on first use (cached now)")
    verdict = "every weight is bit-identical to before" if rep.restored else "WEIGHTS DIFFER FROM BEFORE"
    print(f"Revert  {verdict} (state digest {rep.digest_before} -> {rep.digest_after})")
    print(f"\nTotal   {total:.1f} s")
    return 0 if rep.restored else 1
