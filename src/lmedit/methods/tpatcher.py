"""T-Patcher (Huang et al., ICLR 2023): one extra FFN neuron ("patch") per edit in the last FFN layer.

A patch is a key k_p ∈ R^d with bias b_p and a value v_p ∈ R^d. On the FFN input x it adds
    FFN'(x) = FFN(x) + act(k_pᵀ x + b_p) · v_p
to the FFN output. For a plain FFN (W_out·act(W_in x + b)) that is exactly one more row of W_in (with its
bias) and one more column of W_out; for a gated FFN (W_down·(act(W_gate x) ⊙ W_up x)) it is one more row
of W_gate (k_p, bias b_p) and of W_up (zero weights, bias 1) and one more column of W_down. It is built as
a ModuleSwap around the FFN module instead of resizing the model's weights, so patches nest (sequential
edits) and each edit's patches are reverted exactly.

Training works in standardised coordinates x̃ = (x − μ)/σ, μ and σ the per-dimension mean and deviation of
the memory below, and the key is folded back into x's coordinates afterwards (k ← k/σ, b ← b − kᵀμ), so a
saved patch is a plain neuron. Why: the FFN inputs of a decoder LM share a large common component (on
SmolLM2's last layer one dimension carries ~7 of a norm of ~10, and memory rows have cosine ~0.7 with an
edit's input), so the paper's init k_p = h̄/‖h̄‖² fires on ordinary text almost as strongly as on the edit
(z ≈ 0.8 vs 1), the memory loss then dominates and drives the patch silent everywhere, and Adam's step
(lr 1e-2 per coordinate) is larger than the key's coordinates (~4e-3): the edit never held. In x̃ the edit
separates from the memory (memory max z̃ ≈ 0.4 of the edit's), and the init picks k = α·h̃/‖h̃‖² and b so that
the edit starts at z = margin_act + 3 and the most edit-like memory row at min(margin_mem, z_edit −
margin_gap) − 1, i.e. the margins of the losses below already hold at step 0 when the data allow it.
v_p = e ⊙ s with e random and s = ``amplify`` (the paper's amplify_con). Loss (paper Eq. 5-7):
    L = L_edit + alc·L_act + mlc·L_mem
    L_edit: label-smoothed NLL of the target tokens;
    L_act  = mean over the top-5 of exp(margin_act − z_edit)           (keep the patch firing on the edit);
    L_mem  = mean top-k exp(z_mem − margin_mem) + mean top-k exp(z_mem − (min z_edit − margin_gap))
             (keep it silent on a memory of FFN inputs from ordinary text: WikiText, cached per model).
Training stops once the edit holds (argmax = target at every answer position) and L_act < ``stop_act``;
if a patch cannot make it hold within ``steps``, another neuron is added (at most ``max_patches``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, option
from ..hooks import trace
from ..io import atomic_write, cache_key, cache_path, file_lock, lmedit_home
from ..registry import register_editor
from ..swaps import ModuleSwap, register_swap_module
from ..types import EditRequest
from ._ffn import (
    AddToOutput,
    FFNInfo,
    act_fn,
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

CORPUS = "corpus/wikitext-2_valid.tokens.txt"  # under the data folder (see lmedit.data.paths)


@dataclass
class TPatcherConfig(Config):
    layer: int | None = option(None, "FFN layer that gets the patches; None = the last layer")
    max_patches: int = option(5, "most neurons added for one edit")
    steps: int = option(100, "most training steps per patch")
    lr: float = option(1e-2, "Adam learning rate")
    weight_decay: float = option(0.01, "Adam weight decay")
    alc: float = option(1.0, "weight of the activation loss L_act")
    mlc: float = option(10.0, "weight of the memory loss L_mem")
    margin_act: float = option(0.0, "the patch's pre-activation on the edit should exceed this")
    margin_mem: float = option(-3.0, "the patch's pre-activation on memory should stay below this")
    margin_gap: float = option(3.0, "... and below (min edit pre-activation − margin_gap)")
    memory_topk: int = option(1000, "memory losses average the top-k largest terms")
    label_smoothing: float = option(0.1, "label smoothing of the edit loss")
    amplify: float = option(10.0, "initial scale s of the value v_p = e ⊙ s")
    stop_act: float = option(0.1, "stop once the edit holds and L_act is below this")
    act_positions: Literal["target", "last_prompt"] = option(
        "target", "where the patch must fire: every answer-predicting position, or the last prompt token")
    activation: str | None = option(None, "patch activation; None = the model's FFN activation")
    memory_size: int = option(20000, "FFN inputs from WikiText kept as memory (cached per model and layer)")
    memory_chunk: int = option(128, "tokens per WikiText chunk when collecting the memory")
    corpus: str | None = option(None, "plain-text corpus the memory is collected from "
                                "(None: WikiText in the data folder)")
    prompt_prefixes: list[str] = option([], "extra training views: the request prompt after each prefix")
    seed: int = option(0, "seed of the random value direction e")

    def validate(self) -> None:
        if self.max_patches < 1 or self.steps < 1 or self.memory_size < 1:
            raise ConfigError("TPatcherConfig.max_patches, steps and memory_size must be ≥ 1")


@register_swap_module("t-patcher.patches")
class Patches(AddToOutput):
    """FFN output + Σ_p act(k_pᵀ x + b_p) · (e_p ⊙ s_p): ``n`` patch neurons beside the FFN."""

    def __init__(self, d_model: int, n: int, activation: str) -> None:
        super().__init__()
        self._cfg = {"d_model": d_model, "n": n, "activation": activation}
        self.key = nn.Parameter(torch.zeros(n, d_model))  # [n, d]
        self.bias = nn.Parameter(torch.zeros(n))  # [n]
        self.value_dir = nn.Parameter(torch.zeros(n, d_model))  # e [n, d]
        self.value_scale = nn.Parameter(torch.ones(n, d_model))  # s [n, d]
        self.act = act_fn(activation)
        self.last_z: torch.Tensor | None = None  # pre-activations of the last forward, kept while training
        self.record = False
        self.shift: torch.Tensor | None = None  # μ [d] and σ [d] while training in standardised coordinates
        self.scale: torch.Tensor | None = None

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        key, bias = self.key.float(), self.bias.float()  # [n, d], [n]
        if self.shift is not None:  # ((x − μ)/σ)·k + b, without materialising the standardised x
            key = key / self.scale
            bias = bias - key @ self.shift
        return x.float() @ key.T + bias  # [..., n]

    def standardise(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Read the key in x̃ = (x − shift)/scale coordinates until ``fold``."""
        self.shift, self.scale = shift.float(), scale.float()

    @torch.no_grad()
    def fold(self) -> None:
        """Fold the standardisation into key and bias: the same pre-activation, on x directly."""
        if self.shift is None:
            return
        key = self.key.float() / self.scale  # [n, d]
        self.bias.copy_(self.bias.float() - key @ self.shift)
        self.key.copy_(key)
        self.shift = self.scale = None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre(x)
        if self.record:
            self.last_z = z
        return self.act(z) @ (self.value_dir * self.value_scale).float()  # [..., d]

    def get_config(self) -> dict[str, Any]:
        return dict(self._cfg)

    @classmethod
    def concat(cls, parts: list[Patches]) -> Patches:
        """One module holding the neurons of several (same output as nesting them)."""
        d, act = parts[0]._cfg["d_model"], parts[0]._cfg["activation"]
        out = cls(d, sum(p._cfg["n"] for p in parts), act)
        with torch.no_grad():
            for name in ("key", "bias", "value_dir", "value_scale"):
                getattr(out, name).copy_(torch.cat([getattr(p, name) for p in parts]))
        out.requires_grad_(False)
        return out


