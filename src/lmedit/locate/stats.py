"""Second moments C = E[k kᵀ] of the keys (inputs of W_out) over a text corpus, for several layers at once.

ROME's covariance (eq. 2, Λ = C⁻¹k*) and MEMIT's preservation term (λ C in ΔW = R Kᵀ (λC + K Kᵀ)⁻¹) both
use C = (1/N) Σ_t k_t k_tᵀ over N corpus tokens (uncentered). One forward pass per batch captures every
requested layer and stops after the deepest one, so five layers cost about one deep pass, not five.

Corpus: a text file or a folder of ``*.txt`` files (default: ``$LMEDIT_CORPUS``, ``$LMEDIT_HOME/corpus`` or
the WikiText files in the data folder's ``corpus/``, found like every data file: ``$LMEDIT_DATA``,
``../shared/data``); WikiText's tokenisation marks (`` @-@ `` ...) are undone.
Text is packed into rows of up to 1024 tokens, batched by a token budget; each batch's k kᵀ is computed
in float32 and summed in float64. Results are cached on disk under ``$LMEDIT_HOME/stats/<fingerprint>/``
keyed by layer, corpus hash, token count and model dtype; partial sums are saved every few batches so an
interrupted run resumes. A cache file made for another model is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import LmeditError
from ..hooks import StopForward, get_module
from ..io import atomic_write, cache_key, cache_path, file_lock, lmedit_home

log = logging.getLogger(__name__)

WIKITEXT_MARKS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                  (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")"))
CLEANING_VERSION = "2"  # bump whenever clean_line changes: cached statistics depend on it
CACHE_KEY = "locate.stats"
SETUP_SECONDS = "setup_seconds"  # handle.cache entry: seconds spent on one-time per-model work (lmedit demo reports it)


class StatsError(LmeditError, RuntimeError):
    """Statistics cannot be computed or loaded as asked; the message says what to fix."""


def corpus_files(corpus: str | Path | None = None) -> list[Path]:
    """The text files of ``corpus`` (a file or a folder of .txt files), or of the default corpus."""
    if corpus is None:
        from ..data.paths import candidates as data_candidates

        places = [os.environ.get("LMEDIT_CORPUS"), lmedit_home() / "corpus", *data_candidates("corpus")]
        found = [Path(c) for c in places if c and Path(c).exists()]
        if not found:
            raise StatsError(
                "no text corpus for the second-moment statistics: pass corpus=PATH (a text file or a folder of "
                "*.txt files), or set LMEDIT_CORPUS or LMEDIT_DATA, or put WikiText files in "
                f"{lmedit_home() / 'corpus'}", option="corpus")
        corpus = found[0]
    path = Path(corpus).expanduser()
    if not path.exists():
        raise StatsError(f"corpus {path} does not exist; pass a text file or a folder of *.txt files")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise StatsError(f"corpus folder {path} holds no *.txt files")
    return files


def corpus_hash(files: Sequence[Path]) -> str:
    h = hashlib.sha256(CLEANING_VERSION.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def clean_line(line: str) -> str:
    """Undo WikiText's tokenisation marks; headings (``= = Title = =``) and blank lines become ''."""
    line = f" {line.strip()} "
    if not line.strip() or line.strip().startswith("="):
        return ""
    for mark, text in WIKITEXT_MARKS:
        line = line.replace(mark, text)
    return line.strip()


def token_rows(tokens, files: Sequence[Path], budget: int, row_len: int) -> Iterator[list[int]]:
    """Rows of ``row_len`` corpus token ids (the last one may be shorter), ``budget`` tokens in total."""
    buf: list[int] = []
    left = budget
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                text = clean_line(line)
                if not text:
                    continue
                buf.extend(tokens.encode(text + "\n"))
                while len(buf) >= row_len and left > 0:
                    take = min(row_len, left)
                    yield buf[:take]
                    buf, left = buf[take:], left - take
                if left <= 0:
                    return
    if buf and left > 0:
        yield buf[:left]


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_target_positions", "max_seq_len", "n_ctx",
                 "seq_length")


