"""Evaluation throughput: lmedit's teacher-forced scorer vs a plain batched forward pass of the same model.

Both sides see the same rows (prompt ids ++ answer ids of N ZsRE cases: reliability, generalization and
locality prompts), in the same length-sorted batches of the same size, right-padded. The plain side only
runs ``model(input_ids, attention_mask).logits`` on pre-built tensors; the scorer side is
``lmedit.metrics.score_targets`` (tokenization, batching, answer-position unembedding, log-softmax, argmax,
Python records). Throughput counts real (unpadded) tokens per second.

Second part: scoring under an in-context edit (IKE's demonstrations in front of every row). The scorer runs
the shared context once and each batch only on its rows' own tokens (``lmedit.kv.SharedPrefix``); the
baseline is the same scorer forced to run every row in full. Both score the same rows of
``--context-cases`` cases, each under its own IKE edit; predictions must agree exactly.

Third part: a benchmark cell's whole scoring of those cases under their IKE edits (teacher forcing,
probability comparison and generation, as ``lmedit bench`` scores a case), with the prefix caches shared
across the scoring's batches (``lmedit.kv.reusing_prefixes``) and without (each batch computes its own).

    flock /tmp/lmedit-heavy.lock python benchmarks/eval_throughput.py            # 200 cases, batch 32
    python benchmarks/eval_throughput.py --n 50 --repeats 2 --no-write           # quick look
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "eval_throughput.md"


def rows_for(cases) -> tuple[list[str], list[str]]:
    """(prompt, answer) pairs exactly as the token-accuracy evaluation scores them."""
    prompts, answers = [], []
    for c in cases:
        r = c.request
        pairs = [(r.text, r.target_new)] + [(p, r.target_new) for p in c.paraphrases]
        pairs += [(q.prompt, q.answer) for q in c.locality]
        for p, a in pairs:
            prompts.append(p)
            answers.append(a)
    return prompts, answers


def plain_batches(handle, prompts: list[str], answers: list[str], batch_size: int):
    """The scorer's batches as plain tensors: same rows, same length-sorted order, right padding."""
    tok = handle.tokens
    rows = [tok.prompt_ids(p) + tok.target_ids(p, a) for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches = []
    for s in range(0, len(order), batch_size):
        ids, mask = tok.pad([rows[i] for i in order[s : s + batch_size]], "right")  # [batch, seq]
        batches.append((ids.to(handle.device), mask.to(handle.device)))
    return batches, sum(len(r) for r in rows)


@torch.no_grad()
def time_plain(handle, batches) -> float:
    t0 = time.perf_counter()
    for ids, mask in batches:
        _ = handle.model(input_ids=ids, attention_mask=mask).logits  # [batch, seq, vocab]
    return time.perf_counter() - t0


def time_scorer(handle, prompts, answers, batch_size: int) -> float:
    from lmedit.metrics import score_targets

    t0 = time.perf_counter()
    score_targets(handle, prompts, answers, batch_size=batch_size)
    return time.perf_counter() - t0


def in_context(handle, cases, batch_size: int, repeats: int) -> dict:
    """Seconds to score every case's rows under its IKE context: shared-prefix path vs full rows."""
    import lmedit.metrics.scoring as scoring
    from lmedit import get_editor

    editor = get_editor("ike")
    work = []
    for c in cases:
        prompts, answers = rows_for([c])
        work.append((editor.compute(handle, [c.request]), prompts, answers))

    def run(full: bool) -> tuple[float, list]:
        saved = scoring.MIN_SHARED_TOKENS
        scoring.MIN_SHARED_TOKENS = 10**9 if full else saved
        out, t0 = [], time.perf_counter()
        try:
            for edit, prompts, answers in work:
                with edit.applied(handle):
                    out += scoring.score_targets(handle, prompts, answers, batch_size=batch_size)
        finally:
            scoring.MIN_SHARED_TOKENS = saved
        return time.perf_counter() - t0, out

    run(False)  # warm-up
    fast, full = [], []
    for _ in range(repeats):
        t, a = run(False)
        fast.append(t)
        t, b = run(True)
        full.append(t)
    same = all(x.pred == y.pred for x, y in zip(a, b, strict=True))
    gap = max(abs(u - v) for x, y in zip(a, b, strict=True) for u, v in zip(x.logprobs, y.logprobs, strict=True))
    context_tokens = [len(handle.tokens.prompt_ids(e.context)) for e, _, _ in work]
    return {"fast": statistics.median(fast), "full": statistics.median(full), "rows": len(a), "same": same,
            "gap": gap, "context_tokens": statistics.median(context_tokens)}


def whole_scoring(handle, cases, repeats: int) -> dict:
    """Seconds per case of score_cases_with_texts (all three protocols) under each case's IKE edit, with and
    without one scoring's batches sharing their prefix caches."""
    import contextlib

    import lmedit.metrics.evaluate as evaluate
    from lmedit import get_editor

    protocols = ("token_acc", "prob_compare", "gen")
    editor = get_editor("ike")
    base = evaluate.baseline(handle, cases, protocols=protocols)
    work = [(i, editor.compute(handle, [c.request])) for i, c in enumerate(cases)]
    shared = evaluate.reusing_prefixes

    def run(reuse: bool) -> tuple[float, list]:
        evaluate.reusing_prefixes = shared if reuse else (lambda model: contextlib.nullcontext())
        out, t0 = [], time.perf_counter()
        try:
            for i, edit in work:
                one = evaluate.Baseline(locality=[base.locality[i]], pre=[base.pre[i]], texts=[base.texts[i]])
                with edit.applied(handle):
                    out.append(evaluate.score_cases_with_texts(handle, [cases[i]], one, protocols=protocols))
        finally:
            evaluate.reusing_prefixes = shared
        return time.perf_counter() - t0, out

    fast, full = [], []
    for _ in range(repeats):  # interleaved
        t, a = run(True)
        fast.append(t)
        t, b = run(False)
        full.append(t)
    same = all(x[1] == y[1] for x, y in zip(a, b, strict=True))
    gap = max(abs(s.value - y[0][0][k].value) for x, y in zip(a, b, strict=True) for k, s in x[0][0].items())
    n = len(cases)
    return {"fast": statistics.median(fast) / n, "full": statistics.median(full) / n, "same": same, "gap": gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--n", type=int, default=200, help="cases (each gives 3 scored rows)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context-cases", type=int, default=10, help="cases scored under their IKE edit (0: skip)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update the results file")
    args = ap.parse_args()

    import lmedit
    from lmedit.models.handle import ModelHandle

    torch.set_num_threads(args.threads)
    handle = lmedit.load_model(args.model)
    cases = lmedit.load_dataset(args.dataset, n=args.n)
    prompts, answers = rows_for(cases)
    batches, n_tokens = plain_batches(handle, prompts, answers, args.batch_size)

    # cold: a fresh handle (empty tokenization cache), as in the first evaluation pass of a benchmark
    fresh = ModelHandle(handle.model, handle.tokenizer, name=handle.name)
    cold = time_scorer(fresh, prompts, answers, args.batch_size)
    time_plain(handle, batches[:2])  # warm-up of the plain path
    plain, scorer = [], []
    for _ in range(args.repeats):  # interleaved so that machine-load drift hits both sides alike
        plain.append(time_plain(handle, batches))
        scorer.append(time_scorer(handle, prompts, answers, args.batch_size))
    p, s = statistics.median(plain), statistics.median(scorer)
    rows = [("plain forward (model(...).logits)", p), ("lmedit score_targets, warm", s),
            ("lmedit score_targets, cold (first pass, tokenizing)", cold)]
    lines = [
        "# Evaluation throughput: lmedit scorer vs plain forward",
        "",
        f"Model {args.model}, {len(cases)} {args.dataset} cases -> {len(prompts)} scored rows, {n_tokens} real tokens, "
        f"batch size {args.batch_size}, right padding, same length-sorted batches on both sides; "
        f"{args.threads} CPU threads, torch {torch.__version__}, {platform.processor() or platform.machine()}; "
        f"median of {args.repeats} interleaved passes (cold: one pass).",
        "",
        "| path | seconds | tokens/s | vs plain |",
        "|---|---:|---:|---:|",
    ]
    for name, sec in rows:
        lines.append(f"| {name} | {sec:.2f} | {n_tokens / sec:,.0f} | {p / sec:.0%} |")
    if args.context_cases:
        ic = in_context(handle, cases[: args.context_cases], args.batch_size, args.repeats)
        lines += ["", "## Under an in-context edit (IKE)", "",
                  f"{args.context_cases} cases, each scored under its own IKE context (median "
                  f"{ic['context_tokens']:.0f} tokens of demonstrations), {ic['rows']} rows; median of "
                  f"{args.repeats} interleaved passes.", "",
                  "| path | seconds | vs full rows |", "|---|---:|---:|",
                  f"| every row runs its whole context | {ic['full']:.2f} | 1.0x |",
                  f"| shared context once (key/value cache) | {ic['fast']:.2f} | {ic['full'] / ic['fast']:.1f}x |", "",
                  f"Predictions identical: {'yes' if ic['same'] else 'NO'}; largest log-probability difference "
                  f"{ic['gap']:.1e}."]
        ws = whole_scoring(handle, cases[: args.context_cases], args.repeats)
        lines += ["", "## A benchmark cell's whole scoring under an in-context edit", "",
                  "Each case scored as `lmedit bench` scores it (token accuracy, probability comparison and "
                  "generation) under its own IKE edit; seconds per case, median of "
                  f"{args.repeats} interleaved passes.", "",
                  "| path | seconds per case | vs each batch alone |", "|---|---:|---:|",
                  f"| each batch computes its prefix cache | {ws['full']:.2f} | 1.0x |",
                  f"| one scoring shares its prefix caches (`reusing_prefixes`) | {ws['fast']:.2f} | "
                  f"{ws['full'] / ws['fast']:.1f}x |", "",
                  f"Generated texts identical: {'yes' if ws['same'] else 'NO'}; largest score difference "
                  f"{ws['gap']:.1e}."]
    model = "" if args.model == "smollm2-135m" else f" --model {args.model}"
    lines += ["", "Command: `flock /tmp/lmedit-heavy.lock python benchmarks/eval_throughput.py"
              f"{model} --n {args.n} --batch-size {args.batch_size} --repeats {args.repeats} "
              f"--context-cases {args.context_cases} --threads {args.threads}`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
