"""Find a causal LM's parts from its module structure, for architectures that are not in the table.

One forward pass on a tiny input, with hooks on every module, records what each module receives and returns
(``probe.py``). From that record (never from a family name):

- **blocks**: the outermost ``nn.ModuleList`` whose elements all ran and map [batch, seq, d] (or
  [batch, seq, streams, d], hyper-connections) to the same shape (the most parameters wins when there are
  several);
- **token mixers** (attention, or a recurrent mixer in a hybrid layer) and **position-wise** modules are told
  apart by running a module again on its recorded inputs with position 0 perturbed: a position-wise module's
  outputs at the other positions do not change;
- **FFN output projection**: a linear map inside a block with no token-mixing ancestor, that writes width d
  and reads every token as [batch, seq, d_ff] (routed experts, which see a subset of tokens, are left out:
  a mixture of experts is editable only through a dense shared expert). Its orientation is read from the
  weight shape and confirmed by recomputing its output (W x + b, or x W + b for GPT-2's Conv1D). Its input
  is the key of the locate-then-edit methods. The FFN is its outermost position-wise ancestor in the block
  (or the projection itself when the block holds the FFN's linears directly); its input projections are
  the linears of the FFN reading width d (two, or one fused, for a gated FFN);
- **no dense FFN in any block** (routed experts only, or state-space / recurrent layers only): the token
  mixer's output projection, the last linear map inside it that writes width d and reads every token, is the
  edit site instead (``edit_site="attn_out"``, with the reason);
- **embeddings / head** from ``get_input_embeddings`` / ``get_output_embeddings`` (tied when they share the
  weight), or the linear map whose output is the logits when the class hides its head; **final norm**: the
  module that runs between the last block and the head.

The result is then validated (:func:`validate`): shapes at every part, and perturbing the FFN output and the
final norm output must change the logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..hooks import get_module
from .adapter import ModelAdapter, UnsupportedArchitectureError
from .probe import Seen, linear_layout, mixes_tokens, probe_inputs, record, run

log = logging.getLogger(__name__)

class DiscoveryError(UnsupportedArchitectureError):
    """Discovery could not find or validate a part of the model."""

    def __init__(self, model: nn.Module, what: str) -> None:
        name = type(model).__name__
        super().__init__(
            f"cannot edit {name}: {what}. If the model has the parts under other names, register an adapter by "
            "hand:\n"
            "    from lmedit.models.lookup import register_adapter\n"
            "    from lmedit.models.adapter import ModelAdapter\n"
            f"    register_adapter({name!r}, ModelAdapter(family=..., embed=..., layers='...{{}}', attn=..., "
            "attn_out=..., mlp=..., mlp_in=(...,), mlp_out=..., ln_final=..., lm_head=...))\n"
            "(lmedit/models/architectures.py has complete examples)."
        )
        self.what = what


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target and n), None)


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent + ".")


class _Block:
    """The record of one decoder block, with the token-mixing test memoised per module."""

    def __init__(self, model: nn.Module, seen: dict[str, Seen], path: str, d: int, tokens: int) -> None:
        self.model, self.seen, self.path, self.d, self.tokens = model, seen, path, d, tokens
        self.names = [n for n in seen if _under(n, path)]
        self._mix: dict[str, bool] = {}

    def rel(self, name: str) -> str:
        return name[len(self.path) + 1:]

    def mixes(self, name: str) -> bool:
        if name not in self.seen:  # a container that is never called itself (a ModuleList of attentions)
            return False
        if name not in self._mix:
            self._mix[name] = mixes_tokens(get_module(self.model, name), self.seen[name])
        return self._mix[name]

    def ancestors(self, name: str) -> Iterator[str]:
        """Modules between the block and ``name`` (outermost first), excluding both."""
        parts = self.rel(name).split(".")
        for k in range(1, len(parts)):
            yield f"{self.path}.{'.'.join(parts[:k])}"

    def linears(self) -> dict[str, str]:
        out = {}
        for n in self.names:
            layout = linear_layout(get_module(self.model, n), self.seen[n])
            if layout is not None:
                out[n] = layout
        return out

    def per_token(self, t: torch.Tensor | None) -> bool:
        """Every token, as [batch, seq, ·] or flattened to [batch·seq, ·] (a routed expert sees fewer)."""
        return t is not None and ((t.dim() == 3 and t.shape[0] * t.shape[1] == self.tokens)
                                  or (t.dim() == 2 and t.shape[0] == self.tokens))


@dataclass
class BlockParts:
    """Relative paths (inside one block) of the parts discovery found."""

    attn: str | None = None
    attn_out: str | None = None
    attn_layout: str | None = None
    mlp: str | None = None
    mlp_in: tuple[str, ...] = ()
    mlp_out: str | None = None
    layout: str | None = None
    why_no_ffn: str = ""


def block_parts(block: _Block) -> BlockParts:
    """Find the token mixer and the dense FFN of one block."""
    parts = BlockParts()
    linears = block.linears()
    writes_d = [n for n in linears if block.seen[n].y.shape[-1] == block.d]
    # the token mixer: the outermost module that mixes tokens and returns [batch, seq, d]
    mixers = [n for n in block.names if block.per_token(block.seen[n].y) and block.seen[n].y.shape[-1] == block.d
              and not any(block._mix.get(a) for a in block.ancestors(n)) and block.mixes(n)]
    mixers = [n for n in mixers if not any(_under(n, m) for m in mixers)]
    if mixers:
        attn = min(mixers, key=lambda n: block.seen[n].order)
        parts.attn = block.rel(attn)
        outs = [n for n in writes_d if _under(n, attn) and block.per_token(block.seen[n].x)]
        if outs:
            last = max(outs, key=lambda n: block.seen[n].done)
            parts.attn_out, parts.attn_layout = block.rel(last), linears[last]
    dense = [n for n in writes_d if not block.mixes(n) and not any(block.mixes(a) for a in block.ancestors(n))]
    routed = [n for n in dense if not block.per_token(block.seen[n].x)]
    dense = [n for n in dense if block.per_token(block.seen[n].x)]
    candidates = []
    for out in dense:
        d_ff = block.seen[out].x.shape[-1]
        ins = [n for n in linears if n != out and block.seen[n].x.shape[-1] == block.d
               and block.seen[n].y.shape[-1] in (d_ff, 2 * d_ff) and block.seen[n].order < block.seen[out].order
               and not block.mixes(n) and not any(block.mixes(a) for a in block.ancestors(n))]
        # the FFN module: the outermost position-wise ancestor holding an input projection too; none when the
        # block holds the FFN's linears directly or in sibling modules (OPT, BERT)
        container = next((a for a in block.ancestors(out) if a in block.seen and block.per_token(block.seen[a].y)
                          and any(_under(n, a) for n in ins)), None)
        ins = [n for n in ins if container is None or _under(n, container)]
        if ins:
            candidates.append((out, container, ins))
    if not candidates:
        experts = [n for n, p in block.model.named_parameters() if _under(n, block.path) and p.dim() == 3
                   and n.rpartition(".")[0] in block.seen and not block.mixes(n.rpartition(".")[0])
                   and not any(block.mixes(a) for a in block.ancestors(n.rpartition(".")[0]))]
        other_length = [n for n in writes_d if block.seen[n].x is not None and block.seen[n].x.dim() == 3
                        and not block.mixes(n) and not block.per_token(block.seen[n].x)]
        if other_length and not experts:
            parts.why_no_ffn = (f"its FFN sees {tuple(block.seen[other_length[0]].x.shape[:2])} positions for "
                                f"{block.tokens} input tokens (the model adds or reorders positions), so the "
                                "subject's token cannot be found in it")
        elif experts or routed:
            parts.why_no_ffn = ("its FFN is a mixture of routed experts without a dense shared expert; ROME "
                                "and FT-M rewrite one dense projection that every token passes through")
        elif not writes_d:
            parts.why_no_ffn = "no linear layer (W x + b) in the block writes the hidden width"
        else:
            parts.why_no_ffn = ("no position-wise feed-forward block (an input projection from the hidden width "
                                "and an output projection back to it, outside the token mixer)")
        return parts
    out, container, ins = max(candidates, key=lambda c: (block.seen[c[0]].x.shape[-1], block.seen[c[0]].done))
    parts.mlp_out, parts.layout = block.rel(out), linears[out]
    parts.mlp = block.rel(container) if container else parts.mlp_out
    d_ff = block.seen[out].x.shape[-1]
    fused = [n for n in ins if block.seen[n].y.shape[-1] == 2 * d_ff]
    plain = [n for n in ins if block.seen[n].y.shape[-1] == d_ff]
    chosen = plain[-2:] if len(plain) >= 2 else (plain or fused[-1:])
    parts.mlp_in = tuple(block.rel(n) for n in sorted(chosen, key=lambda n: block.seen[n].order))
    return parts


def find_blocks(model: nn.Module, seen: dict[str, Seen]) -> tuple[str, int, int]:
    """(path, width, residual streams) of the decoder blocks: the outermost ModuleList whose elements map
    [b, s, d] (or [b, s, streams, d], hyper-connections) to the same shape."""
    lists = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        items = [f"{name}.{i}" for i in range(len(module))]
        if not all(i in seen and seen[i].x is not None and seen[i].y is not None for i in items):
            continue
        shapes = {(tuple(seen[i].x.shape), tuple(seen[i].y.shape)) for i in items}
        if len(shapes) != 1:
            continue
        (x, y), = shapes
        if len(x) not in (3, 4) or x != y:  # [batch, seq, d], or [batch, seq, streams, d] (hyper-connections)
            continue
        n_params = sum(p.numel() for p in module.parameters())
        lists.append((name, x[-1], n_params, x[2] if len(x) == 4 else 1))
    outer = [c for c in lists if not any(_under(c[0], o[0]) for o in lists)]
    if not outer:
        raise DiscoveryError(model, "found no list of decoder blocks (an nn.ModuleList whose blocks each map "
                                    "[batch, seq, d] hidden states to the same shape)")
    name, d, _, streams = max(outer, key=lambda c: c[2])
    return name, int(d), int(streams)


def _template(found: dict[int, str | None], what: str, model: nn.Module) -> tuple[str, tuple[int, ...]]:
    """The relative path most blocks agree on, and the layers that have it."""
    paths = [p for p in found.values() if p]
    if not paths:
        raise DiscoveryError(model, what)
    best = max(dict.fromkeys(paths), key=paths.count)
    return best, tuple(i for i, p in found.items() if p == best)


def discover(model: nn.Module) -> ModelAdapter:
    """Find the parts of ``model`` and return a validated adapter; :class:`DiscoveryError` names what is missing."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise DiscoveryError(model, "it is an encoder-decoder model; discovery covers decoder-only causal LMs "
                                    "(of the encoder-decoders, lmedit edits T5, from its table)")
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "get_output_embeddings"):
        raise DiscoveryError(model, "it is not a Hugging Face model (no get_input_embeddings/get_output_embeddings)")
    embed_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    embed, lm_head = _path_of(model, embed_mod), _path_of(model, head_mod)
    if embed is None:
        raise DiscoveryError(model, "found no token embedding module")
    inputs = probe_inputs(model)
    was_training = model.training
    model.eval()
    try:
        seen = record(model, inputs)
        if lm_head is None:  # a class that hides its head from get_output_embeddings (CLVP's decoder)
            lm_head = _head_from_logits(model, seen, inputs)
            head_mod = get_module(model, lm_head)
        blocks_path, d, streams = find_blocks(model, seen)
        n = len(get_module(model, blocks_path))
        tokens = int(inputs["input_ids"].numel())
        per_layer = {i: block_parts(_Block(model, seen, f"{blocks_path}.{i}", d, tokens)) for i in range(n)}
    finally:
        model.train(was_training)
    reasons = "; ".join(sorted({p.why_no_ffn for p in per_layer.values() if p.why_no_ffn}))
    if any(p.mlp_out for p in per_layer.values()):
        mlp_out, ffn_layers = _template({i: p.mlp_out for i, p in per_layer.items()}, reasons, model)
        ref = next(p for p in per_layer.values() if p.mlp_out == mlp_out)
        site, site_reason = "ffn", ""
    else:  # no block has a dense FFN: the token mixer's output projection is the edit site
        ref, ffn_layers, site_reason = _attention_site(per_layer, reasons or "found no FFN output projection", model)
        site = "attn_out"
    attn, _ = _template({i: p.attn for i, p in per_layer.items()}, "found no attention (token-mixing) module", model)
    attn_ref = next(p for p in per_layer.values() if p.attn == attn)
    last_block = f"{blocks_path}.{n - 1}"
    ln_final = _final_norm(seen, last_block, lm_head, d, blocks_path)
    b = blocks_path + ".{}."
    adapter = ModelAdapter(
        family=str(getattr(cfg, "model_type", "") or type(model).__name__),
        embed=embed, layers=blocks_path + ".{}", attn=b + attn, attn_out=b + (attn_ref.attn_out or attn),
        mlp=b + ref.mlp, mlp_in=tuple(b + p for p in ref.mlp_in), mlp_out=b + ref.mlp_out, ln_final=ln_final,
        lm_head=lm_head, weight_layout=ref.layout,  # type: ignore[arg-type]
        ffn_layers=None if len(ffn_layers) == n else ffn_layers, discovered=True, edit_site=site,  # type: ignore[arg-type]
        edit_site_reason=site_reason, residual_streams=streams,
    )
    validate(model, adapter, inputs)
    tied = head_mod.weight is embed_mod.weight
    gated = "gated" if len(adapter.mlp_in) >= 2 or _fused(adapter, model) else "plain"
    what = (f"attention output {adapter.mlp_out} as the edit site ({site_reason})" if site == "attn_out" else
            f"FFN output {adapter.mlp_out} ({gated} FFN)")
    log.info("discovered the parts of %s (no registered adapter): blocks %s, %s, %s layout%s, attention %s, "
             "final norm %s, head %s (%s)", type(model).__name__, adapter.layers, what, adapter.weight_layout,
             f", layers {list(ffn_layers)} only" if adapter.ffn_layers else "", adapter.attn, ln_final or "none",
             lm_head, "tied to the embeddings" if tied else "untied")
    return adapter


