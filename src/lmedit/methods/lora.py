"""LoRA editing through peft (methods-spec B.2): each edit is one peft LoRA adapter, trained on the answer.

The adapter is injected with peft (``LoraModel``) into the handle's model, trained with Adam on FT-M's loss
(teacher-forced cross-entropy on the answer tokens only) and taken out again: ``compute`` leaves the model as
it was. Applying an edit injects its adapter under its own name and loads its weights; reverting deletes
that adapter, and the last one's revert unloads peft altogether, which puts the original module objects back
(the base weights are never merged into, so every weight is bit-exactly what it was). Several LoRA edits may
be applied at once (all adapters active, their outputs add up) and reverted in any order.

Saved edits: ``tensors.safetensors`` holds peft's own adapter state dict (``get_peft_model_state_dict``: the
keys peft writes to ``adapter_model.safetensors``, adapter name removed) and ``edit.json`` the ``LoraConfig``
(``to_dict``); peft's ``set_peft_model_state_dict`` reads the tensors back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, option
from ..digests import tensor_digest
from ..edits import Edit, EditError, EditMismatchError, WeightDelta
from ..hooks import get_parameter
from ..registry import register_editor
from ..types import EditInputError, EditRequest
from ._ffn import answer_batch, answer_logits
from .base import Capabilities, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

_TUNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its peft LoraModel while edited
_NAMES = itertools.count()


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover  (peft is in the `lifelong` extra)
        raise EditInputError("LoRA editing needs peft: pip install 'lmedit[lifelong]' (or pip install peft)") from e
    return peft


@dataclass
class LoRAConfig(Config):
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(32.0, "LoRA scaling α (the update is α/r · B A)")
    dropout: float = option(0.1, "dropout on the adapter's input while training")
    target_modules: list[str] | None = option(
        None, "module names peft adapts (e.g. ['q_proj', 'v_proj']); None: the FFN output projection of `layers`")
    layers: list[int] | None = option(None, "layers whose FFN output projection is adapted when target_modules "
                                            "is None (None: every layer)")
    lr: float = option(5e-3, "Adam learning rate")
    steps: int = option(50, "most optimizer steps")
    stop_loss: float = option(1e-2, "stop once the answer loss is below this")
    seed: int = option(0, "seed of the adapter's initialisation and dropout")
    merge: bool = option(False, "the edit is the adapter's update B·A·α/r added into the weights it adapts (a "
                                "low-rank weight edit) instead of a peft module: a forward costs the same after "
                                "1,000 edits as after none; it reverts like any weight edit (newest first, "
                                "bit-exact) and saves as one, not in peft's format", added=True)

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or self.lr <= 0 or self.steps < 1:
            raise ConfigError("LoRAConfig needs rank ≥ 1, alpha > 0, lr > 0 and steps ≥ 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules is empty; name at least one module or leave it unset")


class LoraAdapter(Edit):
    """One peft LoRA adapter: its ``LoraConfig`` (as a dict) and its weights (peft's state-dict keys)."""

    kind = "peft_lora"
    order_free: ClassVar[bool] = True

    def __init__(self, peft_config: dict[str, Any], weights: dict[str, torch.Tensor],
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        self.peft_config = dict(peft_config)
        self.weights = dict(weights)

    def _config(self):
        peft = _peft()
        known = set(peft.LoraConfig.__dataclass_fields__)
        return peft.LoraConfig(**{k: v for k, v in self.peft_config.items() if k in known})

    def _apply(self, handle: ModelHandle, strict: bool, max_relative_update: float | None) -> str:
        for name, t in self.weights.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise EditError(f"refusing edit: adapter weight {name} holds NaN/inf; the model is unchanged")
        name = f"lmedit_{next(_NAMES)}"
        inject(handle, self._config(), name)
        try:
            if self.weights:
                result = _peft().set_peft_model_state_dict(handle.model, self.weights, adapter_name=name)
                missing = [k for k in result.missing_keys if f".{name}." in k]
                if missing or result.unexpected_keys:
                    raise EditMismatchError(f"adapter weights do not fit this model: missing {missing[:3]}, "
                                            f"unexpected {list(result.unexpected_keys)[:3]}")
        except Exception:
            remove(handle, name)
            raise
        return name

    def _revert(self, handle: ModelHandle, name: str) -> None:
        remove(handle, name)

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.weights), {"peft_config": self.peft_config}

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> LoraAdapter:
        return cls(body["peft_config"], tensors, meta)

    def _describe_body(self) -> list[str]:
        n = sum(t.numel() for t in self.weights.values())
        return [f"  peft LoRA adapter, rank {self.peft_config.get('r')}, on {self.peft_config.get('target_modules')} "
                f"({n:,} parameters)"]


_NO_CONVERSION = threading.Lock()


@contextlib.contextmanager
def _as_named():
    """Keep peft from rewriting our adapter's targets for transformers v5.

    peft >= 0.22 renames a config's targets when it injects into a model whose MoE layers changed shape between
    transformers v4 and v5 (Mixtral, Qwen2-MoE), so that adapters trained on v4 checkpoints still load. Ours are
    always built from the live model's own module names, so the renaming has nothing to do, and on a second
    adapter it does harm: the target is a peft LoRA layer by then, not an ``nn.Linear``, so peft turns the
    module target into a parameter target that names no parameter and refuses the adapter ("No `target_modules`
    passed but also no `target_parameters` found"). Without that peft function this is a no-op.
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        yield
        return
    if not hasattr(conversion, "convert_peft_config_for_transformers"):
        yield
        return
    with _NO_CONVERSION:
        original = conversion.convert_peft_config_for_transformers
        conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
        try:
            yield
        finally:
            conversion.convert_peft_config_for_transformers = original


def inject(handle: ModelHandle, config: Any, name: str) -> None:
    """Add adapter ``name`` to the model (peft injects its LoRA layers on first use); all adapters active,
    none trainable."""
    peft = _peft()
    model = handle.model
    tuner = _TUNERS.get(model)
    try:
        with _as_named():
            if tuner is None:
                _TUNERS[model] = tuner = peft.LoraModel(model, config, name)
            else:
                tuner.peft_config[name] = config
                tuner.inject_adapter(model, name)
    except ValueError as e:
        if tuner is None or not tuner.peft_config.get(name):
            _TUNERS.pop(model, None)
        raise EditMismatchError(f"peft cannot adapt this model as asked: {e}") from e
    tuner.set_adapter(list(tuner.peft_config), inference_mode=True)


def remove(handle: ModelHandle, name: str) -> None:
    """Delete adapter ``name``; the last one out unloads peft, which restores the original modules."""
    model = handle.model
    tuner = _TUNERS.get(model)
    if tuner is None or name not in tuner.peft_config:
        raise EditError(f"adapter {name} is not in this model; nothing to revert")
    if len(tuner.peft_config) == 1:
        tuner.unload()
        del _TUNERS[model]
        return
    tuner.delete_adapter(name)
    tuner.set_adapter(list(tuner.peft_config), inference_mode=True)


@register_editor("lora")
class LoRA(Editor):
    """Fine-tune a peft LoRA adapter on the request's answer; the edit is the adapter."""

    Config = LoRAConfig
    capabilities = Capabilities(batch=True, sequential=True, edit_kind=LoraAdapter, encoder_decoder=True)
    relative_cost: ClassVar[float] = 4.0  # see Editor.relative_cost
    pure_compute: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # methods-spec B.2 [proposal] for SmolLM2: r 8, α 32, q_proj/v_proj of every layer, lr 5e-3, 50-70 steps
        "smollm2-135m": {"target_modules": ["q_proj", "v_proj"], "steps": 60},
    }
    quick: ClassVar[dict[str, Any]] = {"rank": 4, "alpha": 16.0, "lr": 2e-2, "steps": 20, "dropout": 0.0}

    def resolve(self, handle: ModelHandle, cfg: LoRAConfig) -> LoRAConfig:
        if cfg.target_modules is None:
            layers = list(range(handle.n_layers)) if cfg.layers is None else cfg.layers
            handle.adapter.check_layers(handle.model, layers)
            cfg = cfg.replace(target_modules=[handle.adapter.mlp_out.format(i) for i in layers])
        return cfg

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: LoRAConfig) -> LoraAdapter:
        peft = _peft()
        config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.target_modules), bias="none",
                                 fan_in_fan_out=handle.adapter.weight_layout == "in_out")  # GPT-2's Conv1D
        ab = answer_batch(handle, [r.text for r in requests], [r.target_new for r in requests])
        name = f"lmedit_train_{next(_NAMES)}"
        losses: list[float] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            inject(handle, config, name)
            try:
                params = [p for n, p in handle.model.named_parameters() if f".{name}." in n]
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(params, lr=cfg.lr)
                for n, m in handle.model.named_modules():  # the adapter's dropout only, not the model's own
                    if n.endswith(f"lora_dropout.{name}"):
                        m.train()
                with torch.enable_grad():
                    for _ in range(cfg.steps):
                        loss = F.cross_entropy(answer_logits(handle, ab), ab.labels)
                        losses.append(loss.item())
                        if losses[-1] < cfg.stop_loss:
                            break
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                merged = _low_rank_updates(handle, name) if cfg.merge else None
                weights = {} if cfg.merge else {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(
                    handle.model, adapter_name=name).items()}
            finally:
                remove(handle, name)
        log.info("lora: %d step(s), answer loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
        stats = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}
        if merged is not None:
            digests = {k: tensor_digest(get_parameter(handle.model, k)) for k in merged}
            return WeightDelta(merged, digests, meta={"stats": stats, "peft_config": _json_config(config)})
        return LoraAdapter(_json_config(config), weights, meta={"stats": stats})