def context_length(model, cap: int = 1024) -> int:
    """Tokens per statistics row: the model's position limit (two spare: BERT-style models number positions
    from padding_idx + 1), at most ``cap``."""
    cfg = model.config
    n = next((getattr(cfg, k) for k in POSITION_KEYS if isinstance(getattr(cfg, k, None), int)), None)
    return int(min(n - 2, cap)) if n else cap


def _cache_path(handle, layer: int, chash: str, n_tokens: int) -> Path:
    dtype = str(handle.dtype).replace("torch.", "")
    folder = lmedit_home() / "stats" / handle.fingerprint
    key = cache_key("mom2", None, {"layer": layer, "corpus": chash, "tokens": n_tokens, "dtype": dtype},
                    show=("layer", "tokens", "dtype"))
    return cache_path(folder, key, ".pt", legacy=folder / f"mom2-L{layer}-{chash}-{n_tokens}-{dtype}.pt")


def _load(handle, path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file of any sort)
        raise StatsError(f"statistics cache {path} is unreadable ({e}); delete it to recompute") from e
    if state.get("fingerprint") != handle.fingerprint:
        raise StatsError(
            f"statistics cache {path} was computed for model fingerprint {state.get('fingerprint')}, not "
            f"{handle.fingerprint} ({handle.name}); refusing to use it -- delete it to recompute")
    return state


