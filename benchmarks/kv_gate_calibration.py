"""How often do kv-memory's gates open on ordinary text, with one shared threshold and with calibrated ones?

A kv-memory entry fires wherever W_out's input has cosine ≥ its threshold with the entry's key. Keys are
taken at the subject's last token, so a subject ending in a common token (" 20" in "HK Orange 20",
" torpedo" in "Mark 19 torpedo") also matches that token in running text. The editor raises each entry's
threshold to ``margin`` above the key's highest cosine on a reference text (WikiText-2's valid split).

This script takes the keys of the first ``--n`` ZsRE eval records exactly as kv-memory does (SmolLM2
preset: layer 4, template-averaged), and counts the tokens of the drift corpus (WikiText-2's *test*
split, never used for calibration) at which some gate would open: with the shared threshold, and with
thresholds calibrated on 1,024 to ``--max-reference`` reference tokens. It also checks that the calibrated
gate still opens for every edit prompt (its own key) and reports the rephrasings that lose it.

    python benchmarks/kv_gate_calibration.py [--n 1000] [--test-tokens 20000] \
        [--out benchmarks/results/kv_gate_calibration.md]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _report import write_report

from lmedit.data import load_dataset
from lmedit.locate.keys import compute_keys, token_inputs
from lmedit.locate.pipeline import templates_for
from lmedit.locate.templates import flatten, group_mean
from lmedit.methods.kv_memory import gate_thresholds, reference_cosines
from lmedit.metrics.drift import WIKITEXT, text_ids
from lmedit.models.loading import load_model
from lmedit.registry import get_editor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--test-tokens", type=int, default=20000)
    ap.add_argument("--sizes", default="1024,4096,16384,65536", help="reference token counts to try")
    ap.add_argument("--margins", default="0.02,0.05")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/kv_gate_calibration.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model("smollm2-135m")
    cfg = get_editor("kv-memory").config_for(handle)
    (layer,) = cfg.layers
    cases = load_dataset("zsre", n=args.n)
    reqs = [c.request for c in cases]
    groups = templates_for(handle, cfg)
    keys = compute_keys(handle, reqs, [layer], groups)[layer]
    stored = torch.stack([group_mean(k, flatten(groups)[1]) for k in keys])
    unit = F.normalize(stored, dim=-1)
    plain = templates_for(handle, cfg.replace(context_lengths=[]))
    rephrased = [c.request.__class__(prompt=c.paraphrases[0].replace(c.request.subject, "{}", 1),
                                     subject=c.request.subject, target_new=c.request.target_new)
                 for c in cases if c.paraphrases and c.request.subject in c.paraphrases[0]]
    reph_idx = [i for i, c in enumerate(cases) if c.paraphrases and c.request.subject in c.paraphrases[0]]
    reph_cos = F.cosine_similarity(stored[reph_idx], compute_keys(handle, rephrased, [layer], plain)[layer][:, 0])
    test = F.normalize(token_inputs(handle, text_ids(handle, WIKITEXT, args.test_tokens), layer), dim=-1)
    test_cos = unit @ test.T  # [n, test tokens]

    def row(label: str, bounds: torch.Tensor, seconds: str, raised: int, capped: int) -> str:
        opened = test_cos >= bounds[:, None]
        lost = int((reph_cos < bounds[reph_idx]).sum() - (reph_cos < cfg.threshold).sum())
        return (f"| {label} | {seconds} | {raised} | {capped} | {int(opened.sum())} | {int(opened.any(1).sum())} "
                f"| {lost} |")

    lines = [
        "# kv-memory: gates opening on ordinary text, shared vs calibrated thresholds",
        "",
        f"SmolLM2-135M-Instruct, kv-memory's preset (layer {layer}, τ = {cfg.threshold}, template-averaged keys), "
        f"the first {len(reqs)} ZsRE eval records' keys. \"Opened\": tokens of the first {args.test_tokens:,} of "
        "WikiText-2's test split (the drift corpus; never a reference) at which at least one of these keys' gates "
        "opens (entries counted per token and key). \"Rephrasings lost\": rephrased prompts whose key reached τ "
        f"but not the calibrated threshold (of {len(reph_idx)} whose text holds the subject). Command: "
        "`python benchmarks/kv_gate_calibration.py`.",
        "",
        "<!-- --8<-- [start:table] -->",
        "| thresholds | reference (s, 1 thread) | raised | capped at own prompt | gate-token pairs opened "
        "| keys opened anywhere | rephrasings lost |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row(f"shared τ = {cfg.threshold}", torch.full((len(reqs),), cfg.threshold), "–", 0, 0),
    ]
    own = keys[:, 0]
    for size in [int(x) for x in args.sizes.split(",")]:
        t0 = time.perf_counter()
        best = reference_cosines(handle, layer, stored, cfg.replace(calibrate_tokens=size))  # as the editor does
        seconds = f"{time.perf_counter() - t0:.1f}"
        for margin in [float(x) for x in args.margins.split(",")]:
            bounds, capped = gate_thresholds(stored, own, best, cfg.threshold, margin)
            bounds_t = torch.tensor(bounds)
            raised = int((bounds_t > cfg.threshold + 1e-6).sum())
            lines.append(row(f"calibrated on {size:,} tokens, margin {margin}", bounds_t, seconds, raised,
                             len(capped)))
    write_report(args.out, [*lines, "<!-- --8<-- [end:table] -->"])


if __name__ == "__main__":
    main()
