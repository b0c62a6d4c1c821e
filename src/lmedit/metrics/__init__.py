"""Metrics. Every number carries its protocol tag; summaries never average across tags."""

from .records import CaseResult, Score, summarize
from .scoring import TargetScore, score_targets

__all__ = ["CaseResult", "Score", "summarize", "TargetScore", "score_targets"]
