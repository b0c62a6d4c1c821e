"""SERAC training: the scope classifier (BCE) and the optional counterfactual adapter (NLL).

Scope classifier (SERAC §3.2, supervised variant): frozen all-MiniLM-L6-v2 embeddings, a learned linear map P
(identity at start), temperature τ and bias b; p(in scope | x, e) = σ(τ · cos(P e_x, P e_e) + b), trained with
BCE on in-scope pairs (the edit's rephrase, with and without the new answer appended, and the edit prompt with
its answer -- teacher-forced scoring shows the classifier prompt+answer text) against out-of-scope pairs (the
locality prompt with and without its answer, and every other edit's queries in the batch).
Counterfactual model: the base model reading "{edit prompt} {target}\\n" before the query; with cf_rank > 0 a
low-rank adapter on the output MLP matrices of the last layers is trained with NLL(y_e | context + x_e').
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ...swaps import ModuleSwap
from ...tokens import with_answer
from ...training.data import TrainExample
from ...training.functional import answer_logprobs, delta_hooks, nll_and_acc, weight_shape
from .router import SERACRouter, context, scope_logits

if TYPE_CHECKING:
    from ...models.handle import ModelHandle


class SERACObjective:
    def __init__(self, handle: ModelHandle, cfg: Any) -> None:
        self.handle, self.cfg = handle, cfg
        torch.manual_seed(cfg.seed)
        dim = cfg.embed_dim
        self.proj = nn.Parameter(torch.eye(dim))
        self.log_temp = nn.Parameter(torch.tensor(float(cfg.init_temperature)).log())
        self.bias = nn.Parameter(torch.tensor(-cfg.init_temperature * cfg.init_cosine))
        n = handle.n_layers
        layers = list(range(max(0, n - cfg.cf_layers), n)) if cfg.cf_rank > 0 else []
        self.cf_paths = [handle.adapter.mlp_out.format(i) for i in layers]
        self.cf_shapes = [weight_shape(handle, p) for p in self.cf_paths]
        dev = handle.device
        self.cf_a = nn.ParameterList(nn.Parameter(torch.zeros(o, cfg.cf_rank, device=dev)) for o, _ in self.cf_shapes)
        self.cf_b = nn.ParameterList(nn.Parameter(torch.randn(i, cfg.cf_rank, device=dev) / i**0.5)
                                     for _, i in self.cf_shapes)
        self._emb: dict[str, torch.Tensor] = {}  # text -> MiniLM embedding, for this training run only

    def body_path(self) -> str:
        """The decoder stack: the module holding the layer container (e.g. ``model`` for ``model.layers``)."""
        return self.handle.adapter.layer_container().rpartition(".")[0]

    # --- trainer interface -------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [self.proj, self.log_temp, self.bias], "lr": self.cfg.lr}]
        if self.cf_paths:
            groups.append({"params": [*self.cf_a, *self.cf_b], "lr": self.cfg.cf_lr})
        return groups

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"proj": self.proj, "log_temp": self.log_temp, "bias": self.bias}
        for i in range(len(self.cf_paths)):
            out[f"cf_a{i}"], out[f"cf_b{i}"] = self.cf_a[i], self.cf_b[i]
        return {k: v.detach() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        want = set(self.state_tensors())
        if set(tensors) != want:
            raise KeyError(f"SERAC state has {sorted(tensors)}, expected {sorted(want)}")
        with torch.no_grad():
            for name, t in tensors.items():
                target = getattr(self, name) if not name.startswith("cf_") else \
                    (self.cf_a if name[3] == "a" else self.cf_b)[int(name[4:])]
                target.copy_(t)

    def embed(self, texts: list[str]) -> torch.Tensor:
        from ...retrieval import get_embedder

        missing = list(dict.fromkeys(t for t in texts if t not in self._emb))
        if missing:
            for t, e in zip(missing, get_embedder(self.handle.cache).encode(missing), strict=True):
                self._emb[t] = e
        return torch.stack([self._emb[t] for t in texts])  # [n, dim]

    def _loss(self, batch: list[TrainExample]) -> tuple[torch.Tensor, dict[str, float]]:
        keys, queries, owner, positive = [], [], [], []
        for i, ex in enumerate(batch):
            r = ex.request
            keys.append(r.text)
            for q, pos in ((ex.rephrase, True), (with_answer(ex.rephrase, r.target_new), True),
                           (with_answer(r.text, r.target_new), True), (ex.loc.prompt, False),
                           (with_answer(ex.loc.prompt, ex.loc.answer), False)):
                queries.append(q)
                owner.append(i)
                positive.append(pos)
        logits = scope_logits(self.embed(keys), self.embed(queries), self.proj, self.log_temp, self.bias)  # [K, Q]
        own = torch.tensor(owner)[None, :] == torch.arange(len(batch))[:, None]
        labels = (own & torch.tensor(positive)[None, :]).float()  # [K, Q]
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        pos, neg = labels.bool(), ~labels.bool()
        loss = 0.5 * (bce[pos].mean() + bce[neg].mean())  # balanced: one positive per ~2K negatives
        metrics = {"edit_acc": float((logits[pos] > 0).float().mean()),
                   "loc_fp": float((logits[neg] > 0).float().mean()), "scope_bce": loss.item()}
        if self.cf_paths:
            cf_nll, cf_acc = self._cf_loss(batch)
            loss = loss + self.cfg.cedit * cf_nll
            metrics.update(cf_nll=cf_nll.item(), cf_acc=cf_acc)
        return loss, metrics

    def _cf_loss(self, batch: list[TrainExample]) -> tuple[torch.Tensor, float]:
        prompts, targets = [], []
        for ex in batch:
            ctx = context(ex.request.text, ex.request.target_new)
            prompts += [ctx + ex.rephrase, ctx + ex.request.text]
            targets += [ex.request.target_new] * 2
        deltas = {p: (a, b) for p, a, b in zip(self.cf_paths, self.cf_a, self.cf_b, strict=True)}
        with delta_hooks(self.handle, deltas):
            logp, labels, rows = answer_logprobs(self.handle, prompts, targets)
        return nll_and_acc(logp, labels, rows)

    def train_step(self, batch: list[TrainExample]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(batch)

    @torch.no_grad()
    def val_step(self, batch: list[TrainExample]) -> dict[str, float]:
        loss, metrics = self._loss(batch)
        return {"loss": loss.item(), **metrics}

    # --- the edit ----------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, requests: list, meta: dict[str, Any], threshold: float | None = None) -> ModuleSwap:
        """A ModuleSwap holding the requests as memory; ``threshold`` overrides the trained config's."""
        body = self.body_path()
        entries = [{"prompt": r.text, "target": r.target_new, "subject": r.subject, "case_id": r.case_id}
                   for r in requests]
        rel = [p[len(body) + 1 :] if body else p for p in self.cf_paths]
        threshold = self.cfg.threshold if threshold is None else threshold
        router = SERACRouter(entries, self.cfg.embed_dim, threshold, rel,
                             [list(s) for s in self.cf_shapes], self.cfg.cf_rank if self.cf_paths else 0)
        state = {"mem_keys": self.embed([r.text for r in requests]).to(self.handle.device),
                 **{k: v.clone() for k, v in self.state_tensors().items()}}
        router.load_state_dict(state)
        return ModuleSwap({body: router}, meta={**meta, "stats": {"memory_size": len(entries)}})
