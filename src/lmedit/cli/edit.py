"""``lmedit edit``: compute one edit, show continuations and scores before/after, optionally save it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..types import QA, EditCase, EditInputError, EditRequest
from ._common import (
    DEFAULT_MODEL,
    add_config_args,
    add_run_option_args,
    config_overrides,
    human_bytes,
    quiet_libraries,
    run_options,
)

CASE_KEYS = ("paraphrases", "locality")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("edit", help="edit facts in a model and show the effect",
                              description="Compute an edit, print continuations and metrics before and after it. "
                                          "The model on disk is never changed; --save keeps the edit itself.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias or model directory (default {DEFAULT_MODEL})")
    p.add_argument("--method", required=True, help="editing method (see `lmedit methods`)")
    p.add_argument("--prompt", help="prompt with the subject in it, or with '{}' where the subject goes")
    p.add_argument("--subject", help="the entity whose fact changes")
    p.add_argument("--target", help="the new answer")
    p.add_argument("--target-true", help="the current answer (adds probability-comparison scores)")
    p.add_argument("--paraphrase", action="append", default=[], help="a rephrasing to test (repeatable)")
    p.add_argument("--locality-prompt", action="append", default=[], help="an unrelated prompt (repeatable)")
    p.add_argument("--locality-answer", action="append", default=[],
                   help="its answer, one per --locality-prompt (only used to teacher-force the scoring)")
    p.add_argument("--request-file", metavar="FILE.json",
                   help="one request or a list: {prompt, subject, target_new[, target_true, case_id, "
                        "paraphrases, locality: [{prompt, answer}]]}")
    add_config_args(p)
    add_run_option_args(p)
    p.add_argument("--editor-checkpoint", metavar="DIR", help="trained editor state, for methods that need training")
    p.add_argument("--save", metavar="DIR", help="save the edit here (a new or empty folder; load it with Edit.load)")
    p.add_argument("--max-relative-update", type=float, default=None, metavar="X",
                   help="refuse an edit whose ‖ΔW‖/‖W‖ exceeds X on any parameter (default "
                        "lmedit.edits.MAX_RELATIVE_UPDATE = 100; 0 turns the bound off)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per continuation")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _case_from_dict(d: dict[str, Any], i: int) -> EditCase:
    if not isinstance(d, dict):
        raise EditInputError(f"request {i} in the request file is {type(d).__name__}, expected an object")
    d = dict(d)
    paraphrases = d.pop("paraphrases", ())
    loc = d.pop("locality", ())
    if not isinstance(loc, list | tuple) or not all(isinstance(q, dict) and set(q) == {"prompt", "answer"}
                                                    for q in loc):
        raise EditInputError(f"request {i}: locality must be a list of {{\"prompt\": ..., \"answer\": ...}} objects")
    d.setdefault("case_id", i)
    try:
        locality = tuple(QA(q["prompt"], q["answer"]) for q in loc)
        return EditCase(EditRequest.from_dict(d), paraphrases=paraphrases, locality=locality,
                        source=f"request {i}")
    except EditInputError as e:
        raise EditInputError(f"request {i} in the request file: {e}") from None


def build_cases(args: argparse.Namespace) -> list[EditCase]:
    """Cases from --request-file, or from --prompt/--subject/--target and the evaluation flags."""
    if args.request_file:
        if args.prompt or args.subject or args.target:
            raise EditInputError("give either --request-file or --prompt/--subject/--target, not both")
        data = json.loads(Path(args.request_file).read_text())
        items = data if isinstance(data, list) else [data]
        if not items:
            raise EditInputError(f"{args.request_file} holds an empty list")
        return [_case_from_dict(d, i) for i, d in enumerate(items)]
    missing = [f"--{n}" for n in ("prompt", "subject", "target") if not getattr(args, n)]
    if missing:
        raise EditInputError(f"missing {', '.join(missing)} (or give --request-file)")
    if len(args.locality_answer) != len(args.locality_prompt):
        raise EditInputError(f"{len(args.locality_prompt)} --locality-prompt but {len(args.locality_answer)} "
                             "--locality-answer; give one answer per prompt")
    req = EditRequest(args.prompt, args.subject, args.target, target_true=args.target_true, case_id=0)
    loc = tuple(QA(p, a) for p, a in zip(args.locality_prompt, args.locality_answer, strict=True))
    return [EditCase(req, paraphrases=tuple(args.paraphrase), locality=loc, source="command line")]


def _prompts(cases: list[EditCase]) -> list[tuple[str, str]]:
    out = []
    for c in cases:
        out.append(("prompt", c.request.text))
        out += [("paraphrase", p) for p in c.paraphrases]
        out += [("locality", q.prompt) for q in c.locality]
    return out


def run(args: argparse.Namespace) -> int:
    from ..registry import get_editor

    quiet_libraries(args, quiet_lmedit=True)
    cases = build_cases(args)
    editor = get_editor(args.method, config_overrides(args.method, args.config, args.overrides,
                                                       args.editor_checkpoint), options=run_options(args))
    if len(cases) > 1 and not editor.capabilities.batch:  # say so before the model loads
        raise EditInputError(f"{args.method} edits one request at a time; the request file holds {len(cases)}")
    save = Path(args.save) if args.save else None
    if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise EditInputError(f"--save {save} already exists and is not an empty folder; give a new folder "
                             "(nothing was computed)")
    bound = _bound(args.max_relative_update)
    from .. import load_model
    from ..metrics.efficiency import measure
    from ..metrics.evaluate import baseline, evaluate

    handle = load_model(args.model)
    gen = [{"kind": k, "prompt": p, "before": handle.generate(p, args.max_new_tokens)} for k, p in _prompts(cases)]
    with measure() as m:
        edit = editor.compute(handle, [c.request for c in cases])
    base = baseline(handle, cases)
    with edit.applied(handle, max_relative_update=bound):
        for g in gen:
            g["after"] = handle.generate(g["prompt"], args.max_new_tokens)
        results = evaluate(handle, cases, base=base)
    out = {
        "model": handle.name, "method": editor.name, "edit": edit.describe(),
        "config": edit.meta.get("config", {}), "continuations": gen,
        "metrics": [{"case_id": r.case_id,
                     **{k: {"pre": r.pre[k].value if k in r.pre else None, "post": s.value, "protocol": s.protocol}
                        for k, s in r.post.items()}} for r in results],
        "efficiency": {"compute_seconds": m.seconds, "peak_rss_bytes": m.peak_rss_bytes,
                       "cuda_peak_bytes": m.cuda_peak_bytes},
        "saved": str(edit.save(args.save)) if args.save else None,
    }
    if args.json:
        print(json.dumps(out, default=str))
    else:
        _print_text(out)
    return 0


def _bound(value: float | None) -> float | None:
    from ..edits import MAX_RELATIVE_UPDATE

    if value is None:
        return MAX_RELATIVE_UPDATE
    if not math.isfinite(value) or value < 0:
        raise EditInputError(f"--max-relative-update must be a finite number ≥ 0 (0 turns the bound off), got {value}")
    return value or None


def _first_line(text: str) -> str:
    return (text.strip("\n").splitlines() or [""])[0].rstrip()


def _print_text(out: dict[str, Any]) -> None:
    print(out["edit"])
    print()
    width = max(len(g["kind"]) for g in out["continuations"])
    for g in out["continuations"]:
        print(f"  {g['kind']:<{width}}  {g['prompt']!r}")
        print(f"  {'':<{width}}    before: {_first_line(g['before'])!r}")
        print(f"  {'':<{width}}    after:  {_first_line(g['after'])!r}")
    for rec in out["metrics"]:
        print(f"\nScores for case {rec['case_id']} (before -> after)")
        for k, v in rec.items():
            if k == "case_id":
                continue
            pre = "    " if v["pre"] is None or k == "locality" else f"{v['pre']:.2f}"
            print(f"  {k:<22} {pre} -> {v['post']:.2f}   [{v['protocol']}]")
    eff = out["efficiency"]
    print(f"\nComputed in {eff['compute_seconds']:.2f} s, peak memory (RSS) {human_bytes(eff['peak_rss_bytes'])}")
    if out["saved"]:
        print(f"Saved the edit to {out['saved']} (load it with lmedit.Edit.load)")
