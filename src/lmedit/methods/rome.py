"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection W_out.

ΔW = Λ uᵀ with u = C⁻¹k / ‖C⁻¹k‖ and Λ = (v* − W k − b) / (kᵀu), so that the edited layer maps the
subject's key k to the optimised value v* (locate/values.py, edit site "mlp").

Keys (``key_mode``, Gupta et al. "Rebuilding ROME"):
- ``"consistent"`` (r-ROME, default): k = k̄, the template-averaged key, in u, in the denominator and in the
  current value W k̄ + b. The update is well conditioned (k̄ᵀC⁻¹k̄ > 0) and sequential editing stays stable.
- ``"original"``: ROME's released code: u from k̄ but the denominator and current value from the plain
  prompt's key k_p. |k_pᵀu| can be tiny, which makes ‖ΔW‖ explode ("disabling edits").
- ``"prompt"``: k_p everywhere.
An edit whose division factor |kᵀu|/‖k‖ is below ``min_division`` is refused; ‖ΔW‖/‖W‖ and the division
factor are logged and stored in ``edit.meta["stats"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ..config import ConfigError, option
from ..hooks import get_module
from ..locate.keys import compute_keys
from ..locate.pipeline import (
    SMOLLM2_VALUE_STEPS,
    LocateConfig,
    Phases,
    auto_layers,
    check_layers,
    target_values,
    templates_for,
    weight_delta,
)
from ..locate.solvers import rank_one
from ..locate.stats import second_moments
from ..locate.templates import flatten, group_mean
from ..registry import register_editor
from .base import Capabilities, Editor, depth_layer

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class ROMEConfig(LocateConfig):
    context_lengths: list[list[int]] = option([[5, 10], [10, 10]], "context templates: [total tokens, samples]")
    mom2_adjustment: bool = option(True, "use u = C⁻¹k (the paper); False: u = k")
    key_mode: Literal["consistent", "original", "prompt"] = option(
        "consistent", "which keys form u, the denominator and W k: r-ROME 'consistent', 'original', 'prompt'")
    min_division: float = option(1e-4, "refuse edits whose |kᵀu|/‖k‖ is below this")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layers, list) and len(self.layers) != 1:
            raise ConfigError(f"ROME edits exactly one layer; got layers={self.layers}")


@register_editor("rome")
class ROME(Editor):
    """Rank-One Model Editing; r-ROME's consistent keys by default."""

    Config = ROMEConfig
    capabilities = Capabilities(batch=False, sequential=True, encoder_decoder=False)
    relative_cost: ClassVar[float] = 12.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # 50 value steps (see SMOLLM2_VALUE_STEPS). 5 context templates (MEMIT's set) instead of the paper's 20:
        # every value step runs 7 rows instead of 22, ~2.3× faster per edit, at equal quality on 20 ZsRE cases
        # (94.1/84.5/95.7 against 93.7/79.2/96.2). L-BFGS reaches the early-stop loss in about half of Adam's
        # steps at equal quality (benchmarks/results/value_speed.md); v_optimizer is an added option, so this
        # preset's config hash changes and cached SmolLM2 ROME cells are recomputed, not reused. bf16 matrix
        # products in the value steps: 1.44x per edit, same steps, same quality on 10 cases
        # (benchmarks/results/value_speed_bf16.md; the 200-case check in docs/speed.md)
        "smollm2-135m": {"layers": [4], "v_num_grad_steps": SMOLLM2_VALUE_STEPS, "context_lengths": [[10, 5]],
                         "v_optimizer": "lbfgs", "v_matmuls": "bf16"},
        "gpt2": {"layers": [3], "v_num_grad_steps": 20, "v_weight_decay": 0.5},
        "gpt2-xl": {"layers": [17], "v_num_grad_steps": 20, "v_weight_decay": 0.5},
        "gpt-j-6b": {"layers": [5], "v_num_grad_steps": 20, "v_weight_decay": 0.5},
        "llama-7b": {"layers": [5]},
    }
    # tiny random models pass δ on only through attention: layer 1 of 4 and no weight decay keep it effective
    quick: ClassVar[dict[str, Any]] = {"layers": [1], "v_num_grad_steps": 20, "v_weight_decay": 0.0,
                                       "mom2_tokens": 3000, "context_lengths": []}
    depth_fraction: ClassVar[float] = 0.15  # SmolLM2 4/29, GPT-J 5/27, Llama-7B 5/31

    def resolve(self, handle: ModelHandle, cfg: ROMEConfig) -> ROMEConfig:
        if cfg.layers == "auto":
            cfg = cfg.replace(layers=auto_layers(handle, 1, self.name))
        if cfg.layers is None:
            cfg = cfg.replace(layers=[depth_layer(handle, self.depth_fraction)])
            log.info("rome: no preset for %s; editing layer %s (%.0f%% of the depth)", handle.name, cfg.layers,
                     100 * self.depth_fraction)
        return cfg

    def _compute(self, handle: ModelHandle, requests: list, cfg: ROMEConfig) -> Any:
        (req,) = requests
        (layer,) = check_layers(handle, cfg.layers)
        clock = Phases()
        with clock("templates"):
            groups = templates_for(handle, cfg)
        with clock("keys"):
            keys = compute_keys(handle, [req], [layer], groups)[layer][0].double()  # [templates, d_ff]
        k_bar, k_p = group_mean(keys, flatten(groups)[1]), keys[0]
        with clock("statistics"):
            C = second_moments(handle, [layer], tokens=cfg.mom2_tokens, corpus=cfg.mom2_corpus)[layer] \
                if cfg.mom2_adjustment else None
        with clock("values"):
            value, = target_values(handle, [req], layer, ["mlp"], groups, cfg, self.options)
        with clock("solve"):
            v_star = value.target("mlp").double()  # [d]
            k_u, k_den = {"consistent": (k_bar, k_bar), "original": (k_bar, k_p),
                          "prompt": (k_p, k_p)}[cfg.key_mode]
            residual = v_star - self._output(handle, layer, k_den)  # v* − (W k + b)
            a, b, division = rank_one(k_u, k_den, residual, C, cfg.min_division)
        log.info("rome: layer %d, value loss %.3f -> %.3f, division factor %.3g", layer, value.losses[0],
                 value.losses[-1], division)
        return weight_delta(handle, {layer: (a, b)}, {
            "division_factor": division, "value_loss": value.losses, "delta_norm": float(value.delta["mlp"].norm()),
            "seconds": clock.seconds,
        })

    @staticmethod
    def _output(handle: ModelHandle, layer: int, k: torch.Tensor) -> torch.Tensor:
        """W_out k + bias in float64."""
        module = get_module(handle.model, handle.adapter.mlp_out.format(layer))
        out = handle.adapter.weight_out_in(module).double() @ k.double()
        bias = getattr(module, "bias", None)
        return out + bias.double() if bias is not None else out
