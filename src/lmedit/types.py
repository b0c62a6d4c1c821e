"""Typed records that cross every boundary: what an editor may see, and what only the evaluator sees.

No torch here: these records are cheap to build, compare, hash and serialise.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

SLOT = "{}"


class EditInputError(ValueError):
    """A request or case that cannot be edited as given; the message says what to fix."""


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise EditInputError(f"{name} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _texts(value: Any, name: str) -> tuple[str, ...]:
    """A tuple of strings from a list or tuple of strings; a lone string is refused (it would be read as
    one item per character)."""
    if isinstance(value, str):
        raise EditInputError(f"{name} must be a list of strings, got the single string {value!r:.60}; wrap it "
                             f"in a list: {name}=[{value!r:.40}]")
    if not isinstance(value, list | tuple):
        raise EditInputError(f"{name} must be a list of strings, got {type(value).__name__}")
    return tuple(_check_text(v, f"{name}[{i}]") for i, v in enumerate(value))


def _qas(value: Any, name: str) -> tuple[QA, ...]:
    if not isinstance(value, list | tuple):
        raise EditInputError(f"{name} must be a list of QA(prompt, answer), got {type(value).__name__}")
    for i, q in enumerate(value):
        if not isinstance(q, QA):
            raise EditInputError(f"{name}[{i}] must be a QA(prompt, answer), got {type(q).__name__}")
    return tuple(value)


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
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(self.case_id, str | int)):
            raise EditInputError(f"case_id must be a string, an integer or None, got {type(self.case_id).__name__}")
        template = to_template(self.prompt, self.subject)
        try:
            template.format(self.subject)
        except (KeyError, IndexError, ValueError) as e:
            raise EditInputError(
                f"prompt {self.prompt!r} has braces other than the one '{{}}' slot ({type(e).__name__}: {e}); "
                "write literal braces as '{{' and '}}', or put the subject in the prompt instead of '{}'") from None
        object.__setattr__(self, "template", template)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.format(self.subject)

    @property
    def fact(self) -> tuple[str, str]:
        """Which fact the request rewrites: its subject with the current answer where known (ZsRE asks one
        fact in several wordings, each with its own new answer), else with the prompt. Two requests with the
        same fact contradict each other; in a sequence the later one is the correction that stands."""
        known = self.target_true.strip().casefold() if self.target_true else self.template.casefold()
        return self.subject.strip().casefold(), known

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

    def __post_init__(self) -> None:
        _check_text(self.prompt, "QA.prompt")
        _check_text(self.answer, f"QA.answer (for prompt {self.prompt!r:.60})")


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

    scorer: ClassVar[str] = "edit"  # how the benchmark scores it (lmedit.metrics.scorers)

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    locality: tuple[QA, ...] = ()
    portability: dict[str, tuple[QA, ...]] = field(default_factory=dict)
    neighborhood: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.request, EditRequest):
            raise EditInputError(f"EditCase.request must be an EditRequest, got {type(self.request).__name__}")
        for name in ("paraphrases", "neighborhood", "generation_prompts"):
            object.__setattr__(self, name, _texts(getattr(self, name), name))
        object.__setattr__(self, "locality", _qas(self.locality, "locality"))
        if not isinstance(self.portability, dict):
            raise EditInputError(f"portability must be a dict of group -> list of QA, got "
                                 f"{type(self.portability).__name__}")
        object.__setattr__(self, "portability", {_check_text(k, "portability group"): _qas(v, f"portability[{k!r}]")
                                                 for k, v in self.portability.items()})
        _check_text(self.source, "source")

    @property
    def case_id(self) -> str | int | None:
        return self.request.case_id

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        """The requests the benchmark applies for this case (one; a multi-edit case has several)."""
        return (self.request,)
