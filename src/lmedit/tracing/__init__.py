"""Causal tracing (ROME §2.1): where in the network does a model recall a fact?

    from lmedit.tracing import trace_fact, trace_all, average_indirect_effect, suggest_layers
    result = trace_fact(handle, "The Eiffel Tower is located in the city of", "The Eiffel Tower", kind="mlp")

Compute lives in ``causal.py``/``aggregate.py``/``noise.py``; ``plot.py`` (matplotlib) is imported only when
plotting.
"""

from __future__ import annotations

from .aggregate import CATEGORIES, AverageEffect, LayerSuggestion, average_indirect_effect, suggest_layers
from .causal import KINDS, Tracer, TraceResult, subject_token_range, trace_all, trace_fact, window_layers
from .noise import embedding_std, load_known_facts, resolve_noise, subject_std

__all__ = [
    "CATEGORIES", "AverageEffect", "LayerSuggestion", "average_indirect_effect", "suggest_layers",
    "KINDS", "TraceResult", "Tracer", "embedding_std", "load_known_facts", "resolve_noise", "subject_std",
    "subject_token_range", "trace_all", "trace_fact", "window_layers",
]
