"""CaliNet (Dong et al., Findings of EMNLP 2022): calibrate facts with a small FFN beside the model's FFN.

For each chosen layer ℓ a calibration FFN with ``width`` slots (paper: 64) is added in parallel:
    FFN'_ℓ(x) = FFN_ℓ(x) + W_o^ex · act(W_i^ex x)            (paper Eq. 4; gated models: act(W_g x) ⊙ W_u x)
with the same activation family as the model's FFN, no biases, and W_o^ex = 0 at the start, so installing
the branch changes nothing. The base model stays frozen; only the calibration weights are trained, with
cross-entropy on the answer tokens of every request (and of its prompt views), all requests in one batch.
The layers below the first calibrated one never change during training, so they run once and are
replayed (``_ffn.frozen_prefix``). The edit is a ModuleSwap that saves only the calibration weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, option
from ..registry import register_editor
from ..swaps import ModuleSwap, register_swap_module
from ..types import EditRequest
from ._ffn import (
    AddToOutput,
    SideFFN,
    answer_batch,
    answer_logits,
    ffn_info,
    frozen_prefix,
    prompt_views,
    rows_already_answered,
    trainable,
)
from .base import Capabilities, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class CaliNetConfig(Config):
    layers: list[int] | None = option(None, "layers whose FFN gets a calibration FFN; None = the last two")
    width: int = option(64, "calibration slots per layer (the paper's ex_size)")
    lr: float = option(1e-3, "Adam learning rate")
    steps: int = option(300, "most training steps")
    weight_decay: float = option(0.0, "Adam weight decay on the calibration weights")
    stop_nll: float = option(0.02, "stop once the mean answer-token NLL is below this")
    prompt_prefixes: list[str] = option([], "extra training views: the request prompt after each prefix")
    seed: int = option(0, "seed of the calibration FFN's input weights")

    def validate(self) -> None:
        if self.width < 1 or self.steps < 1 or self.lr <= 0:
            raise ConfigError("CaliNetConfig.width and steps must be ≥ 1 and lr > 0")


@register_swap_module("calinet.ffn")
class CalibratedFFN(AddToOutput):
    """The model's FFN plus a calibration FFN: output = base(x) + side(x)."""

    def __init__(self, d_model: int, width: int, activation: str, gated: bool, seed: int = 0) -> None:
        super().__init__()
        self._cfg = {"d_model": d_model, "width": width, "activation": activation, "gated": gated, "seed": seed}
        self.side = SideFFN(d_model, width, activation, gated, seed)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.side(x)

    def get_config(self) -> dict[str, Any]:
        return dict(self._cfg)


@register_editor("calinet")
class CaliNet(Editor):
    """Train a zero-initialised side FFN at late layers on the requests; the base model is untouched."""

    Config = CaliNetConfig
    capabilities = Capabilities(batch=True, sequential=True, edit_kind=ModuleSwap)
    relative_cost: ClassVar[float] = 4.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smollm2-135m": {"layers": [28, 29], "width": 64, "lr": 1e-3, "steps": 300},
    }
    quick: ClassVar[dict[str, Any]] = {"width": 16, "lr": 1e-2, "steps": 30}

    def resolve(self, handle: ModelHandle, cfg: CaliNetConfig) -> CaliNetConfig:
        if cfg.layers is None:
            n = handle.n_layers
            cfg = cfg.replace(layers=sorted({max(0, n - 2), n - 1}))
        return cfg

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: CaliNetConfig) -> ModuleSwap:
        infos = [ffn_info(handle, int(layer)) for layer in sorted(set(cfg.layers))]
        modules = {i.mlp: CalibratedFFN(i.d_model, cfg.width, i.activation, i.gated, cfg.seed + i.layer)
                   for i in infos}
        prompts, targets, first_rows = [], [], []
        for r in requests:
            views = prompt_views(r, cfg.prompt_prefixes)
            first_rows.append(len(prompts))  # the request's own prompt
            prompts += views
            targets += [r.target_new] * len(views)
        ab = answer_batch(handle, prompts, targets)
        answered = rows_already_answered(handle, ab)
        already = []
        for k, r in enumerate(requests):
            if answered[first_rows[k]]:
                log.warning("calinet: %r already predicts %r; calibrating anyway", r.text, r.target_new)
                already.append(r.case_id if r.case_id is not None else k)
        edit = ModuleSwap(modules)
        sides = [m.side for m in modules.values()]
        losses = []
        with frozen_prefix(handle, infos[0].layer, ab.inputs), edit.applied(handle), trainable(*sides) as params:
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for _ in range(cfg.steps):
                loss = F.cross_entropy(answer_logits(handle, ab), ab.labels)  # mean answer-token NLL
                losses.append(loss.item())
                if losses[-1] < cfg.stop_nll:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        log.info("calinet: %d step(s), answer NLL %.3f -> %.3f", len(losses), losses[0], losses[-1])
        stats = {"steps": len(losses), "nll_first": losses[0], "nll_last": losses[-1],
                 "layers": [i.layer for i in infos], "already_true": already}
        for m in modules.values():
            m.to(handle.dtype)  # trained in float32, stored like the model
        return ModuleSwap(modules, meta={"stats": stats})
