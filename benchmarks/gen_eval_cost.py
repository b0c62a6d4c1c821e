"""Cost of the generation protocol against teacher forcing, per case, on the same cases and model.

Both score the same prompts of N cases of each dataset (reliability, generalization and locality; the
unedited SmolLM2, which is what a run's baseline scores and costs the same as a post-edit pass):
- teacher forcing: ``baseline(..., protocols=("token_acc",))`` (one batched forward per batch of rows);
- generation: ``baseline(..., protocols=("gen",))`` (greedy generation with the KV cache, left padding,
  default stop rules and the 32-token cap, then the text scores).
Each side is timed ``--repeats`` times, alternating, and the fastest time counts (the machine is shared).
Also reported: how the generations stopped and how many tokens they took. The unedited SmolLM2 ends its turn
at once on most bare questions, which makes generation cheap; an edited model often runs on (ROME's
repetitions reach the cap), so a last row times the worst case: every answer runs to the 32-token cap (the
stop rules switched off for that row only).

    python benchmarks/gen_eval_cost.py                         # 40 ZsRE + 40 QAEdit cases, writes the result
    python benchmarks/gen_eval_cost.py --n 10 --no-write       # quick look
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import platform
import statistics
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "gen_eval_cost.md"


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(handle, cases, repeats: int, batch_size: int) -> dict:
    from lmedit.metrics.evaluate import baseline
    from lmedit.metrics.generate import GenSettings

    settings = GenSettings(batch_size=batch_size)
    tf, gen, last = [], [], None
    for _ in range(repeats):
        t, _ = timed(lambda: baseline(handle, cases, protocols=("token_acc",), batch_size=batch_size))
        tf.append(t)
        t, last = timed(lambda: baseline(handle, cases, protocols=("gen",), generation=settings))
        gen.append(t)
    records = [r for case in last.texts for r in case]
    stops = collections.Counter(r["stop"] for r in records)
    return {"cases": len(cases), "prompts": len(records), "tf": min(tf), "gen": min(gen), "stops": stops,
            "tokens": statistics.fmean(r["tokens"] for r in records),
            "empty": sum(not r["text"].strip() for r in records)}


@contextlib.contextmanager
def never_stopping():
    """Every generation runs to the cap: no end-of-sequence id, no line-break stop."""
    import lmedit.metrics.generate as gen

    saved = gen.stop_ids, gen.answer_ended
    gen.stop_ids, gen.answer_ended = (lambda handle: set()), (lambda text: False)
    try:
        yield
    finally:
        gen.stop_ids, gen.answer_ended = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="cases per dataset")
    ap.add_argument("--datasets", default="zsre,qaedit")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per batch, both sides")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lmedit
    from lmedit.data import load_dataset

    handle = lmedit.load_model("smollm2-135m")
    rows = []
    for ds in args.datasets.split(","):
        m = measure(handle, load_dataset(ds, n=args.n), args.repeats, args.batch_size)
        rows.append((ds, m))
    with never_stopping():
        ds = args.datasets.split(",")[0]
        rows.append((f"{ds}, worst case: every answer to the cap", measure(handle, load_dataset(ds, n=args.n),
                                                                           args.repeats, args.batch_size)))
    lines = ["# Generation scoring vs teacher forcing: cost per case", "",
             f"`python benchmarks/gen_eval_cost.py --n {args.n} --datasets {args.datasets} --repeats {args.repeats} "
             f"--batch-size {args.batch_size} --threads {args.threads}` on {platform.machine()} "
             f"({args.threads} thread(s), a shared machine; the fastest of {args.repeats} tries each), "
             f"SmolLM2-135M-Instruct (fp32, CPU), torch {torch.__version__}.", "",
             "Same cases, same prompts (reliability, generalization, locality), unedited model. Generation: greedy, "
             "context `question`, stops at EOS / first line break after the answer / 32 new tokens.", "",
             "| dataset | cases | prompts | teacher forcing s/case | generation s/case | ratio | mean new tokens | "
             "stopped at EOS / newline / cap | empty answers |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for ds, m in rows:
        n = m["cases"]
        s = m["stops"]
        lines.append(f"| {ds} | {n} | {m['prompts']} | {m['tf'] / n:.3f} | {m['gen'] / n:.3f} | "
                     f"{m['gen'] / m['tf']:.1f}x | {m['tokens']:.1f} | {s['eos']} / {s['newline']} / {s['cap']} | "
                     f"{m['empty']} |")
    tf_all = sum(m["tf"] for _, m in rows[:-1])
    gen_all = sum(m["gen"] for _, m in rows[:-1])
    lines += ["", f"Overall (the real stop rules): generation costs {gen_all / tf_all:.1f}x teacher forcing per case; "
                  f"worst case {rows[-1][1]['gen'] / rows[-1][1]['tf']:.1f}x (goal: at most 3x)."]
    if args.no_write:
        print("\n".join(lines))
    else:
        from _report import write_report

        write_report(RESULT, lines)


if __name__ == "__main__":
    main()
