"""AlphaEdit (Fang et al., ICLR 2025): MEMIT projected onto the null space of preserved knowledge.

Per edited layer, P = U₀U₀ᵀ projects onto the eigenvectors of C = E[k kᵀ] whose eigenvalue is below
``nullspace_threshold``; the update solves [P (K Kᵀ + K_p K_pᵀ) + αI] X = P K Rᵀ and ΔW = Xᵀ
(locate/solvers.py), so ΔW k ≈ 0 for the corpus keys. K_p K_pᵀ sums the keys of this editor's earlier
edits (sequential editing); it lives in the editor object (``reset()``, ``state_dict()``,
``load_state_dict()``), never in a global, and is dropped automatically when the edited weights are back
to the values they had when it was started (the earlier edits were reverted). P is cached on disk per
(model, layer, threshold, statistics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import ConfigError, option
from ..digests import tensor_digest
from ..hooks import get_parameter
from ..locate.pipeline import SMOLLM2_VALUE_STEPS, LocateConfig, memit_family, param_name, resolve_batch
from ..locate.solvers import null_space_update, nullspace_projector
from ..locate.stats import corpus_files, corpus_hash, disk_cached
from ..registry import register_editor
from .base import Capabilities, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class AlphaEditConfig(LocateConfig):
    nullspace_threshold: float = option(2e-2, "eigenvalues of C below this span the preserved-key null space")
    L2: float = option(10.0, "α, the ridge term of the projected solve")

    def validate(self) -> None:
        super().validate()
        if self.nullspace_threshold <= 0:
            raise ConfigError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")


@register_editor("alphaedit")
class AlphaEdit(Editor):
    """Null-space constrained knowledge editing."""

    Config = AlphaEditConfig
    capabilities = Capabilities(batch=True, sequential=True, encoder_decoder=False)
    relative_cost: ClassVar[float] = 12.0  # see Editor.relative_cost
    pure_compute: ClassVar[bool] = False  # each edit's keys join the projection of the next ones
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # bf16 value products: MEMIT's values, checked there (memit.py, docs/speed.md)
        "smollm2-135m": {"layers": [3, 4, 5, 6, 7], "v_num_grad_steps": SMOLLM2_VALUE_STEPS, "v_matmuls": "bf16"},
        "gpt2-xl": {"layers": [13, 14, 15, 16, 17], "clamp_norm_factor": 0.75, "v_num_grad_steps": 20,
                    "v_weight_decay": 0.5},
        "gpt-j-6b": {"layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "v_weight_decay": 0.5},
        "llama-7b": {"layers": [4, 5, 6, 7, 8], "L2": 1.0, "v_lr": 0.1, "clamp_norm_factor": 0.75,
                     "v_weight_decay": 0.5},
    }
    # tiny random models: keys are ~1e-2, so C's eigenvalues sit far below the real-model threshold and α
    quick: ClassVar[dict[str, Any]] = {"layers": [1], "L2": 1e-3, "nullspace_threshold": 1e-3,
                                       "clamp_norm_factor": 0.5, "v_num_grad_steps": 20, "v_weight_decay": 0.0,
                                       "mom2_tokens": 3000, "context_lengths": []}

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.reset()

    # --- sequential state ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the keys of earlier edits (K_p K_pᵀ)."""
        self._kkt: dict[int, torch.Tensor] = {}
        self._origin: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"kkt": {str(k): v for k, v in self._kkt.items()}, "origin": dict(self._origin)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._kkt = {int(k): v.to(torch.float64) for k, v in state.get("kkt", {}).items()}
        self._origin = dict(state.get("origin", {}))

    def _digests(self, handle: ModelHandle, layers: list[int]) -> dict[str, Any]:
        names = [param_name(handle, x) for x in layers]
        return {"fingerprint": handle.fingerprint,
                **{n: tensor_digest(get_parameter(handle.model, n)) for n in names}}

    def _sync(self, handle: ModelHandle, layers: list[int]) -> None:
        """Drop K_p K_pᵀ when the model is back at the weights it was started on (or is another model)."""
        now = self._digests(handle, layers)
        if self._kkt and (now == self._origin or now["fingerprint"] != self._origin.get("fingerprint")):
            log.info("alphaedit: earlier edits are not applied any more; resetting the key cache")
            self.reset()
        if not self._kkt:
            self._origin = now

    # --- editing -------------------------------------------------------------------------------------
    def resolve(self, handle: ModelHandle, cfg: AlphaEditConfig) -> AlphaEditConfig:
        return resolve_batch(handle, cfg, self.name)

    def _compute(self, handle: ModelHandle, requests: list, cfg: AlphaEditConfig) -> Any:
        self._sync(handle, cfg.layers)
        P: dict[int, torch.Tensor] = {}

        def solve(layer, K, R, C):
            if layer not in P:
                P[layer] = self._projector(handle, layer, C, cfg)
            return null_space_update(K, R, P[layer], self._kkt.get(layer), cfg.L2)

        edit, info = memit_family(handle, requests, cfg, solve, keys_after=True, run=self.options)
        for layer, K in info["keys_after"].items():  # keys of the edited model join K_p K_pᵀ
            kkt = K.double() @ K.double().T
            self._kkt[layer] = self._kkt[layer] + kkt if layer in self._kkt else kkt
        return edit

    @staticmethod
    def _projector(handle: ModelHandle, layer: int, C: torch.Tensor, cfg: AlphaEditConfig) -> torch.Tensor:
        chash = corpus_hash(corpus_files(cfg.mom2_corpus))
        key = ("alphaedit.P", layer, cfg.nullspace_threshold, chash, cfg.mom2_tokens)
        if key not in handle.cache:
            name = f"nullspace-L{layer}-{cfg.nullspace_threshold:g}-{chash}-{cfg.mom2_tokens}.pt"

            def compute() -> dict[str, Any]:
                P, dim = nullspace_projector(C, cfg.nullspace_threshold)
                return {"P": P.float(), "dim": dim}

            params = {"layer": layer, "threshold": cfg.nullspace_threshold, "corpus": chash, "tokens": cfg.mom2_tokens}
            state = disk_cached(handle, "nullspace", params, compute, show=("layer",), legacy=name)
            log.info("alphaedit: layer %d null space has %d of %d dimensions", layer, int(state["dim"]),
                     C.shape[0])
            handle.cache[key] = state["P"].to(torch.float64)
        return handle.cache[key]