def _save(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # an interrupted save never leaves a half cache


def collect_stats(handle, layers: Sequence[int], *, corpus: str | Path | None = None, tokens: int = 100_000,
                  progress: bool = False, batch_tokens: int = 2048, cache: bool = True,
                  save_every: int = 10) -> dict[int, torch.Tensor]:
    """E[k kᵀ] (float64 [d_ff, d_ff]) of the W_out input at each layer, over ``tokens`` corpus tokens.

    One pass over the corpus serves every layer; it stops after the deepest requested layer. With
    ``cache`` the results (and partial sums, every ``save_every`` batches) live under ``$LMEDIT_HOME/stats``.
    """
    layers = sorted({int(x) for x in layers})
    handle.adapter.check_layers(handle.model, layers)
    files = corpus_files(corpus)
    chash = corpus_hash(files)
    paths = {lay: _cache_path(handle, lay, chash, tokens) for lay in layers}
    if not cache:
        return _collect(handle, layers, files, chash, tokens, batch_tokens, progress, paths, None, save_every)
    lock = paths[layers[0]].with_name(f".mom2-{chash}-{tokens}.lock")
    with file_lock(lock, blocking=True):  # workers sharing $LMEDIT_HOME: one computes, the others then read
        states = {lay: _load(handle, paths[lay]) for lay in layers}
        return _collect(handle, layers, files, chash, tokens, batch_tokens, progress, paths, states, save_every)


def _collect(handle, layers: list[int], files, chash: str, tokens: int, batch_tokens: int, progress: bool,
             paths: dict, states: dict | None, save_every: int) -> dict[int, torch.Tensor]:
    cache = states is not None
    states = states if cache else dict.fromkeys(layers)
    todo = [lay for lay in layers if not (states[lay] and states[lay]["done"])]
    if todo:
        start = {int(states[lay]["batches"]) if states[lay] else 0 for lay in todo}
        resume = start.pop() if len(start) == 1 else 0
        if resume:
            log.info("resuming statistics for layers %s after %d batches", todo, resume)
        sums = {lay: states[lay]["sum"] if resume else None for lay in todo}
        counts = {lay: int(states[lay]["count"]) if resume else 0 for lay in todo}
        meta = {"fingerprint": handle.fingerprint, "model": handle.name, "corpus_hash": chash,
                "tokens": tokens, "dtype": str(handle.dtype)}
        _accumulate(handle, todo, files, tokens, batch_tokens, sums, counts, resume, progress,
                    (lambda b, done: _checkpoint(paths, meta, sums, counts, b, done)) if cache else None,
                    save_every)
        for lay in todo:
            states[lay] = {"sum": sums[lay], "count": counts[lay]}
    return {lay: (states[lay]["sum"] / states[lay]["count"]) for lay in layers}


def _checkpoint(paths: dict, meta: dict, sums: dict, counts: dict, batches: int, done: bool) -> None:
    for lay, s in sums.items():
        _save(paths[lay], {**meta, "layer": lay, "sum": s, "count": counts[lay], "batches": batches, "done": done})


@torch.no_grad()
def _accumulate(handle, layers: list[int], files, tokens: int, batch_tokens: int, sums: dict, counts: dict,
                skip: int, progress: bool, checkpoint, save_every: int) -> None:
    """Run the corpus through the model up to max(layers), adding Σ k kᵀ per layer into ``sums``."""
    from tqdm.auto import tqdm

    model, adapter = handle.model, handle.adapter
    row_len = context_length(model)
    per_batch = max(1, batch_tokens // row_len)
    deepest = max(layers)

    def hook(layer: int):
        def add(_m, args) -> None:
            k = args[0].reshape(-1, args[0].shape[-1]).float()  # [rows*seq, d_ff]
            kk = (k.T @ k).double()  # [d_ff, d_ff]; float32 product, float64 sum
            sums[layer] = kk if sums[layer] is None else sums[layer] + kk.to(sums[layer].device)
            counts[layer] += k.shape[0]
            if layer == deepest:
                raise StopForward  # nothing above the deepest requested layer is needed

        return get_module(model, adapter.mlp_out.format(layer)).register_forward_pre_hook(add)

    hooks = [hook(lay) for lay in layers]
    rows = list(token_rows(handle.tokens, files, tokens, row_len))
    seen = sum(len(r) for r in rows)
    if seen < tokens:
        log.warning("corpus gave only %d of the %d tokens asked for", seen, tokens)
    batches = [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]
    bar = tqdm(total=seen, desc="collecting statistics", unit="tok", disable=not progress)
    try:
        for b, batch in enumerate(batches):
            if b < skip:
                bar.update(sum(len(r) for r in batch))
                continue
            # only the corpus's last row can be shorter; it runs alone, so no batch is ever padded
            chunks = [batch] if len({len(r) for r in batch}) == 1 else [[r] for r in batch]
            for chunk in chunks:
                ids = torch.tensor(chunk, device=handle.device)  # [rows, seq]
                try:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                except StopForward:
                    pass
            bar.update(sum(len(r) for r in batch))
            if checkpoint and (b + 1) % save_every == 0 and b + 1 < len(batches):
                checkpoint(b + 1, False)
        if checkpoint:
            checkpoint(len(batches), True)
    finally:
        bar.close()
        for h in hooks:
            h.remove()


def second_moments(handle, layers: Sequence[int], *, tokens: int = 100_000, corpus: str | Path | None = None,
                   progress: bool = False) -> dict[int, torch.Tensor]:
    """Lazy per-handle accessor used by editors: {layer: E[k kᵀ]} from ``handle.cache``, else disk, else computed."""
    files = corpus_files(corpus)
    key = (CACHE_KEY, corpus_hash(files), int(tokens))
    store = handle.cache.setdefault(key, {})
    missing = [lay for lay in layers if lay not in store]
    if missing:
        t0 = time.perf_counter()
        store.update(collect_stats(handle, missing, corpus=corpus, tokens=tokens, progress=progress))
        handle.cache[SETUP_SECONDS] = handle.cache.get(SETUP_SECONDS, 0.0) + time.perf_counter() - t0
    return {lay: store[lay] for lay in layers}


def disk_cached(handle, kind: str, params: dict, compute, *, show: tuple[str, ...] = (),
                legacy: str | None = None) -> dict:
    """A dict of tensors cached under ``$LMEDIT_HOME/stats/<fingerprint>/`` by :func:`lmedit.io.cache_key`
    of ``kind`` and ``params`` (refused for other models); ``legacy``: its file name before that scheme."""
    folder = lmedit_home() / "stats" / handle.fingerprint
    path = cache_path(folder, cache_key(kind, None, params, show), ".pt",  # the folder is the model's
                      legacy=folder / legacy if legacy else None)
    with file_lock(path.with_name(f".{path.name}.lock"), blocking=True):  # one process computes, others read
        state = _load(handle, path)
        if state is None:
            state = {**compute(), "fingerprint": handle.fingerprint}
            _save(path, state)
    return state
