"""Training pipeline of trained editors (MEND, KE, SERAC): data, loop, checkpoints, shared losses.

    editor = lmedit.get_editor("mend")
    editor.fit(handle, lmedit.load_dataset("zsre-train", n=1000), out="runs/mend")   # or `lmedit train`
    edit = editor.compute(handle, [request])
"""

from .checkpoint import CheckpointError
from .data import TrainExample, examples_from_cases, split
from .editor import NotTrainedError, TrainedConfig, TrainedEditor
from .trainer import Trainer, TrainResult, TrainSettings

__all__ = ["CheckpointError", "NotTrainedError", "TrainExample", "TrainResult", "TrainSettings",
           "TrainedConfig", "TrainedEditor", "Trainer", "examples_from_cases", "split"]
