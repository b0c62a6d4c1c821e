"""Result records and summaries. A Score always says which protocol produced it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Protocol tags. Numbers with different tags are never averaged together.
TOKEN_ACC = "token_acc"  # teacher-forced token accuracy (Yao et al. 2023 / EasyEdit)
PROB_COMPARE = "prob_compare"  # CounterFact probability comparison (ROME: ES/PS/NS and magnitudes)
GENERATION = "generation"  # free generation (fluency n-gram entropy)
# the generation protocol's tags (gen_em, gen_f1, gen_contains, gen_judge) live in lmedit.metrics.gen_protocol
EFFICIENCY = "efficiency"  # seconds, bytes


@dataclass(frozen=True)
class Score:
    """One metric's value (0..1) with the protocol that measured it and the number of prompts behind it."""
    value: float
    protocol: str
    n: int = 1  # how many prompts went into this value

    def to_dict(self) -> dict[str, Any]:
        """The score as a plain dict."""
        return asdict(self)


@dataclass
class CaseResult:
    """Everything measured for one case: post-edit scores, pre-edit scores, efficiency, notes.

    ``texts``: the generation protocol's text records, ``{"pre": [...], "post": [...]}`` (rescoring reads
    them); ``protocols``: the protocols the case was scored with (None in records written before it was
    kept: the run's protocols then).
    """

    case_id: Any
    post: dict[str, Score] = field(default_factory=dict)
    pre: dict[str, Score] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    protocols: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON data (one line of a run's ``cases.jsonl``)."""
        d = {
            "case_id": self.case_id,
            "post": {k: v.to_dict() for k, v in self.post.items()},
            "pre": {k: v.to_dict() for k, v in self.pre.items()},
            "efficiency": self.efficiency,
            "info": self.info,
        }
        if self.texts:
            d["texts"] = self.texts
        if self.protocols is not None:
            d["protocols"] = list(self.protocols)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseResult:
        """Rebuild a case result written by :meth:`to_dict` (one line of a run's ``cases.jsonl``)."""
        return cls(
            d["case_id"],
            {k: Score(**v) for k, v in d.get("post", {}).items()},
            {k: Score(**v) for k, v in d.get("pre", {}).items()},
            dict(d.get("efficiency", {})),
            dict(d.get("info", {})),
            dict(d.get("texts", {})),
            list(d["protocols"]) if d.get("protocols") is not None else None,
        )


class ProtocolMixError(ValueError):
    """Scores of different protocols were about to be averaged together."""


def summarize(results: list[CaseResult], which: str = "post") -> dict[str, dict[str, Any]]:
    """Mean of each metric over cases (each case counts once), with its protocol and case count.

    Raises ProtocolMixError if one metric name carries different protocols in different cases.
    """
    buckets: dict[str, list[Score]] = {}
    for r in results:
        for name, s in getattr(r, which).items():
            buckets.setdefault(name, []).append(s)
    out: dict[str, dict[str, Any]] = {}
    for name, scores in buckets.items():
        protocols = {s.protocol for s in scores}
        if len(protocols) > 1:
            raise ProtocolMixError(f"metric {name!r} mixes protocols {sorted(protocols)}; refusing to average")
        vals = [s.value for s in scores if not math.isnan(s.value)]
        out[name] = {"mean": (sum(vals) / len(vals)) if vals else float("nan"),
                     "protocol": protocols.pop(), "cases": len(vals)}
    return out


def harmonic_mean(values: list[float]) -> float:
    """The harmonic mean of ``values``; 0.0 when the list is empty or any value is 0 or below."""
    if not values or any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
