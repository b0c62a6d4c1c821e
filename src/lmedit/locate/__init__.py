"""Shared machinery of the locate-then-edit methods (ROME, MEMIT, EMMET, AlphaEdit, PMET).

- :mod:`.templates`: context templates sampled from the model (cached on the handle);
- :mod:`.keys`: keys at the subject's last token, one forward for all templates, requests and layers;
- :mod:`.values`: the target value v*/z optimisation (NLL + KL + weight decay, norm clamp);
- :mod:`.stats`: second moments E[k kᵀ] over a corpus, several layers in one pass, cached on disk;
- :mod:`.solvers`: the closed-form updates in float64;
- :mod:`.pipeline`: config fields, defaults and the multi-layer batch loop the methods share.
"""

from .stats import StatsError, collect_stats, second_moments

__all__ = ["StatsError", "collect_stats", "second_moments"]
