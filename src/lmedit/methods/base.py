"""The Editor interface every method implements, and the shared request/config plumbing."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import Config, ConfigError, RunOptions
from ..edits import Edit, WeightDelta
from ..locate.pipeline import check_layers
from ..types import EditInputError, EditRequest

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; the benchmark and CLI branch on these, never on method names.

    Attributes:
        batch: one ``compute`` can take many requests at once.
        sequential: edits can be stacked on an already-edited model.
        needs_fit: the editor must be trained (``fit``) or loaded before it can edit.
        edit_kind: the :class:`~lmedit.edits.Edit` subclass it returns (the contract suite checks it).
        encoder_decoder: it can edit encoder-decoder (T5) models.
    """

    batch: bool = False
    sequential: bool = True
    needs_fit: bool = False
    edit_kind: type[Edit] = WeightDelta
    encoder_decoder: bool = True


class Editor(ABC):
    """Computes edits. ``compute`` must leave the model bit-identical (enforced by the contract tests).

    Subclasses set ``Config`` (a :class:`~lmedit.config.Config` dataclass), ``capabilities``, optional
    ``presets`` (preset name -> overrides, see ``models/architectures.py:PRESET_SHAPES``), and implement
    ``_compute``. ``resolve`` fills model-dependent defaults (e.g. layers chosen from the model's depth).

    What is not the method (where caches and a trained checkpoint live, speed settings) is the editor's
    ``options`` (:class:`~lmedit.config.RunOptions`), given as ``options=`` and read by ``_compute``; keys of
    older configs that became options (``v_batch_size``, ``value_cache``, ``checkpoint``) are mapped there.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[Config]] = Config
    capabilities: ClassVar[Capabilities] = Capabilities()
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # rough seconds per benchmark case (edit and scoring) of a ~100M-parameter model on one CPU core, from
    # the SmolLM2 Table 1 run; only used to start a table's longest cells first when workers share them
    relative_cost: ClassVar[float] = 2.0
    # compute() depends only on the model's weights, the resolved config, the requests and (trained editors)
    # the checkpoint it was loaded from, so its edits may be stored and reused (lmedit.bench.stores); an editor
    # that keeps state between calls sets this to False
    pure_compute: ClassVar[bool] = True
    # overrides that make an edit take seconds on the tiny test models (tests and `--quick` runs); not a
    # method's recommended setting
    quick: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Config | dict | str | Path | None = None, *, options: RunOptions | None = None,
                 **overrides: Any) -> None:
        if isinstance(config, str | Path):
            config = self.Config.from_file(config).to_dict()
        if isinstance(config, Config):
            if not isinstance(config, self.Config):
                raise ConfigError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
            config = config.to_dict()
        values, moved = self.Config.split_moved({**(config or {}), **overrides})
        self._overrides: dict[str, Any] = values
        self.options: RunOptions = RunOptions(**moved).merged(options)  # explicit options win
        self.Config.from_dict(self._overrides)  # fail now on unknown keys or bad values

    # --- configuration -----------------------------------------------------------------------------
    def config_for(self, handle: ModelHandle) -> Config:
        """Defaults, then the preset for this model's shape, then the user's values; then ``resolve``."""
        preset = self.presets.get(handle.preset or "", {})
        cfg = self.Config.from_dict({**preset, **self._overrides})
        return self.resolve(handle, cfg)

    def resolve(self, handle: ModelHandle, cfg: Config) -> Config:
        """Fill in what depends on the model (e.g. layers from its depth); the default keeps ``cfg``."""
        return cfg

    # --- editing -----------------------------------------------------------------------------------
    def compute(self, handle: ModelHandle, requests: list[EditRequest] | EditRequest) -> Edit:
        """Compute an edit for ``requests`` without changing the model."""
        requests = self._check_requests(handle, requests)
        cfg = self.config_for(handle)
        t0 = time.perf_counter()
        edit = self._compute(handle, requests, cfg)
        seconds = time.perf_counter() - t0
        edit.meta.update({
            "method": self.name,
            "config": cfg.to_dict(),
            "config_hash": cfg.hash(),
            "requests": [r.to_dict() for r in requests],
            "model_name": handle.name,
            "model_fingerprint": handle.fingerprint,
            "compute_seconds": seconds,
        })
        log.info("%s computed an edit of %d request(s) in %.2f s", self.name, len(requests), seconds)
        return edit

    def edit(self, handle: ModelHandle, requests: list[EditRequest] | EditRequest) -> Edit:
        """``compute`` then ``apply``; returns the applied edit (``edit.revert(handle)`` undoes it)."""
        return self.compute(handle, requests).apply(handle)

    @abstractmethod
    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: Any) -> Edit: ...

    def _check_requests(self, handle: ModelHandle, requests: list[EditRequest] | EditRequest) -> list[EditRequest]:
        if isinstance(requests, EditRequest):
            requests = [requests]
        requests = list(requests)
        if not requests:
            raise EditInputError("no requests given")
        for r in requests:
            if not isinstance(r, EditRequest):
                raise EditInputError(f"expected EditRequest objects, got {type(r).__name__}")
        if len(requests) > 1 and not self.capabilities.batch:
            raise EditInputError(f"{self.name} edits one request at a time; got {len(requests)}")
        if handle.is_encoder_decoder and not self.capabilities.encoder_decoder:
            raise EditInputError(
                f"{self.name} cannot edit encoder-decoder models such as {type(handle.model).__name__}"
            )
        cfg = handle.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        for r in requests:
            n = len(handle.tokens.encode(r.text + " " + r.target_new))
            if limit and n > limit:
                log.warning("%s: the prompt and target of %r are %d tokens, longer than the model's context of "
                            "%d; the edit sees a truncated or garbled input -- shorten the prompt",
                            self.name, r.text[:60], n, limit)
        return requests

    # --- trained editors ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The editor's trained state (tensors and plain values); empty for editors that are not trained."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore trained state saved by :meth:`state_dict` (a no-op for editors that are not trained)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, overrides={self._overrides})"


def depth_layer(handle: ModelHandle, fraction: float) -> int:
    """The layer at ``fraction`` of the model's depth (0 = first, 1 = last); in a hybrid model, the closest
    layer that has a feed-forward block."""
    n = handle.n_layers
    return handle.adapter.nearest_ffn_layer(min(n - 1, max(0, round(fraction * (n - 1)))))


class DepthLayer:
    """Mixin for an editor with one ``layer`` option: None means ``depth_fraction`` of the model's depth."""

    depth_fraction: ClassVar[float] = 0.85

    def resolve(self, handle: ModelHandle, cfg: Any) -> Any:
        """``cfg`` with its layer filled in (when None) and checked against the model."""
        if cfg.layer is None:
            cfg = cfg.replace(layer=depth_layer(handle, self.depth_fraction))
        check_layers(handle, [cfg.layer])
        return cfg
