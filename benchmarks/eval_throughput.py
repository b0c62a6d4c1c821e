"""Evaluation throughput: lmedit's teacher-forced scorer vs a plain batched forward pass of the same model.

Both sides see the same rows (prompt ids ++ answer ids of N ZsRE cases: reliability, generalization and
locality prompts), in the same length-sorted batches of the same size, right-padded. The plain side only
runs ``model(input_ids, attention_mask).logits`` on pre-built tensors; the scorer side is
``lmedit.metrics.score_targets`` (tokenization, batching, answer-position unembedding, log-softmax, argmax,
Python records). Throughput counts real (unpadded) tokens per second.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--n", type=int, default=200, help="cases (each gives 3 scored rows)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side (median reported)")
    ap.add_argument("--threads", type=int, default=2)
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
    model = "" if args.model == "smollm2-135m" else f" --model {args.model}"
    lines += ["", "Command: `flock /tmp/lmedit-heavy.lock python benchmarks/eval_throughput.py"
              f"{model} --n {args.n} --batch-size {args.batch_size} --repeats {args.repeats}`", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
