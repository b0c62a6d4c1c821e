"""The training loop of trained editors (MEND, KE, SERAC): data, loop, checkpoints, shared losses.

It knows no Editor: the trained-editor base class is :mod:`lmedit.methods.trained`.

    editor = lmedit.get_editor("mend")
    editor.fit(handle, lmedit.load_dataset("zsre-train", n=1000), out="runs/mend")   # or `lmedit train`
    edit = editor.compute(handle, [request])
"""

from .checkpoint import CheckpointError
from .data import TrainExample, examples_from_cases, split
from .trainer import Trainer, TrainResult, TrainSettings

__all__ = ["CheckpointError", "TrainExample", "TrainResult", "TrainSettings", "Trainer", "examples_from_cases",
           "split"]
