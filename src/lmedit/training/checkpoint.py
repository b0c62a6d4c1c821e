"""Checkpoints of trained editors: tensors in safetensors, everything else in a JSON file next to them.

Layout of an output directory::

    editor.json + editor.<hash>.safetensors   the trained editor (best validation state) -- what ``checkpoint=`` loads
    train.json  + train.<hash>.safetensors    the last training state (editor, optimiser, counters) -- for --resume
    best.json   + best.<hash>.safetensors     the best editor state so far

Tensor files are named by their content hash and written before the JSON file that points to them, which
replaces the old one atomically; only then are older tensor files removed. A crash at any moment therefore
leaves the previous (JSON, tensors) pair intact, so a resumed run loses at most one checkpoint interval.
Each JSON file records the method, the base model's name and fingerprint, the editor configuration, and the
sha256 of every safetensors file it refers to, so a checkpoint for another model or method is refused with
a message that says so, and a truncated or altered file is detected before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import LmeditError
from ..io import atomic_write

log = logging.getLogger(__name__)

FORMAT = 1
EDITOR = "editor"
TRAIN = "train"
BEST = "best"


class CheckpointError(LmeditError, RuntimeError):
    """A checkpoint that cannot be used here; the message says why and what to do."""


def state_id(directory: str | Path) -> str | None:
    """Identity of a trained editor folder by content: its method, config and the sha256 of its weights, as
    recorded in ``editor.json`` (None when there is no readable editor.json). A copied or moved checkpoint
    keeps it; retraining at the same path changes it. Benchmark runs record it (``checkpoint_state``) and the
    table's cell keys use it."""
    from ..digests import digest

    try:
        info = json.loads((Path(directory) / f"{EDITOR}.json").read_text())
    except (OSError, ValueError):
        return None
    return digest([info.get("method"), info.get("config"), info.get("files")])[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(directory: str | Path, stem: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Save ``<stem>.<hash>.safetensors``, then ``<stem>.json`` pointing to it, then drop older tensor files."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stem}.{digest[:16]}.safetensors"
    atomic_write(directory / name, data)
    body = {"format": FORMAT, **info, "files": {name: digest}}
    atomic_write(directory / f"{stem}.json", json.dumps(body, indent=2, default=str).encode())
    for old in directory.glob(f"{stem}.*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / f"{stem}.json"


def tensor_file(directory: str | Path, stem: str) -> Path:
    """The tensor file that ``<stem>.json`` points to."""
    info = json.loads((Path(directory) / f"{stem}.json").read_text())
    return Path(directory) / next(iter(info["files"]))


def read(directory: str | Path, stem: str, *, method: str, fingerprint: str | None,
         model_name: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load ``<stem>.json`` + its tensors, checking format, method, base model and file hashes."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / f"{stem}.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no {stem}.json in {directory}: not a trained-editor checkpoint directory")
    try:
        info = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {meta_path} is corrupted ({e}); retrain, or resume from a copy") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not an lmedit checkpoint of format {FORMAT}")
    if info.get("method") != method:
        raise CheckpointError(
            f"checkpoint {directory} was trained for method {info.get('method')!r}, not {method!r}; train a "
            f"{method} editor (editor.fit(handle, cases, out=DIR)) and load that folder",
            train={"method": method, "model": model_name or "MODEL"})
    if fingerprint is not None and info.get("model_fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {directory} was trained on model {info.get('model_name')!r} (fingerprint "
            f"{info.get('model_fingerprint')}), not on {model_name!r} (fingerprint {fingerprint}); a trained "
            "editor only works for the model it was trained on: train one for this model",
            train={"method": method, "model": model_name or "MODEL"})
    files = info.get("files") or {}
    if len(files) != 1:
        raise CheckpointError(f"{meta_path} names no tensor file; the checkpoint is corrupted")
    name, want = next(iter(files.items()))
    path = directory / name
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory} lacks {name}; the directory is incomplete")
    got = _sha256(path)
    if want != got:
        raise CheckpointError(f"{path} is corrupted or was changed after saving (sha256 {got[:12]}..., "
                              f"expected {str(want)[:12]}...); retrain, or resume from an intact copy")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001  (safetensors raises several types on bad files)
        raise CheckpointError(f"{path} cannot be read ({e}); retrain, or resume from an intact copy") from e
    return info, tensors


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state as flat tensors + a JSON description (param groups without the params)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    for key, v in info.get("scalars", {}).items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
