"""Context templates: short prefixes written by the model itself, used to average keys and optimise values.

ROME (Meng et al. 2022, §3.1) averages the subject key over "a small set of texts that start with random
prefixes" so that the edit does not depend on the exact prompt. The prefixes are sampled from the model
with top-k (k=5) sampling, starting from the seed words {"The", "Therefore", "Because", "I", "You"}; each
becomes ``"<prefix>. {}"``, and the bare ``"{}"`` template is its own group. Keys are averaged inside each
group, then over groups (methods-spec B.0).

Templates are cached in ``handle.cache`` keyed by every generation parameter (never in a module global),
and generated with a seeded ``torch.Generator`` so that two runs give the same templates.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
ROME_LENGTHS = ((5, 10), (10, 10))  # (total token length, number of samples over all seed words)
MEMIT_LENGTHS = ((10, 5),)
CACHE_KEY = "locate.templates"

TemplateGroups = list[list[str]]


def context_templates(handle, lengths: Sequence[Sequence[int]] = ROME_LENGTHS, *, seed: int = 0,
                      top_k: int = 5, seed_words: Sequence[str] = SEED_WORDS) -> TemplateGroups:
    """Template groups ``[["{}"], [group of length l1], ...]``; each template has one ``{}`` slot.

    Args:
        lengths: (total length in tokens including the seed word, samples) pairs; each pair gives
            ``samples // len(seed_words)`` continuations per seed word (at least one).
        seed: seed of the sampler's generator.
    """
    key = (CACHE_KEY, tuple(tuple(int(x) for x in p) for p in lengths), seed, top_k, tuple(seed_words))
    cache = handle.cache
    if key not in cache:
        groups: TemplateGroups = [["{}"]]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for length, n in key[1]:
            per_word = max(1, n // len(seed_words))
            words = [w for w in seed_words for _ in range(per_word)]
            texts = sample_continuations(handle, words, length, top_k, gen)
            groups.append([_escape(t) + ". {}" for t in texts])
        cache[key] = groups
        log.debug("context templates: %s", groups)
    return [list(g) for g in cache[key]]


def _escape(text: str) -> str:
    # ROME replaces braces by spaces so that str.format sees exactly one slot
    return text.replace("{", " ").replace("}", " ")


@torch.no_grad()
def sample_continuations(handle, prompts: list[str], length: int, top_k: int, gen: torch.Generator) -> list[str]:
    """Top-k sampled continuations, each ``length`` tokens in total (prompt tokens included, BOS excluded)."""
    tokens = handle.tokens
    bos = len(tokens.bos)
    rows = [tokens.prompt_ids(p) for p in prompts]
    while min(len(r) for r in rows) - bos < length:
        active = [i for i, r in enumerate(rows) if len(r) - bos < length]
        ids, mask = tokens.pad([rows[i] for i in active], "left")  # left: the next token is at -1 for all
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = handle.model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device),
                              position_ids=pos.to(handle.device)).logits[:, -1].float().cpu()  # [n, vocab]
        top = logits.topk(top_k, dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        pick = torch.multinomial(probs, 1, generator=gen)[:, 0]
        nxt = top.indices.gather(1, pick[:, None])[:, 0].tolist()
        for i, t in zip(active, nxt, strict=True):
            rows[i] = rows[i] + [t]
    return [handle.tokenizer.decode(r[bos:], skip_special_tokens=True) for r in rows]


def flatten(groups: TemplateGroups) -> tuple[list[str], list[int]]:
    """All templates in one list, and the group index of each."""
    flat, gid = [], []
    for g, group in enumerate(groups):
        flat.extend(group)
        gid.extend([g] * len(group))
    return flat, gid


def group_mean(x: torch.Tensor, gid: list[int]) -> torch.Tensor:
    """Mean over templates inside each group, then over groups (ROME's averaging). x: [n_templates, ...]."""
    idx = torch.tensor(gid, device=x.device)
    means = [x[idx == g].mean(0) for g in sorted(set(gid))]
    return torch.stack(means).mean(0)


def compose(context: str, template: str) -> str:
    """Put a request template (one ``{}``) into a context template (one ``{}``)."""
    # context templates hold no other braces (see _escape), so a plain replace is exact
    return context.replace("{}", template, 1)


def split_template(template: str) -> tuple[str, str]:
    """(text before the slot, text after it), with ``{{``/``}}`` escapes undone."""
    before, after, seen = [], [], False
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        (after if seen else before).append(literal)
        if field is not None:
            if field != "" or seen:
                raise ValueError(f"template {template!r} must have exactly one '{{}}' slot")
            seen = True
    if not seen:
        raise ValueError(f"template {template!r} has no '{{}}' slot")
    return "".join(before), "".join(after)
