"""``lmedit stats``: precompute the key second moments E[k kᵀ] that ROME/MEMIT-family editors use.

One pass over the corpus serves every layer given; results are cached under ``$LMEDIT_HOME/stats`` and an
interrupted run resumes from its last saved batch.
"""

from __future__ import annotations

import argparse
import time

from ._common import DEFAULT_MODEL, quiet_libraries


def _layers(text: str) -> list[int]:
    try:
        out = []
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes integers such as 3,4,5 or 3-7, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stats", help="precompute key statistics E[k kᵀ] for locate-then-edit methods")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or directory (default {DEFAULT_MODEL})")
    p.add_argument("--layers", type=_layers, required=True, help="layers, e.g. 3,4,5,6,7 or 3-7")
    p.add_argument("--corpus", default=None, help="text file or folder of *.txt files (default: WikiText)")
    p.add_argument("--tokens", type=int, default=100_000, help="corpus tokens to read (default 100000)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..locate.stats import collect_stats
    from ..models.loading import load_model

    quiet_libraries(args)
    handle = load_model(args.model, dtype=args.dtype)
    t0 = time.perf_counter()
    stats = collect_stats(handle, args.layers, corpus=args.corpus, tokens=args.tokens, progress=True)
    seconds = time.perf_counter() - t0
    for layer, C in sorted(stats.items()):
        print(f"layer {layer}: E[k kᵀ] {tuple(C.shape)}, trace {float(C.trace()):.4g}")
    print(f"{len(stats)} layer(s) over {args.tokens} tokens in {seconds:.1f} s (cached under $LMEDIT_HOME/stats)")
    return 0
