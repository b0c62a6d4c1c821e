"""MEND's meta-training objective and its edit (Mitchell et al. 2022, eq. 5).

L = c_edit · L_edit(θ'; x_e, x_e') + c_loc · KL(p_θ(·|x_loc) ‖ p_θ'(·|x_loc)), θ' = θ + MEND(∇θ L_edit(θ; x_e)).
The inner gradient's token factors are read with hooks (no parameter of the model gets a gradient), the
edited model θ' is run through forward hooks (the model's weights are never written during training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...digests import tensor_digest
from ...edits import WeightDelta
from ...hooks import get_parameter
from ...training.data import TrainExample
from ...training.functional import (
    capture_grads,
    edit_and_loc_losses,
    edited_paths,
    to_param_factors,
    weight_shape,
)
from ...training.prefix import PrefixCache
from .network import MENDNet

if TYPE_CHECKING:
    from ...models.handle import ModelHandle


class MENDObjective:
    def __init__(self, handle: ModelHandle, cfg: Any) -> None:
        self.handle, self.cfg = handle, cfg
        self.paths = edited_paths(handle, cfg.layers, cfg.matrices)
        torch.manual_seed(cfg.seed)
        shapes = {p: weight_shape(handle, p) for p in self.paths}
        self.net = MENDNet(shapes, cfg.rank, cfg.edit_lr).to(handle.device)
        self.prefix = PrefixCache(handle, min(cfg.layers))  # training only: edits run the whole model

    # --- the trainer's interface -------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        body = [p for n, p in self.net.named_parameters() if n != "lrs"]
        return [{"params": body, "lr": self.cfg.lr}, {"params": [self.net.lrs], "lr": self.cfg.lr_lr}]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(tensors, strict=True)

    def train_step(self, batch: list[TrainExample]) -> tuple[torch.Tensor, dict[str, float]]:
        self.net.train()
        return self._loss(batch, update_stats=True)

    @torch.no_grad()
    def val_step(self, batch: list[TrainExample]) -> dict[str, float]:
        self.net.eval()
        loss, metrics = self._loss(batch, update_stats=False)
        return {"loss": float(loss), **metrics}

    # --- MEND --------------------------------------------------------------------------------------
    def deltas(self, prompts: list[str], targets: list[str], update_stats: bool = False, prefix: Any = None):
        factors, _, pre_acc, _ = capture_grads(self.handle, self.paths, prompts, targets, prefix)
        if update_stats:
            self.net.update_stats(factors)
        return {p: self.net(p, u, d) for p, (u, d) in factors.items()}, pre_acc

    def _loss(self, batch: list[TrainExample], update_stats: bool) -> tuple[torch.Tensor, dict[str, float]]:
        reqs = [ex.request for ex in batch]
        deltas, pre_acc = self.deltas([r.text for r in reqs], [r.target_new for r in reqs], update_stats,
                                      self.prefix)
        edit_nll, edit_acc, kl = edit_and_loc_losses(self.handle, batch, deltas, self.prefix)
        loss = self.cfg.cedit * edit_nll + self.cfg.cloc * kl
        return loss, {"edit_acc": edit_acc, "pre_acc": pre_acc, "edit_nll": edit_nll.item(), "loc_kl": kl.item()}

    @torch.no_grad()
    def edit(self, requests: list, meta: dict[str, Any]) -> WeightDelta:
        """The WeightDelta of a batch of requests: one low-rank (A, B) pair per edited matrix."""
        self.net.eval()
        deltas, pre_acc = self.deltas([r.text for r in requests], [r.target_new for r in requests])
        model = self.handle.model
        out, digests, rel = {}, {}, {}
        for p, (a, b) in deltas.items():
            name = f"{p}.weight"
            param = get_parameter(model, name)
            out[name] = to_param_factors(self.handle, a.detach().float(), b.detach().float())
            digests[name] = tensor_digest(param)
            rel[name] = float((a @ b.T).norm() / param.float().norm().clamp_min(1e-12))
        meta = {**meta, "stats": {"relative_norm": rel, "pre_edit_token_acc": pre_acc,
                                  "step_sizes": [float(x) for x in self.net.lrs]}}
        return WeightDelta(out, digests, meta)
