"""Gated key–value memory (after NeuralDB, ICLR 2026): one explicit (key, residual) pair per fact at one FFN.

Where MEMIT/AlphaEdit fold a fact into W_out, this editor keeps it as an entry of a memory beside W_out at
layer ℓ (``_memory.MemoryLayer``, rule ``"gate"``):

    out(x) = W_out x + b + [cos(x, k_i) ≥ τ] · r_i     for the key k_i most similar to x, at every position

- key k_i: the input of W_out at the subject's last token (``locate.keys``), averaged over the context
  templates (``key="templates"``, the ROME/r-ROME key) or the plain prompt's (``key="prompt"``);
- residual r_i = v* − (W_out k_p + b): v* is the optimised output of W_out at the subject's last token
  (``locate.values``, ROME's edit site ``"mlp"``, same loss and settings), k_p the plain prompt's key;
- τ_i: the gate fires only for a matching key. Each entry's threshold is the shared ``threshold`` raised,
  for a key that also resembles ordinary text, to ``calibrate_margin`` above the key's highest cosine with
  W_out's inputs on a reference text (``calibrate_tokens`` tokens of WikiText-2's valid split, which no
  drift number reads), but never above the cosine with its own prompt's key (the edit still fires there).
  A key taken at a generic token (" 20" in "HK Orange 20") otherwise fires on every " 20" of running text
  (docs/lifelong.md). Training-free beyond the value optimisation,
  no weight changes: an edit is added, changed (a newer edit of the same subject and prompt shadows it) or
  deleted exactly, in any order, and the memory grows by one key and one value per fact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..config import ConfigError, option
from ..locate.keys import compute_keys, token_inputs
from ..locate.pipeline import SMOLLM2_VALUE_STEPS, LocateConfig, Phases, check_layers, target_values, templates_for
from ..locate.templates import flatten, group_mean
from ..metrics.drift import WIKITEXT_VALID, text_ids
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
    calibrate_tokens: int = option(
        16384, "tokens of the reference text on which a new key's gate must stay shut: its threshold rises to "
        "calibrate_margin above the key's highest cosine there (capped at its own prompt's); 0: the shared "
        "threshold for every key")
    calibrate_margin: float = option(0.05, "how far above its highest cosine on the reference text a key's gate "
                                           "opens")
    calibrate_text: str | None = option(None, "a text file to calibrate on instead of WikiText-2's valid split "
                                              "(found as every data file is)")

    def validate(self) -> None:
        super().validate()
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.same_fact is not None and not 0 < self.same_fact <= 1:
            raise ConfigError(f"same_fact is a cosine similarity in (0, 1] or None, got {self.same_fact}")
        if isinstance(self.layers, list) and len(self.layers) != 1:
            raise ConfigError(f"kv-memory keeps its memory at exactly one layer; got layers={self.layers}")
        if self.calibrate_tokens < 0 or not 0 <= self.calibrate_margin < 1:
            raise ConfigError(f"calibrate_tokens must be >= 0 (0: off) and calibrate_margin in [0, 1); got "
                              f"{self.calibrate_tokens} and {self.calibrate_margin}")


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
                         "threshold": 0.7, "v_optimizer": "lbfgs", "v_matmuls": "bf16", "same_fact": 0.95},
    }
    # tiny random models: layer 1 of 4 and no weight decay keep the value effective (as for ROME)
    quick: ClassVar[dict[str, Any]] = {"layers": [1], "v_num_grad_steps": 20, "v_weight_decay": 0.0,
                                       "context_lengths": [], "threshold": 0.9, "calibrate_tokens": 2048}
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
        with clock("calibrate"):
            reference = reference_cosines(handle, layer, stored, cfg)
        bounds, capped = gate_thresholds(stored, keys[:, 0], reference, cfg.threshold, cfg.calibrate_margin)
        for i in capped:
            log.warning("kv-memory: the key of %r is as close to ordinary text (cosine %.2f) as to its own prompt; "
                        "its gate opens at %.3f, so it may also fire on unrelated text", requests[i].subject,
                        float(reference[i]), bounds[i])
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
                          bounds, [r.target_new for r in requests], cfg.same_fact)
        stats = {"layer": layer, "value_loss": losses, "residual_norm": residuals.norm(dim=-1).tolist(),
                 "threshold": bounds, "reference_cosine": None if reference is None else reference.tolist(),
                 "seconds": clock.seconds}
        return MemoryEdit({path: entries}, meta={"stats": stats})


def reference_cosines(handle: ModelHandle, layer: int, keys: torch.Tensor, cfg: KVMemoryConfig
                      ) -> torch.Tensor | None:
    """Each key's highest cosine with W_out's input at any token of the reference text (None: calibration off)."""
    if not cfg.calibrate_tokens:
        return None
    inputs = reference_inputs(handle, layer, cfg)
    return torch.cat([(F.normalize(k, dim=-1).to(inputs.dtype) @ inputs.T).amax(dim=-1).float()
                      for k in keys.float().split(256)])


def reference_inputs(handle: ModelHandle, layer: int, cfg: KVMemoryConfig) -> torch.Tensor:
    """W_out's unit-length inputs at every token of the reference text, [tokens, d_ff] in float16, cached on
    the handle for the edits applied now (the memory at this W_out does not change its inputs; any other edit
    may, so it is part of the cache key)."""
    try:
        ids = text_ids(handle, WIKITEXT_VALID, cfg.calibrate_tokens, cfg.calibrate_text)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"kv-memory calibrates its gates on a reference text and could not read it ({e}); "
                          "point calibrate_text at a plain text file, lower calibrate_tokens, or set "
                          "calibrate_tokens=0 for one threshold for every key") from e
    path = handle.adapter.mlp_out.format(layer)
    below = tuple(e for e in handle.applied_edits if not (isinstance(e, MemoryEdit) and set(e.entries) == {path}))
    key = (path, cfg.calibrate_text, len(ids), tuple(map(id, below)))
    held = handle.cache.get("kv_memory_reference")
    if held is None or held[0] != key:
        log.info("kv-memory: reading %d reference tokens at %s to calibrate the gates", len(ids), path)
        inputs = F.normalize(token_inputs(handle, ids, layer), dim=-1).to(torch.float16)
        handle.cache["kv_memory_reference"] = held = (key, inputs, below)  # the edits held: their ids stay unique
    return held[1]


def gate_thresholds(keys: torch.Tensor, prompt_keys: torch.Tensor, reference: torch.Tensor | None,
                    threshold: float, margin: float) -> tuple[list[float], list[int]]:
    """Per entry: ``threshold``, raised to ``reference + margin`` where that is higher, but never above the
    cosine of the key with its own prompt's key (less a rounding allowance), nor below ``threshold``. Also the
    entries that hit that cap: their gate may still open on text like the reference."""
    if reference is None:
        return [float(threshold)] * len(keys), []
    own = F.cosine_similarity(keys.float(), prompt_keys.float(), dim=-1) - 1e-4
    wanted = (reference + margin).clamp(min=threshold)
    bounds = torch.minimum(wanted, own).clamp(min=threshold)
    capped = [i for i in range(len(keys)) if wanted[i] > own[i] and wanted[i] > threshold]
    return bounds.tolist(), capped
