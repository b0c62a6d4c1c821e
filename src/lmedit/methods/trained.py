"""The trained-editor base: shared config fields, ``fit``, checkpoint loading and the "train me first" error.

A method subclasses :class:`TrainedEditor` (or :class:`LastLayersEditor` when it edits the MLPs of the last
layers), declares a Config derived from :class:`TrainedConfig` and its ``objective_class`` (networks + losses, see
:class:`lmedit.training.trainer.Objective`) whose ``edit(requests, meta)`` returns the Edit. Trained state lives
in the editor instance, keyed by the base model's fingerprint. The training loop itself (:mod:`lmedit.training`)
knows nothing of editors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import Config, ConfigError, option
from ..edits import Edit
from ..errors import LmeditError
from ..training import checkpoint as ckpt
from ..training.data import examples_from_cases, split
from ..training.trainer import Objective, Trainer, TrainResult, TrainSettings
from ..types import EditCase, EditRequest
from .base import Capabilities, Editor

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class TrainedConfig(Config):
    """Fields every trained editor has (training length, optimiser, validation, checkpoint)."""

    # a location, not a value: RunOptions.checkpoint; runs and cells identify it by its content (state_id)
    moved: ClassVar[dict[str, str]] = {"checkpoint": "checkpoint"}
    steps: int = option(2000, "training steps (one batch of edits each)")
    batch_size: int = option(4, "edits per training step")
    lr: float = option(1e-4, "Adam learning rate of the editor network")
    val_every: int = option(100, "validate and checkpoint every this many steps")
    val_batches: int = option(10, "validation batches per validation (0 = the whole held-back slice)")
    val_size: int = option(100, "training cases held back for validation (the last ones)")
    patience: int = option(5, "stop after this many validations without improvement (0 = never)")
    seed: int = option(0, "seed of the batch order and the network initialisation")
    grad_clip: float = option(100.0, "gradient-norm clip of the outer optimiser")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


class NotTrainedError(LmeditError, RuntimeError):
    """A trained editor asked to edit before it was trained or loaded."""


class TrainedEditor(Editor):
    """Base class of editors that must be trained (``capabilities.needs_fit``)."""

    Config: ClassVar[type[Config]] = TrainedConfig
    capabilities: ClassVar[Capabilities] = Capabilities(batch=True, needs_fit=True)
    quick: ClassVar[dict[str, Any]] = {}
    relative_cost: ClassVar[float] = 1.0  # a forward of the trained network per edit; scoring dominates
    default_dataset: ClassVar[str] = "zsre"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._trained: dict[str, Objective] = {}  # base-model fingerprint -> trained objective
        self._pending: dict[str, dict[str, Any]] = {}  # states given to load_state_dict, built on first use

    # --- for subclasses ----------------------------------------------------------------------------
    objective_class: ClassVar[type]  # called as objective_class(handle, cfg)

    def build(self, handle: ModelHandle, cfg: Any) -> Objective:
        """The method's networks and losses for ``handle`` (untrained until ``fit`` or a loaded state)."""
        return self.objective_class(handle, cfg)

    def edit_from(self, obj: Any, handle: ModelHandle, requests: list[EditRequest], cfg: Any) -> Edit:
        """The edit of ``requests`` by the trained ``obj``; a subclass may pass use-time options."""
        return obj.edit(requests, {"checkpoint": self.options.checkpoint})

    # --- training ----------------------------------------------------------------------------------
    def train_request(self, handle: ModelHandle) -> dict[str, str]:
        """What training this editor for ``handle`` takes: method, model and default dataset (error data)."""
        return {"method": self.name, "model": handle.name, "dataset": self.default_dataset}

    def _info(self, handle: ModelHandle, cfg: Any) -> dict[str, Any]:
        return {"method": self.name, "model_name": handle.name, "model_fingerprint": handle.fingerprint,
                "config": cfg.to_dict()}

    def fit(self, handle: ModelHandle, cases: list[EditCase], *, quick: bool = False, steps: int | None = None,
            out: str | Path | None = None, progress: bool = False, resume: bool = False,
            on_step: Any = None, max_minutes: float = 0.0) -> TrainResult:
        """Train the editor for ``handle``'s model on ``cases`` (the last ``val_size`` are held back).

        Args:
            quick: use the class's ``quick`` settings (seconds on the tiny test models).
            steps: override the number of training steps.
            out: directory for checkpoints and the final ``editor.*`` files (None: keep in memory only).
            resume: continue the run saved in ``out`` (at most one checkpoint interval is lost).
            max_minutes: wall-clock budget (0: none); the run then ends with a validation and checkpoint.
        """
        cfg = self.config_for(handle)
        if quick:
            cfg = cfg.replace(**{**self.quick, **self._overrides})
        if steps is not None:
            cfg = cfg.replace(steps=steps)
        train, val = split(examples_from_cases(cases), cfg.val_size)
        obj = self.build(handle, cfg)
        settings = TrainSettings(cfg.steps, cfg.batch_size, cfg.val_every, cfg.val_batches, cfg.patience,
                                 cfg.seed, cfg.grad_clip, max_minutes * 60.0)
        trainer = Trainer(obj, settings, self._info(handle, cfg), out=out, progress=progress, on_step=on_step)
        if resume:
            trainer.resume()
        log.info("training %s on %d cases (%d held back) for up to %d steps", self.name, len(train), len(val),
                 cfg.steps)
        result = trainer.run(train, val)
        self._trained[handle.fingerprint] = obj
        if out is not None:
            ckpt.write(out, ckpt.EDITOR, obj.state_tensors(),
                       {**self._info(handle, cfg), "steps_done": result.steps_done, "best_val": result.best_val,
                        "stopped_early": result.stopped_early, "history": result.history})
        return result

    def load_checkpoint(self, handle: ModelHandle, directory: str | Path) -> Objective:
        """Load ``editor.*`` from ``directory`` for ``handle`` (refuses other models and methods)."""
        info, tensors = ckpt.read(directory, ckpt.EDITOR, method=self.name, fingerprint=handle.fingerprint,
                                  model_name=handle.name)
        cfg = self.Config.from_dict(self.Config.split_moved(info["config"])[0])  # older ones hold "checkpoint"
        obj = self.build(handle, cfg)
        try:
            obj.load_state_tensors(tensors)
        except (KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {directory} does not fit this {self.name} editor: {e}") from e
        self._trained[handle.fingerprint] = obj
        return obj

    def state_dict(self) -> dict[str, Any]:
        """Trained states by base-model fingerprint: {fingerprint: {"config": ..., "tensors": ...}}."""
        out = dict(self._pending)
        for fp, obj in self._trained.items():
            out[fp] = {"config": obj.cfg.to_dict(), "tensors": {k: v.detach().clone()
                                                                for k, v in obj.state_tensors().items()}}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending.update(state)

    def trained_for(self, handle: ModelHandle, cfg: Any) -> Objective:
        """The trained networks for ``handle``'s model: fitted or loaded before, or read from the
        ``options.checkpoint`` directory;
        NotTrainedError when there are none."""
        if handle.fingerprint in self._trained:
            return self._trained[handle.fingerprint]
        if handle.fingerprint in self._pending:
            st = self._pending.pop(handle.fingerprint)
            obj = self.build(handle, self.Config.from_dict(self.Config.split_moved(st["config"])[0]))
            obj.load_state_tensors(st["tensors"])
            self._trained[handle.fingerprint] = obj
            return obj
        if self.options.checkpoint:
            return self.load_checkpoint(handle, self.options.checkpoint)
        raise NotTrainedError(
            f"{self.name} must be trained for model {handle.name!r} before it can edit: call "
            f"editor.fit(handle, cases, out=DIR) on {self.default_dataset!r} training cases, or pass "
            f"checkpoint=DIR (get_editor({self.name!r}, checkpoint=DIR)) with the folder of an earlier fit",
            train=self.train_request(handle))

    def _compute(self, handle: ModelHandle, requests: list[EditRequest], cfg: Any) -> Edit:
        obj = self.trained_for(handle, cfg)
        return self.edit_from(obj, handle, requests, cfg)


class LastLayersEditor(TrainedEditor):
    """A trained editor whose config has ``layers``: None means the MLPs of the last ``last_layers`` layers."""

    last_layers: ClassVar[int] = 3

    def resolve(self, handle: ModelHandle, cfg: Any) -> Any:
        if cfg.layers is None:
            n = handle.n_layers
            cfg = cfg.replace(layers=list(range(max(0, n - self.last_layers), n)))
        handle.adapter.check_layers(handle.model, cfg.layers)
        return cfg

    def build(self, handle: ModelHandle, cfg: Any) -> Objective:
        return self.objective_class(handle, self.resolve(handle, cfg))
