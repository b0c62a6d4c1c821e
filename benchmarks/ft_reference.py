"""FT-M and FT-L on SmolLM2-135M against the EasyEdit reference run on the same ZsRE cases.

Single-edit setting: for each of the first N records of ``zsre-train`` (zsre_mend_train_1k.json), the edit
is computed on the unedited model, applied, scored with the token-accuracy protocol
(``lmedit.metrics.evaluate``: reliability, generalization, locality) and reverted. Seconds are the
``compute`` time of one edit. A second pass of FT-M on the first few cases with ``cache_lower=False``
measures what replaying the frozen lower layers saves.

    flock /tmp/lmedit-heavy.lock python benchmarks/ft_reference.py          # writes results/ft_reference.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "ft_reference.md"
# EasyEdit on this machine, same 30 cases: median seconds per edit, reliability / generalization / locality.
REFERENCE = {"ft-m": (4.8, 99.3, 91.4, 91.9), "ft-l": (3.8, 49.0, 44.5, 94.2)}
METRICS = ("reliability", "generalization", "locality")


def run(handle, cases, method: str, **overrides) -> dict:
    from lmedit import get_editor
    from lmedit.metrics.evaluate import evaluate
    from lmedit.metrics.records import TOKEN_ACC

    editor = get_editor(method, **overrides)
    seconds, scores = [], {m: [] for m in METRICS}
    for case in cases:
        edit = editor.compute(handle, [case.request])
        seconds.append(edit.meta["compute_seconds"])
        (res,) = evaluate(handle, [case], edit, protocols=(TOKEN_ACC,))
        for m in METRICS:
            scores[m].append(res.post[m].value)
    return {"median_s": statistics.median(seconds), "config": editor.config_for(handle).to_dict(),
            **{m: 100 * sum(v) / len(v) for m, v in scores.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30, help="cases (first N records of zsre-train)")
    ap.add_argument("--speed-n", type=int, default=5, help="cases for the lower-layer replay speed check")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    import lmedit
    from lmedit.data import load_dataset

    handle = lmedit.load_model("smollm2-135m")
    cases = load_dataset("zsre-train", n=args.n)
    t0 = time.time()
    rows = {m: run(handle, cases, m) for m in ("ft-m", "ft-l")}
    speed = {flag: run(handle, cases[: args.speed_n], "ft-m", cache_lower=flag)["median_s"]
             for flag in (True, False)}
    lines = [
        "# FT-M / FT-L on SmolLM2-135M vs EasyEdit (ZsRE, single edits)",
        "",
        f"Command: `flock /tmp/lmedit-heavy.lock python benchmarks/ft_reference.py --n {args.n}`  ",
        f"Cases: first {args.n} records of `zsre/zsre_mend_train_1k.json`; protocol `token_acc` "
        "(teacher-forced token accuracy; locality = agreement with the unedited model's predictions).  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32 CPU; total wall time {time.time() - t0:.0f} s.",
        "",
        "| method | median s / edit | reliability | generalization | locality | EasyEdit s "
        "| EasyEdit rel / gen / loc |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        ref = REFERENCE[m]
        lines.append(f"| {m} | {r['median_s']:.2f} | {r['reliability']:.1f} | {r['generalization']:.1f} | "
                     f"{r['locality']:.1f} | {ref[0]} | {ref[1]} / {ref[2]} / {ref[3]} |")
    lines += ["", f"Lower-layer replay (FT-M, first {args.speed_n} cases, median compute s per edit): "
              f"on {speed[True]:.2f} s, off {speed[False]:.2f} s -> {speed[False] / speed[True]:.2f}x faster.", ""]
    for m, r in rows.items():
        lines.append(f"{m} config: `{r['config']}`  ")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
