"""The cost of a forward pass with many LoRA edits applied: peft adapters against merged updates (SmolLM2-135M).

A LoRA edit kept as a peft adapter runs its own two small matrix products in every adapted module at every
forward, so K edits cost K times that, plus peft's per-adapter Python overhead; ``--set merge=true`` adds
each edit's update B·A·α/r into the weights instead, so the forward does not grow. This computes one LoRA edit
on SmolLM2 with the preset (q_proj and v_proj of every layer, rank 8) and applies K copies of it either way
(only the timing matters, not what the copies say), then times scoring a fixed batch of prompts.

    python benchmarks/lora_stack.py --counts 0 10 50 200   # writes results/lora_stack.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import write_report

RESULT = Path(__file__).parent / "results" / "lora_stack.md"
PROMPTS = ["The mother tongue of Danielle Darrieux is", "Michel Rocard is a native speaker of",
           "What university did Watts Humphrey attend?", "The Eiffel Tower is located in the city of"] * 4


def _time_forward(handle, repeats: int) -> float:
    batch = handle.tokens.teacher_forced(PROMPTS, ["French"] * len(PROMPTS))
    with torch.no_grad():
        handle.logits(batch)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            handle.logits(batch)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 10, 50, 200])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmedit
    from lmedit.edits import WeightDelta
    from lmedit.methods.lora import LoraAdapter
    from lmedit.types import EditRequest

    handle = lmedit.load_model("smollm2-135m")
    req = EditRequest(prompt="What university did {} attend?", subject="Watts Humphrey",
                      target_new="University of Michigan")
    adapter = lmedit.get_editor("lora").compute(handle, [req])
    merged = lmedit.get_editor("lora", merge=True).compute(handle, [req])
    rows = []
    for k in args.counts:
        timing = {}
        for mode in ("adapters", "merged"):
            if mode == "adapters":
                stack = [LoraAdapter(adapter.peft_config, adapter.weights, dict(adapter.meta)) for _ in range(k)]
            else:
                stack = [WeightDelta(merged.deltas, meta=dict(merged.meta)) for _ in range(k)]
            for e in stack:
                e.apply(handle, strict=False)
            timing[mode] = _time_forward(handle, args.repeats)
            for e in reversed(stack):
                e.revert(handle)
        rows.append((k, timing["adapters"], timing["merged"]))
    base = rows[0][1] if rows and rows[0][0] == 0 else None
    lines = ["# A forward pass with K LoRA edits applied: peft adapters against merged updates", "",
             f"`python benchmarks/lora_stack.py --counts {' '.join(map(str, args.counts))}` ({args.threads} "
             f"thread(s)): the median of {args.repeats} forward passes over {len(PROMPTS)} short prompts on "
             "SmolLM2-135M with K copies of one LoRA edit (preset: q_proj and v_proj of every layer, rank 8).", "",
             "| K edits | adapters (s) | merged (s) | adapters / merged |", "|---:|---:|---:|---:|"]
    lines += [f"| {k} | {a:.3f} | {m:.3f} | {a / m:.1f}× |" for k, a, m in rows]
    if base:
        lines += ["", f"The unedited forward takes {base:.3f} s."]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
