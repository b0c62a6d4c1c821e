"""SERAC -- Semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al., ICML 2022).

    editor = lmedit.get_editor("serac", checkpoint="runs/serac")     # trained with `lmedit train --method serac`
    edit = editor.compute(handle, [request])                          # a ModuleSwap holding the edit memory
    with edit.applied(handle): ...                                    # in-scope inputs: counterfactual model
    router = edit.modules[path]; router.entries(); router.prune(lambda e: e["case_id"] != 3)

The model's weights never change: see :mod:`.router` for the routing design and :mod:`.objective` for
training. Encoder-decoder models are not supported (``capabilities.encoder_decoder=False``): the
counterfactual model must read the edit in its input, and in T5 that input is the encoder's, whose length
fixes the cross-attention mask the caller already built -- the wrapper cannot lengthen it honestly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...config import ConfigError, option
from ...edits import Edit, ModuleSwap
from ...registry import register_editor
from ...types import EditRequest
from ..base import Capabilities
from ..trained import TrainedConfig, TrainedEditor
from .objective import SERACObjective

if TYPE_CHECKING:
    from ...models.handle import ModelHandle


@dataclass
class SERACConfig(TrainedConfig):
    steps: int = option(1000, "training steps (one batch of edits each)")
    batch_size: int = option(16, "edits per training step (their queries are each other's negatives)")
    lr: float = option(1e-3, "Adam learning rate of the scope classifier head")
    threshold: float = option(0.5, "scope probability above which the counterfactual model answers")
    embed_dim: int = option(384, "embedding size of the sentence embedder (all-MiniLM-L6-v2: 384)")
    init_temperature: float = option(20.0, "initial temperature τ of the cosine scope score")
    init_cosine: float = option(0.8, "initial cosine at which p(in scope) = 0.5")
    cf_rank: int = option(0, "rank of the trained counterfactual adapter (0: the base model in context, untrained)")
    cf_layers: int = option(2, "last layers whose MLP output matrix carries the counterfactual adapter")
    cf_lr: float = option(1e-3, "Adam learning rate of the counterfactual adapter")
    cedit: float = option(1.0, "weight of the counterfactual NLL next to the classifier's BCE")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.cf_rank < 0:
            raise ConfigError(f"cf_rank must be >= 0, got {self.cf_rank}")


@register_editor("serac")
class SERAC(TrainedEditor):
    """Edit memory + trained scope classifier + counterfactual model -> ModuleSwap; batch-capable."""

    Config: ClassVar[type] = SERACConfig
    objective_class = SERACObjective
    capabilities: ClassVar[Capabilities] = Capabilities(batch=True, sequential=True, needs_fit=True,
                                                         edit_kind=ModuleSwap, encoder_decoder=False)
    quick: ClassVar[dict[str, Any]] = {"steps": 30, "batch_size": 3, "lr": 1e-2, "cf_rank": 4, "cf_lr": 2e-2,
                                       "val_every": 15, "val_size": 1, "val_batches": 1, "patience": 0}


    def edit_from(self, obj: SERACObjective, handle: ModelHandle, requests: list[EditRequest], cfg: Any) -> Edit:
        # the routing threshold is a use-time choice: the caller's value wins over the trained config's
        return obj.edit(requests, {"checkpoint": self.options.checkpoint}, threshold=cfg.threshold)