def _low_rank_updates(handle: ModelHandle, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter ``name``'s update of every weight it adapts, as WeightDelta's low-rank pairs (a, b) with
    a bᵀ = ΔW, checked against peft's own ``get_delta_weight`` (the ΔW peft's merge would add)."""
    out = {}
    for path, module in handle.model.named_modules():
        if name not in getattr(module, "lora_A", {}):
            continue
        a_w, b_w = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()  # [r, in], [out, r]
        scaled_b = b_w.float() * float(module.scaling[name])
        pair = (a_w.float().T, scaled_b) if module.fan_in_fan_out else (scaled_b, a_w.float().T)
        peft_delta = module.get_delta_weight(name).detach().float()
        if not torch.allclose(pair[0] @ pair[1].T, peft_delta, rtol=1e-4, atol=1e-6 * float(peft_delta.abs().max())):
            raise EditError(f"lora merge: peft's update of {path} is not the adapter's B·A·scale (a LoRA variant "
                            "lmedit cannot merge); use merge=False")
        out[f"{path.removeprefix('base_model.model.')}.weight"] = (pair[0].clone(), pair[1].clone())
    if not out:
        raise EditError(f"lora merge: adapter {name} adapts no module of this model")
    return out


def _json_config(config: Any) -> dict[str, Any]:
    """``LoraConfig.to_dict()`` with sets as sorted lists and enums as strings (JSON, comparable)."""
    out = {}
    for k, v in config.to_dict().items():
        if isinstance(v, set):
            v = sorted(v)
        elif hasattr(v, "value") and isinstance(v.value, str):
            v = v.value
        out[k] = v
    return out
