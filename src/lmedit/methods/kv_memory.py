"""Gated key–value memory (after NeuralDB, ICLR 2026): one explicit (key, residual) pair per fact at one FFN.

Where MEMIT/AlphaEdit fold a fact into W_out, this editor keeps it as an entry of a memory beside W_out at
layer ℓ (``_memory.MemoryLayer``, rule ``"gate"``):

    out(x) = W_out x + b + [cos(x, k_i) ≥ τ] · r_i     for the key k_i most similar to x, at every position

- key k_i: the input of W_out at the subject's last token (``locate.keys``), averaged over the context
  templates (``key="templates"``, the ROME/r-ROME key) or the plain prompt's (``key="prompt"``);
- residual r_i = v* − (W_out k_p + b): v* is the optimised output of W_out at the subject's last token
  (``locate.values``, ROME's edit site ``"mlp"``, same loss and settings), k_p the plain prompt's key;
- τ (``threshold``): the gate fires only for a matching key. Training-free beyond the value optimisation,
  no weight changes: an edit is added, changed (a newer edit of the same subject and prompt shadows it) or
  deleted exactly, in any order, and the memory grows by one key and one value per fact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ..config import ConfigError, option
from ..locate.keys import compute_keys
from ..locate.pipeline import SMOLLM2_VALUE_STEPS, LocateConfig, Phases, check_layers, target_values, templates_for
from ..locate.templates import flatten, group_mean
from ..registry import register_editor
from ..types import EditRequest
from ._memory import MEMORY_CAPABILITIES, Entries, MemoryEdit, base_module
from .base import Editor, depth_layer

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class KVMemoryConfig(LocateConfig):
    threshold: float = option(0.8, "cosine similarity at or above which a key's residual is added (the gate)")
    key: Literal["templates", "prompt"] = option(
        "templates", "key of a fact: W_out's input at the subject's last token averaged over the context templates "
        "('templates') or of the plain prompt ('prompt')")
    same_fact: float | None = option(
        None, "cosine similarity at or above which a new key is taken for the same fact as an earlier one and "
        "shadows it (the later correction stands; deleting it brings the earlier back); None: only an equal key",
        added=True)

    def validate(self) -> None:
        super().validate()
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.same_fact is not None and not 0 < self.same_fact <= 1:
            raise ConfigError(f"same_fact is a cosine similarity in (0, 1] or None, got {self.same_fact}")
        if isinstance(self.layers, list) and len(self.layers) != 1:
            raise ConfigError(f"kv-memory keeps its memory at exactly one layer; got layers={self.layers}")


@register_editor("kv-memory")
class KVMemory(Editor):
    """A gated key–value memory at one FFN output projection; every fact is its own removable entry."""

    Config = KVMemoryConfig
    capabilities = MEMORY_CAPABILITIES
    relative_cost: ClassVar[float] = 6.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # ROME's layer and value settings (rome.py); τ from benchmarks/lifelong.py on ZsRE (docs/lifelong.md);
        # same_fact 0.95: of the 200 first ZsRE records' key pairs, 70% of a fact's rewordings and none of the
        # 19,667 pairs of different subjects reach it (0.93: 81% and 7; docs/lifelong.md)
        "smollm2-135m": {"layers": [4], "v_num_grad_steps": SMOLLM2_VALUE_STEPS, "context_lengths": [[10, 5]],
                         "threshold": 0.7, "v_optimizer": "lbfgs", "same_fact": 0.95},
    }
    # tiny random models: layer 1 of 4 and no weight decay keep the value effective (as for ROME)
    quick: ClassVar[dict[str, Any]] = {"layers": [1], "v_num_grad_steps": 20, "v_weight_decay": 0.0,
                                       "context_lengths": [], "threshold": 0.9}
    depth_fraction: ClassVar[float] = 0.15

    def resolve(self, handle: ModelHandle, cfg: KVMemoryConfig) -> KVMemoryConfig:
        if cfg.layers is None or cfg.layers == "auto":
            cfg = cfg.replace(layers=[depth_layer(handle, self.depth_fraction)])
        check_layers(handle, cfg.layers)
        return cfg

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: KVMemoryConfig) -> MemoryEdit:
        (layer,) = cfg.layers
        path = handle.adapter.mlp_out.format(layer)
        clock = Phases()
        with clock("templates"):
            groups = templates_for(handle, cfg)
        with clock("keys"):
            keys = compute_keys(handle, requests, [layer], groups)[layer]  # [n, templates, d_ff]
        gid = flatten(groups)[1]
        stored = torch.stack([group_mean(k, gid) for k in keys]) if cfg.key == "templates" else keys[:, 0]
        with clock("values"):
            values = target_values(handle, requests, layer, ["mlp"], groups, cfg, self.options)
        base = base_module(handle, path)
        ref = next(base.parameters())
        with torch.no_grad():
            plain = base(keys[:, 0].to(ref.device, ref.dtype)).float().cpu()  # W_out k_p + b, memory left out
        residuals = torch.stack([v.target("mlp") for v in values]) - plain
        losses = [v.losses[-1] for v in values]
        log.info("kv-memory: %d fact(s) at %s, value loss (last) %s, ‖r‖ %s", len(requests), path,
                 [round(x, 3) for x in losses], [round(float(x), 2) for x in residuals.norm(dim=-1)])
        entries = Entries("gate", stored.float().contiguous(), residuals.float().contiguous(),
                          [float(cfg.threshold)] * len(requests), [r.target_new for r in requests], cfg.same_fact)
        stats = {"layer": layer, "value_loss": losses, "residual_norm": residuals.norm(dim=-1).tolist(),
                 "seconds": clock.seconds}
        return MemoryEdit({path: entries}, meta={"stats": stats})