def _attention_site(per_layer: dict[int, BlockParts], reasons: str,
                    model: nn.Module) -> tuple[BlockParts, tuple[int, ...], str]:
    """For a model none of whose blocks has a dense FFN: the token mixer's output projection, a linear map
    that writes into the residual stream and reads every token (its input, the mixed heads or the recurrent
    state's readout at a token, is a well-defined key), as the edit site of every layer that has one."""
    out, layers = _template({i: p.attn_out for i, p in per_layer.items()},
                            f"{reasons}; nor does any token mixer have a linear output projection that "
                            "reads one position per input token (the edit site of models without a dense FFN)", model)
    ref = next(p for p in per_layer.values() if p.attn_out == out)
    reason = f"{reasons}; so the token mixer's output projection is edited instead"
    return BlockParts(attn=ref.attn, attn_out=out, mlp=out, mlp_out=out, layout=ref.attn_layout), layers, reason


def _head_from_logits(model: nn.Module, seen: dict[str, Seen], inputs: dict[str, torch.Tensor]) -> str:
    """The linear map (weight [vocab, d]) whose recorded output is the model's logits."""
    logits = run(model, inputs)
    found = [n for n, s in seen.items() if s.y is not None and s.y.shape == logits.shape and torch.equal(s.y, logits)
             and linear_layout(get_module(model, n), s) is not None]
    if not found:
        raise DiscoveryError(model, "found no output head module (get_output_embeddings() returns None and no "
                                    "linear layer's output is the logits)")
    return max(found, key=lambda n: seen[n].done)


