"""The guided demo behind ``lmedit demo``: one CounterFact fact rewritten, checked, measured and undone.

The case is CounterFact #0 (Meng et al. 2022): "The mother tongue of Danielle Darrieux is" French -> English,
with its paraphrase and its neighbourhood prompt. :func:`run_demo` returns a :class:`DemoReport`; it never
prints (the CLI does), but it can report each step through ``on_step`` as it starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .types import QA, EditCase, EditRequest

if TYPE_CHECKING:
    from .models.handle import ModelHandle

log = logging.getLogger(__name__)

# Editors tried in order when none is named: the locate-then-edit methods first, fine-tuning last.
PREFERRED_METHODS = ("rome", "memit", "ft-m")

DEMO_CASE = EditCase(
    request=EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                        target_true="French", case_id=0),
    paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
    locality=(QA("Michel Rocard is a native speaker of", "French"),),
    source="CounterFact case 0",
)


@dataclass
class Continuation:
    """One prompt's greedy continuation before and after the edit."""

    label: str
    prompt: str
    before: str
    after: str = ""


@dataclass
class DemoReport:
    """Everything the demo measured; seconds are wall-clock on this machine."""

    model: str
    method: str
    load_seconds: float
    converted: bool  # the model was converted from its packaged format during this run
    compute_seconds: float
    first_use_seconds: float | None  # one-time work inside the first compute (e.g. covariance statistics)
    peak_rss_bytes: int | None
    cuda_peak_bytes: int | None
    continuations: list[Continuation]
    scores: dict[str, tuple[float | None, float]]  # metric -> (pre, post)
    digest_before: str
    digest_after: str
    edit_summary: str
    notes: list[str] = field(default_factory=list)

    @property
    def restored(self) -> bool:
        return self.digest_before == self.digest_after


def choose_method(preferred: tuple[str, ...] = PREFERRED_METHODS) -> str:
    """The first registered editor of ``preferred`` that needs no training, else any such editor."""
    from .registry import editor_class, list_editors

    available = list_editors()
    usable = [n for n in available if not editor_class(n).capabilities.needs_fit]
    for name in preferred:
        if name in usable:
            return name
    if not usable:
        raise RuntimeError("no editing method is registered that can edit without training")
    return usable[0]


def _continue(handle: ModelHandle, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation, cut at the first line break (chat models like to ramble on)."""
    text = handle.generate(prompt, max_new_tokens=max_new_tokens)
    return text.split("\n")[0].rstrip()


def _was_cached(model: str) -> bool | None:
    """Whether an alias is already converted (None for paths and hub ids)."""
    from .models.loading import ALIASES, list_models

    if model not in ALIASES:
        return None
    return any(r["alias"] == model and r["status"] == "converted" for r in list_models())


# handle.cache entry where one-time per-model work (e.g. covariance statistics) adds up its seconds
SETUP_SECONDS = "setup_seconds"


def _compute(editor: Any, handle: ModelHandle, request: EditRequest) -> tuple[Any, Any, float, float | None]:
    """Compute the edit under the efficiency meter; returns (edit, meter, own seconds, one-time seconds).

    Locate-then-edit methods compute statistics once per model (cached on the handle and on disk) and add
    the time it took to ``handle.cache["setup_seconds"]``; that part is reported apart from the edit's cost.
    """
    from .metrics.efficiency import measure

    setup_before = handle.cache.get(SETUP_SECONDS, 0.0)
    with measure() as m:
        edit = editor.compute(handle, request)
    one_time = handle.cache.get(SETUP_SECONDS, 0.0) - setup_before
    if one_time < 1.0:  # loaded from the disk cache, or nothing to compute
        return edit, m, m.seconds, None
    return edit, m, max(0.0, m.seconds - one_time), one_time


def run_demo(model: str = "smollm2-135m", method: str | None = None, *, max_new_tokens: int = 8,
             on_step: Callable[[str], None] | None = None) -> DemoReport:
    """Load ``model``, edit the demo fact with ``method`` (default: :func:`choose_method`), evaluate, revert.

    Returns a :class:`DemoReport`; ``report.restored`` says whether every weight is bit-identical afterwards.
    """
    from . import load_model
    from .metrics.evaluate import evaluate
    from .registry import get_editor

    step = on_step or (lambda msg: log.info("%s", msg))
    method = method or choose_method()
    editor = get_editor(method)  # fail on an unknown method before loading anything
    cached = _was_cached(model)
    step("loading the model" + (" (first run: converting it once, about 30 s)" if cached is False else ""))
    t0 = time.perf_counter()
    handle = load_model(model)
    load_seconds = time.perf_counter() - t0
    digest_before = handle.state_digest()

    case = DEMO_CASE
    prompts = [("prompt", case.request.text), ("paraphrase", case.paraphrases[0]),
               ("unrelated", case.locality[0].prompt)]
    conts = [Continuation(label, p, _continue(handle, p, max_new_tokens)) for label, p in prompts]

    step(f"computing the edit with {method}")
    edit, meter, own_seconds, one_time = _compute(editor, handle, case.request)
    with edit.applied(handle):
        for c in conts:
            c.after = _continue(handle, c.prompt, max_new_tokens)
    step("scoring the edit")
    (result,) = evaluate(handle, [case], edit)
    scores = {}
    # teacher-forced token accuracy, then the same metrics scored on what the model generates (exact match)
    for name in ("reliability", "generalization", "locality",
                 "reliability@gen_em", "generalization@gen_em", "locality@gen_em"):
        if name in result.post:
            pre = result.pre.get(name)
            scores[name] = (pre.value if pre else None, result.post[name].value)
    return DemoReport(
        model=handle.name, method=method, load_seconds=load_seconds, converted=cached is False,
        compute_seconds=own_seconds, first_use_seconds=one_time,
        peak_rss_bytes=getattr(meter, "peak_rss_bytes", None), cuda_peak_bytes=getattr(meter, "cuda_peak_bytes", None),
        continuations=conts, scores=scores, digest_before=digest_before, digest_after=handle.state_digest(),
        edit_summary=edit.describe(),
    )
