"""WISE (Wang et al., NeurIPS 2024): a side copy of one FFN's value matrix, routed by activation.

The main memory is W_out (the FFN output projection) at one mid-to-late layer ℓ; a side memory is W_out + τ
(``_wise_memory.WiseLayer``). Per edit (methods-spec B.16):

1. rows: the prompt + new answer in WISE's context templates (greedy-free variant: ``lmedit.locate``'s
   sampled prefixes of the seed words "I", "You", "Because", "Yes", "Q:", 5 and 10 tokens long, plus the
   bare prompt), the prompts and answers of the shard's newest ``replay`` earlier edits (memory replay, so a
   new edit cannot overwrite them on the τ they share) and a fixed set of unrelated sentences
   (``IRRELEVANT``, the paper's "loc_prompt"); while training, a position takes the side memory only where
   the router will send it at inference (answer positions, and Δ at or above the shard's threshold);
2. only the entries of the shard's random mask (ratio ρ) of τ train, with SGD, on
   L = CE(answer | side memory) + relu(Δ_irr − α) + relu(β − Δ_edit) + relu(γ − (Δ_edit − max Δ_irr)),
   Δ(x) = ‖σ(W x + τ x) − σ(W x)‖ per position (σ: the model's activation function), Δ_edit at the positions
   that predict the answer, Δ_irr at every token of the unrelated sentences; α, β, γ are given relative to
   the mean ‖σ(W x)‖ of the unrelated tokens (so they carry over between models; the paper's 5/20/10 are
   absolute for Llama-2-7B); after each step the side memory is clamped to W ± ``norm_constraint``;
3. the smallest Δ_edit reached (replayed edits included) is the edit's threshold statistic; a shard's
   threshold is act_ratio × the smallest statistic of its edits no later edit replayed
   (``WiseLayer.shard_floor``); at inference a position uses the side memory whose Δ reaches its threshold
   (the largest such Δ wins), else W.

Knowledge sharding and merging: edits fill shards of ``shard_size`` (each with its own random mask, trained
from a fresh copy of W); full shards are TIES-merged in groups of ``merge_every`` (WISE-Retrieve of merged
groups, as EasyEdit's default ``retrieve=True``). Differences from the paper: routing is decided per token
position, not per sequence (so padding, batching and cached generation cannot change a row's answer), and the
layers below ℓ run once per edit (they do not change), which with early stopping makes an edit several times
cheaper. Undo of any edit is exact; see ``_wise_memory``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, option
from ..hooks import get_module, set_module, trace
from ..locate.pipeline import Phases
from ..locate.suffix import replaying, with_input_of
from ..locate.templates import context_templates, split_template
from ..metrics.drift import WIKITEXT_VALID, text_ids
from ..metrics.scoring import logits_at
from ..registry import register_editor
from ..types import EditRequest
from ._wise_memory import Sharding, WiseEdit, WiseLayer, activation_fn, shard_mask
from .base import Capabilities, DepthLayer, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

WISE_SEEDS = ("I", "You", "Because", "Yes", "Q:")
# the unrelated sentences whose tokens must keep the main memory (WISE's loc_prompt, fixed here)
IRRELEVANT = (
    "The Pacific Ocean is the largest ocean on Earth.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Who wrote the play Romeo and Juliet? William Shakespeare",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "What is the capital of Japan? Tokyo",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The piano has eighty-eight keys.",
    "How many legs does a spider have? Eight",
    "Mount Everest is the highest mountain above sea level.",
    "She opened the window and the cold air came in.",
    "The stock market fell sharply on Monday morning.",
)


@dataclass
class WISEConfig(Config):
    layer: int | None = option(None, "layer whose FFN output projection gets the side memory (None: 85% of depth)")
    mask_ratio: float = option(0.2, "fraction ρ of the side memory's entries a shard trains (random mask)")
    steps: int = option(40, "SGD steps per edit at most (the paper's n_iter is 70)")
    lr: float = option(4.0, "SGD learning rate (the paper's edit_lr is 1.0; see docs/wise.md for 4.0)")
    weight_decay: float = option(1e-5, "SGD weight decay of the trained entries")
    early_stop: float = option(0.2, "stop once the answer loss is below this, every answer token is the "
                               "argmax and every unrelated token's Δ is below the routing threshold")
    alpha: float = option(0.3, "margin α: largest Δ allowed on unrelated tokens, × mean ‖σ(W x)‖ there")
    beta: float = option(0.6, "margin β: smallest Δ wanted at the edit's answer positions, × the same scale")
    gamma: float = option(0.3, "margin γ: smallest gap between the edit's Δ and the largest unrelated Δ, × scale")
    act_ratio: float = option(0.88, "a position uses a side memory when Δ ≥ act_ratio × its edits' smallest Δ")
    norm_constraint: float = option(1.0, "each side-memory entry stays within ± this of the main memory's")
    templates: int = option(10, "context-template rows per edit besides the bare prompt (0, 5 or 10)")
    unrelated_windows: int = option(
        0, "64-token windows of WikiText-2's valid split, drawn afresh for each edit (seeded by its prompt), whose "
        "tokens the edit also trains to leave on the main memory, besides the built-in unrelated sentences (0: none)",
        added=True)
    replay: int = option(20, "earlier edits of the same shard (the newest this many) whose prompt and answer "
                         "train again with each new edit, so it cannot overwrite them (0: none)")
    shard_size: int = option(500, "edits per shard (the paper's save_freq); a full shard starts a fresh mask")
    merge_every: int = option(2, "full shards TIES-merged into one side memory (merge_freq / save_freq; 1: never)")
    density: float = option(0.53, "TIES trim density of the merge")
    seed: int = option(0, "seed of the shards' random masks")

    def validate(self) -> None:
        if not (0 < self.mask_ratio <= 1 and 0 < self.density <= 1 and 0 < self.act_ratio):
            raise ConfigError("WISEConfig needs 0 < mask_ratio ≤ 1, 0 < density ≤ 1 and act_ratio > 0")
        if self.steps < 1 or self.lr <= 0 or self.weight_decay < 0 or self.early_stop < 0:
            raise ConfigError("WISEConfig needs steps ≥ 1, lr > 0, weight_decay ≥ 0 and early_stop ≥ 0")
        if min(self.alpha, self.beta, self.gamma) < 0 or self.norm_constraint <= 0:
            raise ConfigError("WISEConfig needs margins alpha, beta, gamma ≥ 0 and norm_constraint > 0")
        if self.templates not in (0, 5, 10):
            raise ConfigError(f"templates must be 0, 5 or 10, got {self.templates}")
        if self.replay < 0 or self.unrelated_windows < 0:
            raise ConfigError(f"replay and unrelated_windows must be ≥ 0, got {self.replay} and "
                              f"{self.unrelated_windows}")
        if self.shard_size < 1 or self.merge_every < 1:
            raise ConfigError("WISEConfig needs shard_size ≥ 1 and merge_every ≥ 1")

    def sharding(self) -> Sharding:
        return Sharding(self.shard_size, self.merge_every, self.density, self.act_ratio, self.mask_ratio,
                        self.seed, self.norm_constraint)


class _Training(nn.Module):
    """Stands in for W_out while an edit trains, routed as at inference: a position takes the side memory
    W + τ₀ + scatter(v) when it predicts an answer token (``side_at``) or its Δ reaches ``theta``, else W.

    (Putting every position on the side memory, as before, let an edit rely on the side memory at its prompt
    tokens, which at inference take the main memory: the answer was learned in training and lost when routed.)
    """

    def __init__(self, base: nn.Module, tau0: torch.Tensor, index: torch.Tensor, act,
                 side_at: torch.Tensor) -> None:
        super().__init__()
        self.base, self.tau0, self.index, self.act, self.side_at = base, tau0, index, act, side_at
        self.values = nn.Parameter(torch.zeros(index.numel(), device=tau0.device))
        self.theta = float("inf")  # the routing threshold in force; updated by the training loop
        self.x: torch.Tensor | None = None
        self.main: torch.Tensor | None = None
        self.lead: tuple[int, ...] | None = None  # (rows, positions) of the training batch

    def tau(self) -> torch.Tensor:
        return self.tau0.flatten().index_add(0, self.index, self.values).view_as(self.tau0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        lead = self.lead or x.shape[:-1]  # some FFNs (mixtures of experts) see their tokens flattened
        self.x = x.detach().float().reshape(*lead, x.shape[-1])
        self.main = out.detach().float().reshape(*lead, out.shape[-1])
        side = out.float() + F.linear(x.float(), self.tau())
        with torch.no_grad():
            delta = (self.act(side) - self.act(out.float())).norm(dim=-1)
            fire = (delta >= self.theta) | self.side_at.reshape(delta.shape)
        return torch.where(fire.unsqueeze(-1), side, out.float()).to(out.dtype)


@register_editor("wise")
class WISE(DepthLayer, Editor):
    """Side memory with activation routing, knowledge sharding and TIES merging; any edit undone exactly."""

    Config = WISEConfig
    capabilities = Capabilities(batch=False, sequential=True, edit_kind=WiseEdit, encoder_decoder=False)
    relative_cost: ClassVar[float] = 6.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # methods-spec E: layers[25].mlp.down_proj, ρ 0.2, lr 1.0, 70 steps, act_ratio 0.88 (docs/wise.md)
        "smollm2-135m": {"layer": 25},
    }
    quick: ClassVar[dict[str, Any]] = {"layer": 2, "steps": 30, "templates": 0}

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: WISEConfig) -> WiseEdit:
        (req,) = requests
        layer, clock, cpu0 = cfg.layer, Phases(), time.process_time()
        path = handle.adapter.mlp_out.format(layer)
        module = get_module(handle.model, path)
        memory = module if isinstance(module, WiseLayer) else None
        base = memory.base if memory is not None else module
        shape = tuple(handle.adapter.weight_out_in(base).shape)
        sharding = cfg.sharding()
        shard = memory.open_shard() if memory is not None else None
        if shard is None:
            shard = memory.next_shard() if memory is not None else 0
        device = handle.device
        tau0 = (memory.shard_tau(shard) if memory is not None else torch.zeros(shape)).to(device)
        index = shard_mask(sharding.mask_seed(shard), shape, cfg.mask_ratio).to(device)
        act_name = _activation_name(handle)
        act = activation_fn(act_name)
        with clock("unrelated"):
            a_irr = _inputs_at(handle, path, [handle.tokens.prompt_ids(t) for t in IRRELEVANT])
            with torch.no_grad():
                main_irr = base(a_irr.to(handle.dtype)).float()
            scale = float(act(main_irr).norm(dim=-1).mean())  # the margins' unit: the built-in sentences only
            if cfg.unrelated_windows:
                a_text = _inputs_at(handle, path, _windows(handle, req.text, cfg.unrelated_windows))
                with torch.no_grad():
                    main_irr = torch.cat([main_irr, base(a_text.to(handle.dtype)).float()])
                a_irr = torch.cat([a_irr, a_text])
        prompts, targets = _rows(handle, req, cfg.templates)
        earlier = memory.replay_rows(shard)[-cfg.replay:] if memory is not None and cfg.replay else []
        prompts += [p for p, _ in earlier]
        targets += [t for _, t in earlier]
        batch = handle.tokens.teacher_forced(prompts, targets, "right")
        rows = [i for i in range(len(prompts)) for _ in batch.pred_positions(i)]
        cols = [c for i in range(len(prompts)) for c in batch.pred_positions(i)]
        labels = torch.tensor([t for ls in batch.labels for t in ls], device=device)
        inputs = batch.model_inputs(device)
        side_at = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool, device=device)
        side_at[rows, cols] = True
        trainer = _Training(base, tau0, index, act, side_at)
        trainer.lead = tuple(inputs["input_ids"].shape)
        # the shard's routing statistic before this edit: its threshold after it is act_ratio × min(floor, Δ_edit)
        floor = memory.shard_floor(shard, len(earlier)) if memory is not None else float("inf")
        trainer.theta = cfg.act_ratio * floor
        alpha, beta, gamma = cfg.alpha * scale, cfg.beta * scale, cfg.gamma * scale
        losses: list[float] = []
        set_module(handle.model, path, trainer)
        try:
            with clock("train"):
                _, below = with_input_of(handle, layer, lambda: _no_grad_logits(handle, inputs, rows, cols))
                opt = torch.optim.SGD([trainer.values], lr=cfg.lr, weight_decay=cfg.weight_decay)
                with replaying(handle, layer, below):
                    for _step in range(cfg.steps):
                        logits = logits_at(handle, inputs, rows, cols).float()
                        ce = _row_mean(F.cross_entropy(logits, labels, reduction="none"), rows)
                        tau = trainer.tau()
                        d_in = _delta(act, trainer.main[rows, cols], trainer.x[rows, cols], tau)
                        d_out = _delta(act, main_irr, a_irr, tau)
                        l_act = (F.relu(d_out - alpha).mean() + F.relu(beta - d_in).mean()
                                 + F.relu(gamma - (d_in - d_out.max())).mean())
                        loss = ce + l_act
                        losses.append(float(loss.detach()))
                        lo, hi = min(float(d_in.detach().min()), floor), float(d_out.detach().max())
                        trainer.theta = cfg.act_ratio * lo
                        hit = bool((logits.detach().argmax(-1) == labels).all())
                        log.debug("wise step %d: answer %.4f (argmax right everywhere: %s), routing %.4f "
                                  "(Δ edit ≥ %.3g, unrelated ≤ %.3g)", _step, float(ce.detach()), hit,
                                  float(l_act.detach()), lo, hi)
                        if hit and float(ce.detach()) < cfg.early_stop and hi < cfg.act_ratio * lo:
                            break
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        with torch.no_grad():
                            bound = tau0.flatten()[index]
                            trainer.values.copy_(torch.maximum(torch.minimum(
                                trainer.values, cfg.norm_constraint - bound), -cfg.norm_constraint - bound))
                with torch.no_grad():
                    tau = trainer.tau()
                    d_in = _delta(act, trainer.main[rows, cols], trainer.x[rows, cols], tau)
                    d_out = _delta(act, main_irr, a_irr, tau)
        finally:
            set_module(handle.model, path, module)
        values = trainer.values.detach().float().cpu()
        stats = {"layer": layer, "shard": shard, "steps": len(losses), "replayed": len(earlier),
                 "unrelated_tokens": int(a_irr.shape[0]),
                 "loss": [losses[0], losses[-1]],
                 "delta_edit_min": float(d_in.min()), "delta_unrelated_max": float(d_out.max()),
                 "scale": scale, "seconds": clock.seconds, "cpu_seconds": time.process_time() - cpu0}
        log.info("wise: shard %d at %s, %d steps, loss %.3f -> %.3f, Δ edit ≥ %.3g, unrelated ≤ %.3g (scale %.3g)",
                 shard, path, len(losses), losses[0], losses[-1], stats["delta_edit_min"],
                 stats["delta_unrelated_max"], scale)
        return WiseEdit(path, shard, values, float(d_in.min()), sharding, shape, act_name, meta={"stats": stats},
                        replay=(req.text, req.target_new), replayed=len(earlier))


def _activation_name(handle: ModelHandle) -> str:
    cfg = handle.model.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
    return name if isinstance(name, str) else "identity"


def _rows(handle: ModelHandle, req: EditRequest, n: int) -> tuple[list[str], list[str]]:
    """The edit prompt in the bare template and ``n`` context templates (5 and 10 tokens long)."""
    templates = ["{}"]
    if n:
        lengths = ((6, 5), (11, 5))[: n // 5]  # (tokens with the seed word, samples): one per seed word
        groups = context_templates(handle, lengths, seed_words=WISE_SEEDS)
        templates += [t for g in groups[1:] for t in g]
    prompts = []
    for t in templates:
        before, after = split_template(t)
        prompts.append(before + req.text + after)
    return prompts, [req.target_new] * len(prompts)


def _windows(handle: ModelHandle, seed_text: str, n: int, length: int = 64) -> list[list[int]]:
    """``n`` windows of ``length`` tokens of WikiText-2's valid split (its first 65,536 tokens; no drift number
    reads that split), chosen by a generator seeded with ``seed_text``: the same edit gets the same windows."""
    ids = text_ids(handle, WIKITEXT_VALID, 65_536)
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little"))
    starts = torch.randperm(len(ids) // length, generator=gen)[:n].tolist()
    return [handle.tokens.bos + ids[s * length:(s + 1) * length] for s in starts]


def _inputs_at(handle: ModelHandle, path: str, rows: list[list[int]]) -> torch.Tensor:
    """The inputs of the module at ``path`` at every real token of ``rows`` of token ids ([tokens, d_in],
    float32)."""
    ids, mask = handle.tokens.pad(rows, "right")
    inputs = {"input_ids": ids.to(handle.device), "attention_mask": mask.to(handle.device),
              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(handle.device)}
    with torch.no_grad(), trace(handle.model, path, input=True, output=False, stop=True) as t:
        handle.model(**inputs, use_cache=False)
    x = t.input.reshape(*mask.shape, -1)  # some FFNs (mixtures of experts) see their tokens flattened
    return x[mask.bool().to(handle.device)].float()


def _no_grad_logits(handle: ModelHandle, inputs: dict, rows: list[int], cols: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return logits_at(handle, inputs, rows, cols)


def _delta(act, main: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Routing score Δ = ‖σ(main + τ x) − σ(main)‖ per position."""
    return (act(main + F.linear(x, tau)) - act(main)).norm(dim=-1)


def _row_mean(nll: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Mean over rows of each row's mean NLL (rows of different answer lengths weigh the same)."""
    r = torch.tensor(rows, device=nll.device)
    n = int(r.max()) + 1
    sums = torch.zeros(n, device=nll.device).index_add(0, r, nll)
    counts = torch.zeros(n, device=nll.device).index_add(0, r, torch.ones_like(nll))
    return (sums / counts).mean()