# --- memory of ordinary FFN inputs ----------------------------------------------------------------------

def _corpus_path(cfg: TPatcherConfig) -> Path:
    """The memory corpus: the configured file, else WikiText found like every data file."""
    if cfg.corpus is not None:
        return Path(cfg.corpus).expanduser()
    from ..data.paths import find_data_file

    return find_data_file(CORPUS)


def _corpus_chunks(handle: ModelHandle, path: Path, chunk: int, n_tokens: int) -> list[list[int]]:
    if not path.exists():
        raise FileNotFoundError(f"memory corpus {path} not found; set TPatcherConfig.corpus to a text file")
    ids: list[int] = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("="):  # blank lines and WikiText section headings
                continue
            ids += handle.tokens.encode(" " + line)
            if len(ids) >= n_tokens + chunk:
                break
    return [ids[i:i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]


@torch.no_grad()
def ffn_input_memory(handle: ModelHandle, info: FFNInfo, cfg: TPatcherConfig) -> torch.Tensor:
    """``memory_size`` FFN inputs [M, d] of layer ``info.layer`` on WikiText (handle + disk cache)."""
    corpus = _corpus_path(cfg)
    key = f"ffn_input_memory:{info.layer}:{cfg.memory_size}:{cfg.memory_chunk}:{corpus.name}"
    if key in handle.cache:
        return handle.cache[key]
    from safetensors.torch import load_file, save_file

    folder = lmedit_home() / "cache" / "ffn_memory"
    params = {"layer": info.layer, "size": cfg.memory_size, "chunk": cfg.memory_chunk, "corpus": corpus.stem}
    file = cache_path(folder, cache_key("ffn-memory", handle.fingerprint, params, show=("layer", "size")),
                      ".safetensors", legacy=folder / f"{handle.fingerprint}-L{info.layer}-n{cfg.memory_size}-"
                                                      f"c{cfg.memory_chunk}-{corpus.stem}.safetensors")
    with file_lock(file.with_name(f".{file.name}.lock"), blocking=True):  # one process computes, the others read
        mem = None
        if file.exists():
            try:
                mem = load_file(file)["memory"]
            except Exception as e:  # noqa: BLE001  (a corrupt cache file is recomputed)
                log.warning("t-patcher: ignoring unreadable memory cache %s (%s)", file, e)
        if mem is None or mem.ndim != 2 or mem.shape[1] != info.d_model:
            mem = _collect_memory(handle, info, cfg, corpus)
            atomic_write(file, lambda tmp: save_file({"memory": mem.cpu().contiguous()}, tmp))
            log.info("t-patcher: cached %d FFN inputs of layer %d at %s", len(mem), info.layer, file)
    handle.cache[key] = mem.to(handle.device)
    return handle.cache[key]


def _collect_memory(handle: ModelHandle, info: FFNInfo, cfg: TPatcherConfig, corpus: Path) -> torch.Tensor:
    chunks = _corpus_chunks(handle, corpus, cfg.memory_chunk, cfg.memory_size)
    tp, dev, out, have = handle.tokens, handle.device, [], 0
    for s in range(0, len(chunks), 8):
        rows = [tp.bos + c if not handle.is_encoder_decoder else c for c in chunks[s:s + 8]]
        ids = torch.tensor(rows, device=dev)  # [b, chunk]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if handle.is_encoder_decoder:  # the decoder re-reads the chunk, teacher forced
            start = torch.full((len(rows), 1), tp.decoder_start_id, device=dev)
            inputs["decoder_input_ids"] = torch.cat([start, ids[:, :-1]], 1)
        with trace(handle.model, info.mlp, input=True, output=False, stop=True) as t:
            handle.model(**inputs, use_cache=False)
        x = t.input.float().reshape(-1, info.d_model)  # [b·chunk, d]
        out.append(x)
        have += len(x)
        if have >= cfg.memory_size:
            break
    return torch.cat(out)[: cfg.memory_size]


# --- the editor -----------------------------------------------------------------------------------------

def _exp(x: torch.Tensor, limit: float = 20.0) -> torch.Tensor:
    """exp(x) up to ``limit``, continued linearly above it (same value and slope there): the margin losses
    stay finite with a useful gradient when a pre-activation runs far past its margin (plain exp overflowed
    to inf, then NaN, on 2 of 200 ZsRE cases)."""
    e = torch.exp(x.clamp(max=limit))
    return torch.where(x > limit, e * (1 + x - limit), e)


def _top_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x.flatten(), min(k, x.numel())).values.mean()


