"""ModelHandle: a model, its tokenizer, its adapter and tokenization policy, its fingerprint and caches."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import nn

from ..digests import tensor_digest
from ..kv import body_and_head
from ..tokens import Batch, TokenPolicy
from .adapter import ModelAdapter
from .lookup import adapter_for, preset_name

log = logging.getLogger(__name__)


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A fast, content-based identity of a model's weights: config, names, shapes and strided samples.

    Two checkpoints that differ in any sampled value, any shape or the config get different fingerprints.
    It is computed once at load time and identifies the *base* model for caches and saved edits.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 2048)
        sample = flat[::step][:2048].to(torch.float64)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.cpu().numpy().tobytes())
        h.update(repr(float(flat.to(torch.float64).sum())).encode())
    return h.hexdigest()[:16]


class ModelHandle:
    """Everything lmedit needs to know about one loaded model.

    Attributes:
        model: the Hugging Face model (eval mode).
        tokenizer: its tokenizer (never mutated by lmedit).
        adapter: where the model keeps its parts.
        tokens: the tokenization policy (target joining, BOS, padding).
        name: the alias, directory or hub id it was loaded from.
        fingerprint: identity of the base weights (cache keys, saved edits).
        contexts: prompt prefixes of applied ``PromptContext`` edits, prepended by :meth:`render`.
        applied_edits: the edits applied to the model through this handle, oldest first.
        cache: per-model caches owned by this handle (context templates, statistics); never global.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str | None = None,
                 adapter: ModelAdapter | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter or adapter_for(model)
        self.tokens = TokenPolicy(tokenizer, encoder_decoder=self.adapter.encoder_decoder)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.fingerprint = fingerprint(model)
        self.contexts: list[str] = []
        self.cache: dict[str, Any] = {}
        self._applied: list[Any] = []  # pushed by Edit.apply, popped by Edit.revert
        for p in self.model.parameters():
            p.requires_grad_(False)
        body_and_head(self.model)  # decides once, before any hook exists, whether logits = head(body(x))

    def __repr__(self) -> str:
        return (f"ModelHandle({self.name!r}, {type(self.model).__name__}, layers={self.n_layers}, "
                f"fingerprint={self.fingerprint})")

    @property
    def applied_edits(self) -> tuple[Any, ...]:
        """The edits applied to this model now, oldest first; only the last one may be reverted."""
        return tuple(self._applied)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def preset(self) -> str | None:
        return preset_name(self.model, self.adapter)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.adapter.encoder_decoder

    def n_params(self) -> int:
        """The number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def size_bytes(self) -> int:
        """The parameters' size in bytes in their current dtype (tied weights counted once)."""
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())

    def render(self, prompt: str) -> str:
        """The prompt as the model should read it now: active in-context edits first."""
        return "".join(self.contexts) + prompt

    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits [batch, seq, vocab] for a batch built by ``self.tokens``."""
        return self.model(**batch.model_inputs(self.device)).logits

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 20, **options: Any) -> str:
        """Greedy continuation of ``prompt`` (rendered with active contexts). ``options`` go to the model's
        ``generate`` (a ``streamer``, or ``do_sample=True`` with its temperature)."""
        text = self.render(prompt)
        ids = torch.tensor([self.tokens.prompt_ids(text)], device=self.device)
        cfg = self.model.config
        # transformers sizes an encoder-decoder KV cache by the encoder depth: decoders of another depth
        # must generate without it (real T5 checkpoints have equal depths and keep the cache)
        uneven = self.is_encoder_decoder and getattr(cfg, "num_decoder_layers", None) not in (None, cfg.num_layers)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            **{"do_sample": False, "pad_token_id": self.tokens.pad_id, **({"use_cache": False} if uneven else {}),
               **options},
        )
        new = out[0] if self.is_encoder_decoder else out[0, ids.shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def remove_edit(self, edit: Any, *, rebuild: bool = False) -> list[Any]:
        """Remove any applied edit; ``rebuild=True`` also removes a weight edit from under later ones by
        re-applying those from their stored objects (see :func:`lmedit.undo.remove_edit` for what that
        does and does not equal). Returns the re-applied edits."""
        from ..undo import remove_edit

        return remove_edit(self, edit, rebuild=rebuild)

    def state_digest(self) -> str:
        """Hash of every parameter's full content (slow on big models; used to prove bit-identity)."""
        h = hashlib.sha256()
        for name, p in self.model.state_dict().items():
            h.update(name.encode())
            h.update(tensor_digest(p).encode())
        return h.hexdigest()[:24]
