"""The SERAC edit: a wrapper around the model's decoder stack that routes each input by edit scope.

Design (Mitchell et al. 2022, "Memory-Based Model Editing at Scale", §3). The wrapper replaces the decoder
stack (the module holding the embeddings and layers; its output's ``last_hidden_state`` feeds the LM head).
For every row of a forward pass it

1. decodes the row's real tokens to text and embeds it with all-MiniLM-L6-v2 (``lmedit.retrieval``);
2. scores it against the edit memory with the trained scope classifier
   p(in scope | x, e) = σ(τ · cos(P e_x, P e_e) + b) and picks the best memory entry;
3. in scope (p > threshold): recomputes the row with the counterfactual model -- the base model itself (plus
   an optional trained low-rank adapter) reading "{edit prompt} {target}\\n" before the row -- and puts those
   hidden states at the row's positions, so the unchanged LM head yields the counterfactual logits;
   out of scope: the base model's own hidden states, bit-identical to the unedited model.

Why a stack wrapper and not an edit of weights or of the prompt: out-of-scope inputs must see exactly the
base model, in-scope inputs a different computation, and the decision depends on the input text -- only a
module that sees the input ids and produces the final hidden states can do that. Stacked SERAC edits share
one memory: the outermost wrapper routes over the entries of every wrapper below it and calls the base stack
directly; reverting an edit removes its wrapper and so exactly its entries.

The wrapper keeps its tensors as non-persistent buffers and renames ``base.*`` keys back in ``state_dict``,
so the model's state dict looks the same with the edit applied (its own tensors are saved with the edit).
It declares ``whole_sequence``: lmedit's own scoring and generation then run every forward on whole
sequences (no shared prefixes, no cache whose rows are dropped as they finish, see
:func:`lmedit.kv.needs_whole_sequence`). Transformers' ``generate`` keeps its KV cache and every row: each
continuation step routes the whole text so far again and recomputes the routed rows on the whole sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ...hooks import get_module
from ...swaps import SwapModule, register_swap_module
from ...tokens import with_answer

if TYPE_CHECKING:
    from ...models.handle import ModelHandle

BUFFERS = ("mem_keys", "proj", "log_temp", "bias")


def context(prompt: str, target: str) -> str:
    """The counterfactual model's context for one edit: the edit as a line, read before the input."""
    return with_answer(prompt, target) + "\n"