def _fused(adapter: ModelAdapter, model: nn.Module) -> bool:
    if len(adapter.mlp_in) != 1:
        return False
    i = adapter.ffn_layers[0] if adapter.ffn_layers else 0
    w_in = adapter.weight_out_in(get_module(model, adapter.mlp_in[0].format(i)))
    w_out = adapter.weight_out_in(get_module(model, adapter.mlp_out.format(i)))
    return w_in.shape[0] == 2 * w_out.shape[1]


def _final_norm(seen: dict[str, Seen], last_block: str, lm_head: str, d: int, blocks_path: str) -> str:
    """The outermost module that runs after the last block and before the head, returning [b, s, d]."""
    end, start = seen[last_block].done, seen[lm_head].order if lm_head in seen else 1 << 62
    found = [n for n, s in seen.items() if end < s.order and s.done < start and s.y is not None
             and s.y.dim() == 3 and s.y.shape[-1] == d and not _under(n, blocks_path) and n != lm_head]
    outer = [n for n in found if not any(_under(n, o) for o in found)]
    return max(outer, key=lambda n: seen[n].done) if outer else ""


@torch.no_grad()
def validate(model: nn.Module, adapter: ModelAdapter, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Check an adapter on a short forward: every part runs with the expected shapes, the FFN output
    projection computes W x + b in the stated layout, and its output and the final norm's feed the logits."""
    inputs = inputs or probe_inputs(model)
    seen = record(model, inputs)
    layers = adapter.ffn_layers or tuple(range(adapter.n_layers(model)))
    b, s = inputs["input_ids"].shape
    parts = [adapter.embed, adapter.lm_head] + [adapter.layer(i) for i in range(adapter.n_layers(model))]
    parts += [t.format(i) for i in layers for t in (adapter.mlp, adapter.mlp_out, *adapter.mlp_in)]
    if adapter.ln_final:
        parts.append(adapter.ln_final)
    missing = [p for p in parts if p not in seen or seen[p].y is None]
    if missing:
        raise DiscoveryError(model, f"module(s) {missing[:4]} did not run (or returned no tensor) in a forward pass")
    d = seen[adapter.layer(0)].y.shape[-1]
    for i in layers:
        out = seen[adapter.mlp_out.format(i)]
        if out.x is None or ModelAdapter.per_token(out.x, b).shape[:2] != (b, s) \
                or ModelAdapter.per_token(out.y, b).shape != (b, s, d):
            raise DiscoveryError(model, f"the FFN output projection of layer {i} does not map [batch, seq, d_ff] "
                                        f"to [batch, seq, {d}]")
        if linear_layout(get_module(model, adapter.mlp_out.format(i)), out) != adapter.weight_layout:
            raise DiscoveryError(model, f"the FFN output projection of layer {i} does not compute W x + b in the "
                                        f"{adapter.weight_layout!r} layout")
    base = run(model, inputs)
    checks = [(adapter.mlp_out.format(layers[0]), f"the FFN output of layer {layers[0]}")]
    if adapter.ln_final:
        checks.append((adapter.ln_final, "the final norm's output"))
    g = torch.Generator().manual_seed(0)
    for path, what in checks:
        def bump(_m: nn.Module, _a: Any, o: Any) -> Any:  # random, not constant: a LayerNorm removes a shift
            h = ModelAdapter.hidden(o)
            noise = torch.randn(h.shape, generator=g).to(h.device, h.dtype)
            return ModelAdapter.with_hidden(o, h + noise * (1.0 + h.abs().mean()))

        hook = get_module(model, path).register_forward_hook(bump)
        try:
            moved = run(model, inputs)
        finally:
            hook.remove()
        if torch.allclose(moved[:, -1], base[:, -1]):
            raise DiscoveryError(model, f"changing {what} ({path}) does not change the logits")
