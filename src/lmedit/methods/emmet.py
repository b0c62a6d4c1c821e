"""EMMET (Gupta et al. 2024): batched ROME, each key's new value met exactly (equality constraints).

Same z / keys / layer loop as MEMIT (locate/pipeline.py); the solver is
ΔW = R D⁻¹ Kᵀ C'⁻¹, C' = λC + μI, D = Kᵀ C'⁻¹ K + εI (ε = ``emmet_lambda``), see locate/solvers.py.
Because only D's first term carries λ, λ sets the balance against ε; it scales with the MLP width like
MEMIT's (reference: λ = 10000 for GPT-2 XL, d_ff 6400).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import option
from ..locate.pipeline import SMOLLM2_VALUE_STEPS, BatchConfig, memit_family, resolve_batch
from ..locate.solvers import equality_constrained
from ..registry import register_editor
from .base import Capabilities, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle


@dataclass
class EMMETConfig(BatchConfig):
    mom2_update_weight: float | None = option(
        None, "λ of C' = λC + μI (None: 10000·d_ff/6400, scaled with the MLP width)")
    update_norm_lambda: float = option(0.0, "μ of C' = λC + μI")
    emmet_lambda: float = option(0.1, "ε regularising D = Kᵀ C'⁻¹ K + εI")


@register_editor("emmet")
class EMMET(Editor):
    """Equality-constrained Mass Model Editing."""

    Config = EMMETConfig
    capabilities = Capabilities(batch=True, sequential=True, encoder_decoder=False)
    relative_cost: ClassVar[float] = 12.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # bf16 value products: MEMIT's values, checked there (memit.py, docs/speed.md)
        "smollm2-135m": {"layers": [4], "v_num_grad_steps": SMOLLM2_VALUE_STEPS, "v_matmuls": "bf16"},
        "gpt2-xl": {"layers": [17], "mom2_update_weight": 10000, "clamp_norm_factor": 0.75,
                    "v_num_grad_steps": 20, "v_weight_decay": 0.5},
        "llama-7b": {"layers": [5], "mom2_update_weight": 100000},
    }
    quick: ClassVar[dict[str, Any]] = {"layers": [1], "clamp_norm_factor": 1.0, "v_num_grad_steps": 20,
                                       "v_weight_decay": 0.0, "mom2_tokens": 3000, "context_lengths": []}

    def resolve(self, handle: ModelHandle, cfg: EMMETConfig) -> EMMETConfig:
        return resolve_batch(handle, cfg, self.name, count=1, reference=10000.0, width=6400)

    def _compute(self, handle: ModelHandle, requests: list, cfg: EMMETConfig) -> Any:
        def solve(layer, K, R, C):
            return equality_constrained(K, R, C, cfg.mom2_update_weight, cfg.update_norm_lambda, cfg.emmet_lambda)

        edit, _ = memit_family(handle, requests, cfg, solve, run=self.options)
        return edit
