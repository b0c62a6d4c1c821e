"""``lmedit trace``: causal tracing of one fact, or the average over known facts, with heatmaps.

    lmedit trace --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" \
        --kind all --out runs/trace
    lmedit trace --batch known --n 50 --kind mlp --out runs/trace-avg

``--model`` defaults to smollm2-135m, as in the other subcommands.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from ._common import DEFAULT_MODEL


def register(subparsers) -> None:
    p = subparsers.add_parser("trace", help="causal tracing (ROME): where does the model recall a fact?",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or directory (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", help="prompt containing the subject (or a {} slot for it)")
    p.add_argument("--subject", help="the subject substring whose embeddings are corrupted")
    p.add_argument("--answer", help="trace p(first token of this answer) (default: the model's top token)")
    p.add_argument("--kind", default="all", choices=["hidden", "mlp", "attn", "all"], help="what is restored")
    p.add_argument("--samples", type=int, default=10, help="corrupted rows per restoration (S)")
    p.add_argument("--noise", default=None, help="noise scale: a number, or s<k> = k x subject std (default s3)")
    p.add_argument("--window", type=int, default=10, help="layers restored around each MLP/attn column")
    p.add_argument("--max-rows", type=int, default=256, help="rows per batched forward")
    p.add_argument("--batch", choices=["known"], help="average over known facts (known_1000) instead of one prompt")
    p.add_argument("--n", type=int, default=50, help="with --batch: number of correctly answered facts")
    p.add_argument("--out", default="runs/trace", help="output folder")
    p.add_argument("--no-plot", action="store_true", help="write the data only")
    p.set_defaults(func=run)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "trace"


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.loading import load_model

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    kinds = ["hidden", "mlp", "attn"] if args.kind == "all" else [args.kind]
    noise = args.noise  # a number or s<k>; parsed by tracing.noise.resolve_noise
    out = Path(args.out)
    handle = load_model(args.model)
    t0 = time.time()
    if args.batch:
        _run_average(handle, args, kinds, noise, out)
    else:
        if not (args.prompt and args.subject):
            raise ValueError("give --prompt and --subject (or --batch known)")
        _run_one(handle, args, kinds, noise, out)
    print(f"done in {time.time() - t0:.1f} s; files in {out}/")
    return 0


def _run_one(handle, args, kinds, noise, out: Path) -> None:
    from ..tracing import trace_all

    results = trace_all(handle, args.prompt, args.subject, kinds=kinds, samples=args.samples, noise=noise,
                        window=args.window, answer=args.answer, max_rows=args.max_rows, progress=True)
    first = next(iter(results.values()))
    b, e = first.subject_range
    print(f"prompt: {first.prompt!r}  subject tokens {b}..{e - 1}: {first.tokens[b:e]}")
    print(f"answer: {first.answer!r}  p clean (high) = {first.high_score:.4f}  p corrupted (low) = "
          f"{first.low_score:.4f}  noise = {first.noise:.4f}"
          + ("" if first.correct_prediction else "  (not the model's top prediction)"))
    stem = out / _slug(first.prompt)
    for kind, res in results.items():
        t, layer = res.peak()
        row = res.scores[e - 1]
        print(f"  {kind:6s} peak p = {res.scores[t, layer]:.4f} at token {t} {res.tokens[t]!r}, layer {layer}; "
              f"at the last subject token: layer {int(row.argmax())} (p = {row.max():.4f})")
        res.save(f"{stem}_{kind}")
        if not args.no_plot:
            from ..tracing.plot import plot_trace

            plot_trace(res, f"{stem}_{kind}", model_name=handle.name)
    if len(results) > 1 and not args.no_plot:
        from ..tracing.plot import plot_trace_all

        plot_trace_all(results, f"{stem}_all", model_name=handle.name)


def _run_average(handle, args, kinds, noise, out: Path) -> None:
    from ..tracing.aggregate import average_indirect_effect

    avgs = []
    for kind in kinds:
        avg = average_indirect_effect(handle, None, kind, args.n, samples=args.samples, noise=noise,
                                      window=args.window, max_rows=args.max_rows, progress=True)
        avg.save(out / f"average_{kind}")
        avgs.append(avg)
        ls, lt = avg.peak_layer("last subject token"), avg.peak_layer("last token")
        print(f"{kind:6s}: {avg.n_facts} facts traced, {avg.n_skipped} skipped (wrong answer); mean p clean "
              f"{avg.mean_high:.4f}, corrupted {avg.mean_low:.4f}; peak AIE at the last subject token: layer "
              f"{ls} ({avg.effects[2, ls]:.4f}); at the last token: layer {lt} ({avg.effects[5, lt]:.4f})")
    if not args.no_plot:
        from ..tracing.plot import plot_average

        plot_average(avgs, out / ("average_" + "_".join(kinds)), model_name=handle.name)
