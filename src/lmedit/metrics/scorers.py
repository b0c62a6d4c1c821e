"""How the benchmark scores a case: one :class:`CaseScorer` per kind of case, looked up by the name the case's
type declares (``type(case).scorer``), so the runner never asks which dataset a case came from.

- ``edit`` (:class:`~lmedit.types.EditCase`): reliability, generalization, locality, portability ... under the
  protocols the run asks for (:mod:`lmedit.metrics.evaluate`).
- ``multihop`` (MQuAKE's multi-edit cases): :mod:`lmedit.metrics.multihop`, its own fixed protocol.

A scorer module registers its scorer with :func:`register_scorer`; they are imported on the first lookup of a
name that is not registered yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..types import EditInputError
from .evaluate import Baseline, baseline, score_cases_with_texts
from .gen_protocol import scope_labels
from .generate import GenSettings
from .records import Score

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

_SCORERS: dict[str, CaseScorer] = {}


class CaseScorer:
    """Scores cases of one kind on the model as it is: once unedited (the baseline), then after each edit."""

    name: ClassVar[str] = ""

    def protocols(self, asked: tuple[str, ...]) -> tuple[str, ...]:
        """Which of the ``asked`` scoring protocols this scorer computes (recorded with every case)."""
        return asked

    def labels(self, protocols: Sequence[str], generation: GenSettings | None) -> list[str]:
        """What its scores depend on besides the model and the case (a baseline store's scope)."""
        return scope_labels(protocols, generation)

    def baseline(self, handle: ModelHandle, cases: Sequence[Any], *, protocols: Sequence[str],
                 generation: GenSettings | None) -> Baseline:
        """The unedited model's scores of ``cases``."""
        return baseline(handle, cases, protocols=protocols, generation=generation)

    def score(self, handle: ModelHandle, cases: Sequence[Any], base: Baseline, *, protocols: Sequence[str],
              generation: GenSettings | None) -> tuple[list[dict[str, Score]], list[list[dict[str, Any]]]]:
        """Post-edit scores of ``cases`` against ``base``, and each case's generated-text records."""
        return score_cases_with_texts(handle, cases, base, protocols=protocols, generation=generation)


def register_scorer(name: str) -> Callable[[type[CaseScorer]], type[CaseScorer]]:
    """Class decorator: registers an instance of the scorer as ``name``."""

    def deco(cls: type[CaseScorer]) -> type[CaseScorer]:
        cls.name = name
        _SCORERS[name] = cls()
        return cls

    return deco


register_scorer("edit")(CaseScorer)


def get_scorer(name: str) -> CaseScorer:
    """The scorer registered as ``name``."""
    if name not in _SCORERS:
        from . import multihop  # noqa: F401  (registers "multihop"; imported on first use)
    if name not in _SCORERS:
        raise EditInputError(f"no scorer is registered as {name!r}; known: {', '.join(sorted(_SCORERS))}")
    return _SCORERS[name]


def scorer_for(cases: Sequence[Any]) -> CaseScorer:
    """The one scorer of ``cases`` (their type's ``scorer`` name); cases of different kinds cannot share a run."""
    names = {getattr(type(c), "scorer", None) for c in cases}
    if None in names:
        bad = next(type(c).__name__ for c in cases if getattr(type(c), "scorer", None) is None)
        raise EditInputError(f"{bad} is not a benchmark case (its type declares no scorer); pass EditCase "
                             "records or the cases a dataset loader returns")
    if len(names) != 1:
        raise EditInputError(f"these cases need different scorers ({', '.join(sorted(names))}); run each kind "
                             "of case on its own")
    return get_scorer(names.pop())
