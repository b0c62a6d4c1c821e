"""KE -- KnowledgeEditor (De Cao et al., EMNLP 2021), in its "EFK" form on the MLP weights of the last layers.

A hypernetwork reads a condition text c = "{orig_pred} >> {new} || {prompt}" (frozen input embeddings of the
base model -> BiLSTM -> Linear+tanh) and, per edited matrix W [m, n], predicts rank-1 masks and a gate:

    α = softmax(a_row) ⊗ a_col,  β = softmax(b_row) ⊗ b_col,  ΔW = max_scale · σ(η) · (α ⊙ ∇W + β)   (KE eq. 2)

with ∇W the fine-tuning gradient of the edit loss (scaled to unit RMS here, so that the hypernetwork sees a
scale-free input: the gradients of different models differ by orders of magnitude). Training solves the
constrained problem  min L_edit  s.t.  KL(p_θ ‖ p_θ+Δ) ≤ m_KL  with a Lagrange multiplier λ updated by gradient
ascent (KE eq. 4). Edits are dense WeightDeltas; a batch of requests sums their updates.

How λ moves (``multiplier``): KE's own code keeps λ itself as the parameter (from 1, clamped at 0 after each
step), so under a normalising optimiser it rises by about ``lr_alpha`` per step while the KL is over the
margin (``"linear"``). lmedit's first KE kept log λ instead (``"log"``, the default so that earlier checkpoints
and results keep their meaning): the same steps then multiply λ by e^lr_alpha each, so a KL far over the margin
for 100 steps takes λ from 1 to ~2·10⁴, and its gradient λ·(KL − m) then dominated the clipped gradient norm
and starved the editor's (see docs/methods/trained.md). In ``"linear"`` mode λ is clipped apart from the editor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ..config import option
from ..digests import tensor_digest
from ..edits import WeightDelta
from ..hooks import get_parameter
from ..registry import register_editor
from ..training.data import TrainExample
from ..training.functional import capture_grads, edit_and_loc_losses, edited_paths, weight_shape
from ..training.prefix import PrefixCache
from ..types import EditRequest
from .base import Capabilities
from .trained import LastLayersEditor, TrainedConfig

if TYPE_CHECKING:
    from ..models.handle import ModelHandle


@dataclass
class KEConfig(TrainedConfig):
    layers: list[int] | None = option(None, "layers whose MLP matrices are edited (None: the last 3)")
    matrices: Literal["in", "out", "both"] = option("both", "which MLP matrices: input projection(s), output, both")
    lstm_hidden: int = option(128, "BiLSTM hidden size per direction of the condition encoder")
    cond_dim: int = option(1024, "size of the condition vector c")
    head_hidden: int = option(128, "hidden size of each matrix's mask MLP")
    max_scale: float = option(1.0, "max_scale of ΔW")
    init_step: float = option(1e-3, "initial step along the unit-RMS gradient (sets a_col's initial bias)")
    kl_margin: float = option(1e-3, "m_KL: the locality KL the constraint allows")
    lr_alpha: float = option(0.1, "learning rate of the Lagrange multiplier λ (gradient ascent)")
    cedit: float = option(1.0, "weight of the edit loss")
    multiplier: Literal["log", "linear"] = option(
        "log", "how the Lagrange multiplier λ is kept: 'linear' as in KE's code (λ itself, from 1, clamped at 0, "
               "rising ~lr_alpha per step; clipped apart from the editor), 'log' (log λ: λ grows ×e^lr_alpha per "
               "step; lmedit's first KE)", added=True)


class ConditionEncoder(nn.Module):
    """Frozen token embeddings -> 1-layer BiLSTM -> Linear + tanh (KE §3)."""

    def __init__(self, d_embed: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_embed, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, cond_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(emb[None])  # h: [2, 1, hidden]
        return torch.tanh(self.proj(torch.cat([h[0, 0], h[1, 0]])))  # [cond_dim]


class MaskHead(nn.Module):
    """c -> (a_row [m], a_col [n], b_row [m], b_col [n], η) for one matrix W [m, n]."""

    def __init__(self, cond_dim: int, hidden: int, m: int, n: int, init_col: float) -> None:
        super().__init__()
        self.m, self.n = m, n
        self.inp = nn.utils.parametrizations.weight_norm(nn.Linear(cond_dim, hidden))
        self.out = nn.Linear(hidden, 2 * (m + n) + 1)
        with torch.no_grad():
            self.out.weight.mul_(0.01)
            self.out.bias.zero_()
            self.out.bias[m : m + n] = init_col  # α starts as a uniform descent step
            self.out.bias[2 * m + n : 2 * (m + n)] = 0.0

    def forward(self, c: torch.Tensor, grad: torch.Tensor, max_scale: float) -> torch.Tensor:
        m, n = self.m, self.n
        o = self.out(torch.tanh(self.inp(c)))
        a_row, a_col, b_row, b_col, eta = o[:m], o[m : m + n], o[m + n : 2 * m + n], o[2 * m + n : -1], o[-1]
        alpha = torch.softmax(a_row, 0)[:, None] * a_col[None, :]  # [m, n]
        beta = torch.softmax(b_row, 0)[:, None] * b_col[None, :]  # [m, n]
        return max_scale * torch.sigmoid(eta) * (alpha * grad + beta)


class KENet(nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, int]], d_embed: int, cfg: KEConfig) -> None:
        super().__init__()
        self.paths = list(shapes)
        self.encoder = ConditionEncoder(d_embed, cfg.lstm_hidden, cfg.cond_dim)
        # a uniform α of -init_step/(σ(0)·max_scale) in every entry: softmax(a_row) = 1/m
        self.heads = nn.ModuleList(
            MaskHead(cfg.cond_dim, cfg.head_hidden, m, n, -cfg.init_step * m / (0.5 * cfg.max_scale))
            for m, n in shapes.values())
        if cfg.multiplier == "linear":
            self.lambda_kl = nn.Parameter(torch.ones(()))  # λ itself, starts at 1, kept >= 0 (KEObjective.after_step)
        else:
            self.log_lambda = nn.Parameter(torch.zeros(()))  # λ = exp(log λ), starts at 1

    def multiplier(self) -> nn.Parameter:
        return self.lambda_kl if hasattr(self, "lambda_kl") else self.log_lambda

    def lam(self) -> torch.Tensor:
        return self.lambda_kl if hasattr(self, "lambda_kl") else self.log_lambda.exp()


class KEObjective:
    def __init__(self, handle: ModelHandle, cfg: KEConfig) -> None:
        self.handle, self.cfg = handle, cfg
        self.paths = edited_paths(handle, cfg.layers, cfg.matrices)
        torch.manual_seed(cfg.seed)
        d_embed = handle.model.get_input_embeddings().weight.shape[1]
        shapes = {p: weight_shape(handle, p) for p in self.paths}
        self.net = KENet(shapes, d_embed, cfg).to(handle.device)
        # gradient *ascent* on λ: the optimiser descends, so its gradient is negated (KE's Lagrangian)
        self.net.multiplier().register_hook(lambda g: -g)
        self.prefix = PrefixCache(handle, min(cfg.layers))  # training only: edits run the whole model

    def param_groups(self) -> list[dict[str, Any]]:
        lam = self.net.multiplier()
        body = [p for p in self.net.parameters() if p is not lam]
        # "clip": False keeps λ's gradient out of the editor's clipped norm (linear mode, as KE's code)
        return [{"params": body, "lr": self.cfg.lr},
                {"params": [lam], "lr": self.cfg.lr_alpha, "clip": self.cfg.multiplier != "linear"}]

    def after_step(self) -> None:
        """λ stays a valid multiplier: clamped at 0 after each step in linear mode (KE's code does the same)."""
        if self.cfg.multiplier == "linear":
            with torch.no_grad():
                self.net.lambda_kl.clamp_(min=0.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(tensors, strict=True)

    def _condition(self, r: EditRequest) -> torch.Tensor:
        orig = r.target_true if r.target_true else self._first_prediction(r.text)
        text = f"{orig} >> {r.target_new} || {r.text}"
        ids = torch.tensor(self.handle.tokens.encode(text) or [self.handle.tokens.pad_id], device=self.handle.device)
        with torch.no_grad():
            emb = self.handle.model.get_input_embeddings()(ids).float()  # [len, d]
        return self.net.encoder(emb)

    @torch.no_grad()
    def _first_prediction(self, prompt: str) -> str:
        """The model's greedy next token (its own answer, when the request does not give the true one)."""
        batch = self.handle.tokens.teacher_forced([self.handle.render(prompt)], ["x"])
        pos = batch.pred_positions(0)[0]
        token = int(self.handle.logits(batch)[0, pos].argmax())
        return self.handle.tokenizer.decode([token]).strip()

    def deltas(self, requests: list[EditRequest], prefix: Any = None) -> tuple[dict[str, torch.Tensor], float]:
        """Dense ΔW [d_out, d_in] per edited matrix, summed over the requests."""
        factors, _, pre_acc, rows = capture_grads(self.handle, self.paths, [r.text for r in requests],
                                                  [r.target_new for r in requests], prefix)
        conds = [self._condition(r) for r in requests]
        out: dict[str, torch.Tensor] = {}
        for head, p in zip(self.net.heads, self.paths, strict=True):
            u, d = factors[p]
            total = 0
            for i, c in enumerate(conds):
                sel = rows == i
                g = d[sel].T @ u[sel]  # ∇W of request i: [d_out, d_in]
                g = g / g.pow(2).mean().sqrt().clamp_min(1e-12)  # unit RMS
                total = total + head(c, g, self.cfg.max_scale)
            out[p] = total
        return out, pre_acc

    def _loss(self, batch: list[TrainExample]) -> tuple[torch.Tensor, dict[str, float]]:
        deltas, pre_acc = self.deltas([ex.request for ex in batch], self.prefix)
        edit_nll, edit_acc, kl = edit_and_loc_losses(self.handle, batch, deltas, self.prefix)
        lam = self.net.lam()
        loss = self.cfg.cedit * edit_nll + lam * (kl - self.cfg.kl_margin)
        return loss, {"edit_acc": edit_acc, "pre_acc": pre_acc, "edit_nll": edit_nll.item(), "loc_kl": kl.item(),
                      "lambda": lam.item()}

    def train_step(self, batch: list[TrainExample]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(batch)

    @torch.no_grad()
    def val_step(self, batch: list[TrainExample]) -> dict[str, float]:
        _, metrics = self._loss(batch)
        # validation loss without the multiplier, so that a growing λ does not look like a worse editor
        return {"loss": self.cfg.cedit * metrics["edit_nll"] + metrics["loc_kl"], **metrics}

    def constraint_violation(self, metrics: dict[str, float]) -> float:
        """KE trains under locality KL <= m_KL: the best checkpoint is one that keeps it (see Trainer)."""
        return metrics["loc_kl"] - self.cfg.kl_margin

    @torch.no_grad()
    def edit(self, requests: list[EditRequest], meta: dict[str, Any]) -> WeightDelta:
        deltas, pre_acc = self.deltas(requests)
        out, digests, rel = {}, {}, {}
        for p, dw in deltas.items():
            name = f"{p}.weight"
            param = get_parameter(self.handle.model, name)
            out[name] = self.handle.adapter.to_param_layout(dw.float())
            digests[name] = tensor_digest(param)
            rel[name] = float(dw.norm() / param.float().norm().clamp_min(1e-12))
        return WeightDelta(out, digests, {**meta, "stats": {"relative_norm": rel, "pre_edit_token_acc": pre_acc}})


@register_editor("ke")
class KE(LastLayersEditor):
    """Conditioned hypernetwork (KnowledgeEditor) -> dense WeightDelta; batch-capable."""

    Config: ClassVar[type] = KEConfig
    objective_class = KEObjective
    capabilities: ClassVar[Capabilities] = Capabilities(batch=True, sequential=True, needs_fit=True,
                                                         edit_kind=WeightDelta, encoder_decoder=True)
    quick: ClassVar[dict[str, Any]] = {"steps": 8, "batch_size": 2, "lr": 3e-3, "cond_dim": 32, "lstm_hidden": 16,
                                       "head_hidden": 16, "init_step": 3e-3, "val_every": 4, "val_size": 1,
                                       "val_batches": 1, "patience": 0}