@register_editor("t-patcher")
class TPatcher(Editor):
    """Add up to ``max_patches`` trained neurons to the last FFN until the edit holds."""

    Config = TPatcherConfig
    capabilities = Capabilities(batch=False, sequential=True, edit_kind=ModuleSwap)
    relative_cost: ClassVar[float] = 3.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smollm2-135m": {"layer": 29, "lr": 1e-2, "alc": 1.0, "mlc": 10.0, "memory_size": 20000},
    }
    # tiny random models: a small memory, and mlc = 1 because their near-identical hidden states make the
    # memory loss (mlc = 10) fight the edit
    quick: ClassVar[dict[str, Any]] = {"memory_size": 300, "memory_chunk": 32, "steps": 40, "max_patches": 2,
                                       "mlc": 1.0, "memory_topk": 100}

    def resolve(self, handle: ModelHandle, cfg: TPatcherConfig) -> TPatcherConfig:
        return cfg.replace(layer=handle.n_layers - 1) if cfg.layer is None else cfg

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: TPatcherConfig) -> ModuleSwap:
        (req,) = requests
        info = ffn_info(handle, cfg.layer)
        activation = cfg.activation or info.activation
        memory = ffn_input_memory(handle, info, cfg)  # [M, d]
        views = prompt_views(req, cfg.prompt_prefixes)
        ab = answer_batch(handle, views, [req.target_new] * len(views))
        already = rows_already_answered(handle, ab)[0]  # row 0: the request's own prompt
        if already:
            log.warning("t-patcher: %r already predicts %r; patching anyway", req.text, req.target_new)
        act_rows, act_cols = ab.rows, ab.cols
        if cfg.act_positions == "last_prompt":  # the first prediction of each row
            first = torch.ones_like(ab.rows, dtype=torch.bool)
            first[1:] = ab.rows[1:] != ab.rows[:-1]
            act_rows, act_cols = ab.rows[first], ab.cols[first]
        parts: list[Patches] = []
        history = []
        shift, scale = memory.mean(0), memory.std(0).clamp(min=1e-6)  # [d]
        with frozen_prefix(handle, info.layer, ab.inputs):
            for n in range(cfg.max_patches):
                patch = Patches(info.d_model, 1, activation).to(handle.device)
                patch.standardise(shift, scale)
                self._init_patch(handle, info, ab, act_rows, act_cols, patch, memory, cfg, cfg.seed + n)
                held, steps = self._train(handle, info, ab, act_rows, act_cols, memory, parts, patch, cfg)
                patch.fold()
                parts.append(patch)
                history.append(steps)
                if held:
                    break
        log.info("t-patcher: %d patch(es), steps %s, edit %s", len(parts), history, "holds" if held else "fails")
        stats = {"patches": len(parts), "steps": history, "held": held, "layer": info.layer, "already_true": already}
        merged = Patches.concat(parts).to(handle.dtype)  # trained in float32, stored like the model
        return ModuleSwap({info.mlp: merged}, meta={"stats": stats})

    @staticmethod
    @torch.no_grad()
    def _init_patch(handle: ModelHandle, info: FFNInfo, ab: Any, rows: torch.Tensor, cols: torch.Tensor,
                    patch: Patches, memory: torch.Tensor, cfg: TPatcherConfig, seed: int) -> None:
        """k = α·h̃/‖h̃‖² and b in standardised coordinates (see the module docstring); v = e ⊙ amplify."""
        with trace(handle.model, info.mlp, input=True, output=False, stop=True) as t:
            handle.model(**ab.inputs, use_cache=False)
        x = t.input[rows, cols].float()  # [n_act, d]
        h = ((x - patch.shift) / patch.scale).mean(0)  # h̃ [d]
        k = h / h.pow(2).sum()  # z̃(h̃) = 1
        patch.key.copy_(k[None])
        patch.bias.zero_()
        ratio = float(patch.pre(memory).max())  # z̃ of the most edit-like memory row
        z_edit = cfg.margin_act + 3.0  # exp(−3) < stop_act: the activation loss starts satisfied
        z_mem = min(cfg.margin_mem, z_edit - cfg.margin_gap) - 1.0
        if ratio < 1.0:  # separable along h̃: α(1 − ratio) = z_edit − z_mem
            alpha = (z_edit - z_mem) / (1.0 - ratio)
            patch.key.copy_((alpha * k)[None])
            patch.bias.fill_(z_edit - alpha)
        # else: an edit input no further out than the memory: start at z = 1 and let training separate
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(info.d_model, generator=g)
        patch.value_dir.copy_((e / e.norm())[None])
        patch.value_scale.fill_(cfg.amplify)

    def _train(self, handle: ModelHandle, info: FFNInfo, ab: Any, rows: torch.Tensor, cols: torch.Tensor,
               memory: torch.Tensor, earlier: list[Patches], patch: Patches,
               cfg: TPatcherConfig) -> tuple[bool, int]:
        """Train one patch (earlier ones fixed, installed beneath it); True once the edit holds."""
        modules = [Patches.concat(earlier)] if earlier else []
        swaps = [ModuleSwap({info.mlp: m}) for m in [*modules, patch]]
        patch.record = True
        held, step = False, 0
        try:
            for s in swaps:
                s.apply(handle)
            with trainable(patch) as params:
                opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                while step < cfg.steps:
                    step += 1
                    logits = answer_logits(handle, ab)  # [n, vocab]
                    z_edit = patch.last_z[rows, cols, 0]  # [n_act]
                    l_edit = F.cross_entropy(logits, ab.labels, label_smoothing=cfg.label_smoothing)
                    l_act = _top_mean(_exp(cfg.margin_act - z_edit), 5)
                    z_mem = patch.pre(memory)[:, 0]  # [M]
                    l_mem = (_top_mean(_exp(z_mem - cfg.margin_mem), cfg.memory_topk)
                             + _top_mean(_exp(z_mem - (z_edit.min().detach() - cfg.margin_gap)), cfg.memory_topk))
                    held = bool((logits.argmax(-1) == ab.labels).all()) and l_act.item() < cfg.stop_act
                    if held:
                        break
                    loss = l_edit + cfg.alc * l_act + cfg.mlc * l_mem
                    if not torch.isfinite(loss):
                        log.warning("t-patcher: loss is not finite at step %d; this patch stops here", step)
                        break
                    before = [p.detach().clone() for p in params]
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if not all(bool(torch.isfinite(p).all()) for p in params):
                        with torch.no_grad():
                            for p, b in zip(params, before, strict=True):
                                p.copy_(b)
                        log.warning("t-patcher: step %d made the patch non-finite; kept the step before", step)
                        break
        finally:
            patch.record, patch.last_z = False, None
            for s in reversed(swaps):
                if s.is_applied(handle):
                    s.revert(handle)
        return held, step
