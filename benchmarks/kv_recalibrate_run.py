"""The saved edits of a finished kv-memory sequential run, with the run's own gate thresholds and with
thresholds set by the calibration rule (``lmedit.methods.kv_memory.gate_thresholds``), on the same model.

Every kept edit of the run folder is loaded from disk (keys and residuals unchanged); only each entry's
threshold differs between the two passes. Reported: perplexity on the first 2,048 and 20,000 tokens of the
drift corpus (WikiText-2 test), and teacher-forced reliability and generalization (first rephrasing) of
every kept edit, all with every edit applied. This isolates what the thresholds change; a run made with
calibrated gates from the start also differs in its values (each is optimised on the memory before it).

    python benchmarks/kv_recalibrate_run.py --run runs/kv-memory-zsre-n998 \
        [--out benchmarks/results/kv_recalibrate_run.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _report import write_report

from lmedit.data import load_dataset
from lmedit.edits import Edit
from lmedit.locate.keys import compute_keys
from lmedit.locate.pipeline import templates_for
from lmedit.methods.kv_memory import gate_thresholds, reference_cosines
from lmedit.metrics.drift import WIKITEXT, perplexity, text_ids
from lmedit.metrics.scoring import score_targets
from lmedit.models.loading import load_model
from lmedit.registry import get_editor
from lmedit.types import EditRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a kv-memory sequential run folder (lmedit bench --out)")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/kv_recalibrate_run.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model("smollm2-135m")
    cfg = get_editor("kv-memory").config_for(handle)
    (layer,) = cfg.layers
    edits, case_ids = [], []
    folders = sorted((Path(args.run) / "edits").iterdir(), key=lambda p: int(p.name))
    for d in folders:
        rec = json.loads((d / "chunk.json").read_text())
        if rec["error"] is None:
            edits.append(Edit.load(d))
            case_ids += rec["case_ids"]
    (path,) = edits[0].entries
    keys = torch.cat([e.entries[path].keys for e in edits])
    run_bounds = [b for e in edits for b in e.entries[path].bounds]
    reqs = [EditRequest(**{k: v for k, v in r.items() if k != "case_id"}) for e in edits for r in e.meta["requests"]]
    prompt_keys = compute_keys(handle, reqs, [layer], templates_for(handle, cfg.replace(context_lengths=[])))[layer]
    calibrated, capped = gate_thresholds(keys, prompt_keys[:, 0], reference_cosines(handle, layer, keys, cfg),
                                         cfg.threshold, cfg.calibrate_margin)
    cases = {c.request.case_id: c for c in load_dataset(args.dataset, n=max(case_ids) + 1)}
    scored = [cases[i] for i in case_ids]
    short, long = text_ids(handle, WIKITEXT, 2048), text_ids(handle, WIKITEXT, 20000)
    base = perplexity(handle, short), perplexity(handle, long)
    lines = [
        f"# kv-memory: the {len(edits)} kept edits of `{args.run}`, run thresholds vs calibrated",
        "",
        f"`python benchmarks/kv_recalibrate_run.py --run {args.run}`; SmolLM2-135M-Instruct, every kept edit applied "
        f"(of {len(folders)} in the run). Calibration: {cfg.calibrate_tokens:,} tokens of WikiText-2 valid, margin "
        f"{cfg.calibrate_margin}; {sum(b > cfg.threshold + 1e-6 for b in calibrated)} of {len(calibrated)} thresholds "
        f"raised, {len(capped)} capped at their own prompt. Unedited perplexity: {base[0]:.2f} (2,048 tokens), "
        f"{base[1]:.2f} (20,000).",
        "",
        "<!-- --8<-- [start:table] -->",
        "| thresholds | perplexity, 2,048 tokens | perplexity, 20,000 tokens | reliability | generalization |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, bounds in (("the run's (shared τ)", run_bounds), ("calibrated", calibrated)):
        k = 0
        for e in edits:
            entries = e.entries[path]
            entries.bounds = [float(b) for b in bounds[k:k + len(entries.bounds)]]
            k += len(entries.bounds)
            e.apply(handle)
        ppl = perplexity(handle, short), perplexity(handle, long)
        rel = score_targets(handle, [c.request.text for c in scored], [c.request.target_new for c in scored])
        gen = score_targets(handle, [c.paraphrases[0] for c in scored], [c.request.target_new for c in scored])
        lines.append(f"| {label} | {ppl[0]:.2f} (×{ppl[0] / base[0]:.3f}) | {ppl[1]:.2f} (×{ppl[1] / base[1]:.3f}) "
                     f"| {100 * sum(x.accuracy for x in rel) / len(rel):.1f} "
                     f"| {100 * sum(x.accuracy for x in gen) / len(gen):.1f} |")
        for e in reversed(edits):
            e.revert(handle)
    write_report(args.out, [*lines, "<!-- --8<-- [end:table] -->"])


if __name__ == "__main__":
    main()