def scope_logits(keys: torch.Tensor, queries: torch.Tensor, proj: torch.Tensor, log_temp: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """Scope-classifier logits [n_keys, n_queries]: τ · cos(P k, P q) + b, with τ = exp(log_temp)."""
    k = F.normalize(keys @ proj.T, dim=-1)  # [n, dim]
    q = F.normalize(queries @ proj.T, dim=-1)  # [m, dim]
    return log_temp.exp() * (k @ q.T) + bias


@register_swap_module("serac.router")
class SERACRouter(SwapModule):
    """Edit memory + scope classifier + counterfactual routing (see the module docstring).

    Args:
        entries: the memory, one dict per edit (prompt, target, subject, case_id).
        dim: embedding size of the scope classifier.
        threshold: scope probability above which the counterfactual model answers.
        cf_paths: modules (relative to the wrapped stack) carrying the counterfactual adapter.
        cf_shapes: their (d_out, d_in); cf_rank: the adapter's rank (0: none).
    """

    whole_sequence = True  # routes by each row's whole text (lmedit.kv.needs_whole_sequence)

    def __init__(self, entries: list[dict[str, Any]], dim: int = 384, threshold: float = 0.5,
                 cf_paths: list[str] | None = None, cf_shapes: list[list[int]] | None = None, cf_rank: int = 0) -> None:
        super().__init__()
        self.memory = [dict(e) for e in entries]
        self.threshold, self.dim = float(threshold), int(dim)
        self.cf_paths, self.cf_shapes, self.cf_rank = list(cf_paths or []), [list(s) for s in cf_shapes or []], cf_rank
        self.register_buffer("mem_keys", torch.zeros(len(entries), dim), persistent=False)
        self.register_buffer("proj", torch.eye(dim), persistent=False)
        self.register_buffer("log_temp", torch.zeros(()), persistent=False)
        self.register_buffer("bias", torch.zeros(()), persistent=False)
        for i, (d_out, d_in) in enumerate(self.cf_shapes):
            self.register_buffer(f"cf_a{i}", torch.zeros(d_out, cf_rank), persistent=False)
            self.register_buffer(f"cf_b{i}", torch.zeros(d_in, cf_rank), persistent=False)
        self._register_state_dict_hook(_strip_base)
        self._handle: ModelHandle = None
        self._gen: torch.Tensor | None = None  # generate(): the tokens its KV cache holds

    # --- Edit plumbing -----------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"entries": self.memory, "dim": self.dim, "threshold": self.threshold, "cf_paths": self.cf_paths,
                "cf_shapes": self.cf_shapes, "cf_rank": self.cf_rank}

    def _names(self) -> list[str]:
        return list(BUFFERS) + [f"cf_{w}{i}" for i in range(len(self.cf_shapes)) for w in "ab"]

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._names()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        missing = [n for n in self._names() if n not in state]
        if strict and missing:
            raise RuntimeError(f"SERAC memory state lacks {missing}")
        with torch.no_grad():
            for n in self._names():
                if n in state:
                    setattr(self, n, state[n].to(getattr(self, n).device, getattr(self, n).dtype).clone())
        return nn.modules.module._IncompatibleKeys(missing, [])

    def bind(self, handle: ModelHandle) -> None:
        self._handle = handle

    # --- memory ------------------------------------------------------------------------------------
    def chain(self) -> list[SERACRouter]:
        """This wrapper and the SERAC wrappers stacked below it (outermost first)."""
        out, m = [], self
        while isinstance(m, SERACRouter):
            out.append(m)
            m = m.base
        return out

    def root(self) -> nn.Module:
        return self.chain()[-1].base

    def entries(self) -> list[dict[str, Any]]:
        """Every memory entry this wrapper routes over (its own first, then those of earlier edits)."""
        return [e for r in self.chain() for e in r.memory]

    def prune(self, keep) -> int:
        """Drop this wrapper's own entries for which ``keep(entry)`` is false; returns how many were dropped."""
        idx = [i for i, e in enumerate(self.memory) if keep(e)]
        dropped = len(self.memory) - len(idx)
        self.memory = [self.memory[i] for i in idx]
        self.mem_keys = self.mem_keys[idx].clone()
        return dropped

    # --- routing -----------------------------------------------------------------------------------
    def route(self, texts: list[str]) -> list[int]:
        """Index (into :meth:`entries`) of the in-scope edit for each text, or -1 (out of scope)."""
        from ...retrieval import get_embedder

        keys = torch.cat([r.mem_keys for r in self.chain()])  # [n, dim]
        if keys.shape[0] == 0 or not texts:
            return [-1] * len(texts)
        q = get_embedder(self._handle.cache).encode(texts).to(keys)  # [m, dim]
        prob = torch.sigmoid(scope_logits(keys, q, self.proj, self.log_temp, self.bias))  # [n, m]
        best = prob.max(0)
        return [int(i) if p > self.threshold else -1 for p, i in zip(best.values.tolist(), best.indices.tolist(),
                                                                       strict=True)]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kw: Any) -> Any:
        root = self.root()
        out = root(input_ids=input_ids, attention_mask=attention_mask, **kw)
        if input_ids is None or self._handle is None:
            return out  # embeddings given directly: nothing to read the scope from
        past = kw.get("past_key_values")
        # a continuation step of generate(): the KV cache already holds the earlier tokens
        cont = (self._gen is not None and past is not None and _cache_len(past) > 0
                and self._gen.shape[0] == input_ids.shape[0])
        if not cont and past is not None and _cache_len(past) > 0:
            raise RuntimeError("a SERAC router must read whole sequences: this forward's key/value cache holds "
                               "tokens it never saw (run it without a cache, see lmedit.kv.needs_whole_sequence)")
        full = torch.cat([self._gen, input_ids], 1) if cont else input_ids
        mask = attention_mask if attention_mask is not None and attention_mask.shape == full.shape \
            else torch.ones_like(full)
        # every step routes on the whole text so far, as teacher-forced scoring routes the whole row
        routes = self.route([self._handle.tokenizer.decode(row[m.bool()], skip_special_tokens=True)
                             for row, m in zip(full, mask, strict=True)])
        use_cache = kw.get("use_cache") or past is not None
        self._gen = full if use_cache else None
        rows = [r for r, e in enumerate(routes) if e >= 0]
        if not rows:
            return out
        entries = self.entries()
        hidden = self.counterfactual(root, [full[r][mask[r].bool()].tolist() for r in rows],
                                     [entries[routes[r]] for r in rows])
        h = _hidden(out).clone()
        n_new = input_ids.shape[1]
        for j, r in enumerate(rows):
            pos = torch.arange(full.shape[1] - n_new, full.shape[1], device=h.device) if cont else \
                mask[r].bool().nonzero()[:, 0]
            h[r, pos - (full.shape[1] - n_new if cont else 0)] = hidden[j][-len(pos):].to(h.dtype)
        return _with_hidden(out, h)

    def counterfactual(self, root: nn.Module, rows: list[list[int]], entries: list[dict]) -> list[torch.Tensor]:
        """Hidden states [len(row), d] of each row read after its edit's context, with the CF adapter on."""
        tok = self._handle.tokens
        seqs, keep = [], []
        for ids, e in zip(rows, entries, strict=True):
            ctx = tok.encode(context(e["prompt"], e["target"]))
            nb = len(tok.bos) if ids[: len(tok.bos)] == tok.bos else 0
            seqs.append(ids[:nb] + ctx + ids[nb:])
            keep.append((nb, len(ids) - nb))
        ids, mask = tok.pad(seqs, "right")
        dev = next(root.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        with self._cf_adapter(root):
            h = _hidden(root(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=False))  # [n, seq, d]
        out = []
        for j, (nb, n) in enumerate(keep):
            length = len(seqs[j])
            out.append(torch.cat([h[j, :nb], h[j, length - n : length]]))
        return out

    def _cf_adapter(self, root: nn.Module):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            handles = []
            for i, p in enumerate(self.cf_paths if self.cf_rank > 0 else []):
                a, b = getattr(self, f"cf_a{i}"), getattr(self, f"cf_b{i}")

                def hook(_m, args, out, a=a, b=b):
                    return out + ((args[0].to(b.dtype) @ b) @ a.T).to(out.dtype)

                handles.append(get_module(root, p).register_forward_hook(hook))
            try:
                yield
            finally:
                for hd in handles:
                    hd.remove()

        return ctx()


def _strip_base(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    """State-dict hook: report the wrapped stack's tensors under their usual names."""
    for k in [k for k in state if k.startswith(prefix + "base.")]:
        state[prefix + k[len(prefix) + 5 :]] = state.pop(k)


def _cache_len(past: Any) -> int:
    try:
        return int(past.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _with_hidden(out: Any, h: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (h, *out[1:])
    out["last_hidden_state"] = h
    return out
