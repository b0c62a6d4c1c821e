"""Typed records that cross every boundary: what an editor may see, and what only the evaluator sees.

No torch here: these records are cheap to build, compare, hash and serialise.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

SLOT = "{}"


class EditInputError(ValueError):
    """A request or case that cannot be edited as given; the message says what to fix."""


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise EditInputError(f"{name} must be a string, got {type(value).__name__}")
    return value


def to_template(prompt: str, subject: str) -> str:
    """Turn a prompt into a ROME-style template with one ``{}`` slot for the subject.

    A prompt that already holds one ``{}`` is returned as is. Otherwise the subject must occur in the prompt
    exactly once.
    """
    if prompt.count(SLOT) == 1:
        return prompt
    if prompt.count(SLOT) > 1:
        raise EditInputError(f"prompt {prompt!r} has {prompt.count(SLOT)} '{{}}' slots; use exactly one")
    hits = [m.start() for m in re.finditer(re.escape(subject), prompt)]
    if not hits:
        raise EditInputError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; put it in the prompt or write "
            "the prompt as a template with one '{}' where the subject goes"
        )
    if len(hits) > 1:
        raise EditInputError(
            f"subject {subject!r} occurs {len(hits)} times in prompt {prompt!r}; write the prompt as a "
            "template with one '{}' to say which occurrence is the subject"
        )
    i = hits[0]
    # literal braces elsewhere in the prompt must survive str.format
    head = prompt[:i].replace("{", "{{").replace("}", "}}")
    tail = prompt[i + len(subject) :].replace("{", "{{").replace("}", "}}")
    return head + SLOT + tail


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model: all an editor is allowed to see.

    Args:
        prompt: the question or cloze prompt, either with the subject written out (it must occur exactly
            once) or as a template with one ``{}`` where the subject goes.
        subject: the entity whose fact changes (ROME's *s*).
        target_new: the new answer (*o**), without a leading space.
        target_true: the current answer (*oᶜ*), when known.
        case_id: an identifier carried into results.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None
    template: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_text(self.prompt, "prompt")
        _check_text(self.subject, "subject")
        _check_text(self.target_new, "target_new")
        if not self.subject.strip():
            raise EditInputError("subject is empty; give the entity whose fact changes")
        if not self.target_new.strip():
            raise EditInputError(f"target_new is empty for prompt {self.prompt!r}; give the new answer")
        if self.target_true is not None:
            _check_text(self.target_true, "target_true")
        object.__setattr__(self, "template", to_template(self.prompt, self.subject))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """The request as plain JSON data, with the subject filled into the prompt."""
        return {
            "prompt": self.text,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "case_id": self.case_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        """A request from a mapping (see :meth:`to_dict`); unknown or missing fields raise EditInputError."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise EditInputError(f"unknown request field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = {"prompt", "subject", "target_new"} - set(d)
        if missing:
            raise EditInputError(f"request is missing field(s) {sorted(missing)}")
        return cls(**d)


@dataclass(frozen=True)
class QA:
    """An evaluation prompt with the answer it is scored against."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditCase:
    """A request plus the evaluation material an editor must never see.

    Args:
        request: what the editor receives.
        paraphrases: rephrasings of the edit prompt; scored against ``request.target_new`` (Generalization).
        locality: unrelated prompts whose predictions must not change (Locality; the answer is only used
            as a teacher-forced continuation).
        portability: questions whose answer should change because of the edit (Portability), by group.
        neighborhood: CounterFact neighbourhood prompts: other subjects that share ``target_true``.
        generation_prompts: prompts for free generation (fluency).
        source: where the case came from (file and index), for error messages and results.
    """

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    locality: tuple[QA, ...] = ()
    portability: dict[str, tuple[QA, ...]] = field(default_factory=dict)
    neighborhood: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = ""

    @property
    def case_id(self) -> str | int | None:
        return self.request.case_id
