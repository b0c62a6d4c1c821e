"""IKE: in-context knowledge editing (Zheng et al., 2023) -> :class:`PromptContext`; no weight changes.

Demonstrations are built from a pool of training facts (new_fact = prompt + " " + target):

    copy:   "New Fact: {new_fact}\\nPrompt: {new_fact}\\n\\n"
    update: "New Fact: {new_fact}\\nPrompt: {paraphrase} {target}\\n\\n"
    retain: "New Fact: {new_fact}\\nPrompt: {locality prompt} {locality answer}\\n\\n"

All are embedded with all-MiniLM-L6-v2 (L2-normalised). For an edit, the query
"New Fact: {new_fact}\\nPrompt: {prompt}\\n\\n" retrieves the k demonstrations with the largest cosine
similarity; they are placed least similar first, so the most similar sit next to the edit (original IKE
order). The context ends with the edit's own header "New Fact: {prompt} {target}\\nPrompt: ", so an
evaluation prompt x read after it is answered with the new fact (EasyEdit's evaluation context).
With ``k = 0`` this is ICE (the header alone).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import Config, ConfigError, option
from ..edits import PromptContext
from ..registry import register_editor
from ..retrieval import EMBEDDER_NAME, embed_corpus, file_digest, get_embedder, nearest
from ..tokens import with_answer
from ..types import EditCase, EditRequest
from .base import Capabilities, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


DEMO_KINDS = ("copy", "update", "retain")
RESERVE_TOKENS = 64  # room left after the context for the evaluation prompt and its answer


@dataclasses.dataclass
class IKEConfig(Config):
    pool: str = option("counterfact-train", "dataset the demonstrations are built from (an lmedit.data name "
                                            "such as counterfact-train or zsre-train)")
    pool_size: int | None = option(None, "use only the first N facts of the pool; none = all")
    k: int = option(16, "demonstrations retrieved per edit (paper: 32; EasyEdit: 16; 0 = ICE, header only)")
    kinds: list[str] = option(["copy", "update", "retain"], "demonstration kinds built from each pool fact")
    max_context_tokens: int | None = option(
        None, "longest context in tokens; the least similar demonstrations are dropped to fit. none = the "
              f"model's position limit less {RESERVE_TOKENS} tokens for the prompt and answer")

    def validate(self) -> None:
        if self.k < 0:
            raise ConfigError("k must be >= 0")
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError("pool_size must be >= 1, or unset for the whole pool")
        bad = sorted(set(self.kinds) - set(DEMO_KINDS))
        if bad:
            raise ConfigError(f"unknown demonstration kind(s) {bad}; use any of {list(DEMO_KINDS)}")



def demonstrations(cases: list[EditCase], kinds: list[str]) -> list[str]:
    """Copy / update / retain demonstrations (spec B.4) of each case, in pool order."""
    out: list[str] = []
    for c in cases:
        r = c.request
        new_fact = with_answer(r.text, r.target_new)
        if "copy" in kinds:
            out.append(f"New Fact: {new_fact}\nPrompt: {new_fact}\n\n")
        if "update" in kinds:
            out += [f"New Fact: {new_fact}\nPrompt: {with_answer(p, r.target_new)}\n\n" for p in c.paraphrases]
        if "retain" in kinds:
            out += [f"New Fact: {new_fact}\nPrompt: {with_answer(q.prompt, q.answer)}\n\n" for q in c.locality]
    return out


def header(request: EditRequest) -> str:
    """The edit's own lines; the evaluation prompt is appended right after them."""
    return f"New Fact: {with_answer(request.text, request.target_new)}\nPrompt: "


@register_editor("ike")
class IKE(Editor):
    """In-context editing: retrieved demonstrations + the new fact, put before every prompt."""

    Config = IKEConfig
    capabilities = Capabilities(batch=False, sequential=False, needs_fit=False, edit_kind=PromptContext,
                                encoder_decoder=True)
    relative_cost: ClassVar[float] = 3.0  # see Editor.relative_cost
    presets: ClassVar[dict[str, dict[str, Any]]] = {"smollm2-135m": {"k": 16}}
    quick: ClassVar[dict[str, Any]] = {"k": 4, "pool_size": 40}

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: IKEConfig) -> PromptContext:
        (request,) = requests
        demos: list[str] = []
        sims: list[float] = []
        if cfg.k > 0:
            texts, emb = self.pool(handle, cfg)
            query = f"New Fact: {with_answer(request.text, request.target_new)}\nPrompt: {request.text}\n\n"
            q = get_embedder(handle.cache).encode([query])[0]  # [dim]
            idx, sims = nearest(q, emb, cfg.k)
            demos = [texts[i] for i in reversed(idx)]  # most similar last, next to the edit
            sims = sims[::-1]
        limit = _token_limit(handle, cfg)
        context = "".join(demos) + header(request)
        while demos and limit is not None and len(handle.tokens.encode(context)) > limit:
            demos, sims = demos[1:], sims[1:]  # drop the least similar first
            context = "".join(demos) + header(request)
        if len(demos) < cfg.k:
            log.info("IKE: %d of %d demonstrations fit in %s context tokens", len(demos), cfg.k, limit)
        stats = {"n_demos": len(demos), "similarities": sims, "context_chars": len(context),
                 "context_tokens": len(handle.tokens.encode(context)), "pool": cfg.pool, "embedder": EMBEDDER_NAME}
        return PromptContext(context, meta={"stats": stats})

    @staticmethod
    def pool(handle: ModelHandle, cfg: IKEConfig) -> tuple[list[str], Any]:
        """Demonstration texts of the pool and their embeddings [n, dim] (cached on the handle and on disk)."""
        from ..data import find_data_file, get_dataset, load_dataset

        key = f"ike.pool.{cfg.pool}.{cfg.pool_size}.{','.join(cfg.kinds)}"
        if key not in handle.cache:
            cases = load_dataset(cfg.pool, n=cfg.pool_size)
            texts = demonstrations(cases, cfg.kinds)
            if not texts:
                raise ConfigError(f"pool {cfg.pool!r} gave no demonstrations; choose another pool or kinds")
            digest = file_digest(find_data_file(get_dataset(cfg.pool).file))
            emb = embed_corpus(texts, handle.cache, key=f"{cfg.pool}-{digest}")
            log.info("IKE pool %s: %d facts -> %d demonstrations", cfg.pool, len(cases), len(texts))
            handle.cache[key] = (texts, emb)
        return handle.cache[key]


def _token_limit(handle: ModelHandle, cfg: IKEConfig) -> int | None:
    if cfg.max_context_tokens is not None:
        return cfg.max_context_tokens
    max_pos = getattr(handle.model.config, "max_position_embeddings", None)
    return max(0, int(max_pos) - RESERVE_TOKENS) if max_pos else None
