"""Small hook utilities: read or rewrite a module's input/output inside a forward pass, stop a pass early.

Usage::

    with trace(model, "model.layers.4.mlp.down_proj", input=True) as t:
        model(**batch)
    keys = t.input            # [batch, seq, d_ff]

    with trace(model, "model.layers.4", edit_output=lambda out: add_delta(out)):
        model(**batch)        # the layer's output is replaced by add_delta(out)

    with trace_many(model, [p1, p2], stop=True):   # StopForward after the last of them
        ...

    with replayed(model, {"model.layers.0": out, "model.layers.1": out}) as stand_ins:
        model(**batch)        # layers 0-1 are not run: each returns ``out`` (a frozen prefix, recorded once)

Layer outputs that are tuples (older transformers) or plain tensors (newer ones) are not unwrapped here;
``ModelAdapter.hidden``/``with_hidden`` do that in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed activations are captured."""


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LookupError(f"module {path!r} not found in {type(model).__name__}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if isinstance(parent, nn.ModuleList | nn.Sequential) and leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


class Replay(nn.Module):
    """Stands in for a frozen module: returns ``output`` whatever it is given.

    Every loop that trains or optimises something above a frozen part of the network (value vectors,
    FT, patches, meta-training) runs that part once and replays it with these. Attributes it does not
    have come from the module it replaces (some models read e.g. ``layer.attention_type`` while looping).
    """

    def __init__(self, original: nn.Module, output: Any = None) -> None:
        super().__init__()
        self.output = output
        object.__setattr__(self, "_original", original)  # an attribute, not a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextlib.contextmanager
def replayed(model: nn.Module, outputs: dict[str, Any]) -> Iterator[dict[str, Replay]]:
    """Replace the module at each path by a :class:`Replay` of its output; all are put back on exit.

    Yields the stand-ins by path: set ``.output`` to replay another batch. The caller guarantees the
    replayed outputs are what the modules would compute (same inputs, nothing below them changed).
    """
    originals = {path: get_module(model, path) for path in outputs}
    stand_ins = {path: Replay(originals[path], out) for path, out in outputs.items()}
    try:
        for path, mod in stand_ins.items():
            set_module(model, path, mod)
        yield stand_ins
    finally:
        for path, mod in originals.items():
            set_module(model, path, mod)


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise LookupError(f"parameter {name!r} not found in {type(model).__name__}") from None


class Trace:
    """Capture (and optionally replace) one module's input and output during forward passes.

    Attributes ``input`` (first positional input) and ``output`` hold the last values seen, detached
    unless ``keep_grad`` is set.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str,
        *,
        input: bool = False,
        output: bool = True,
        edit_output: Callable[[Any], Any] | None = None,
        edit_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        stop: bool = False,
        keep_grad: bool = False,
    ) -> None:
        self.path = path
        self.input: Any = None
        self.output: Any = None
        self._handles = []
        module = get_module(model, path)

        def _keep(x: Any) -> Any:
            if keep_grad or not isinstance(x, torch.Tensor):
                return x
            return x.detach()

        if input or edit_input is not None:

            def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
                if not args:
                    return None
                x = args[0]
                if edit_input is not None:
                    x = edit_input(x)
                if input:
                    self.input = _keep(x)
                if edit_input is not None:
                    return (x, *args[1:])
                return None

            self._handles.append(module.register_forward_pre_hook(pre_hook))

        def hook(_m: nn.Module, _args: tuple, out: Any) -> Any:
            if edit_output is not None:
                out = edit_output(out)
            if output:
                self.output = _keep(out) if isinstance(out, torch.Tensor) else out
            if stop:
                raise StopForward
            return out if edit_output is not None else None

        self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.close()
        return exc_type is StopForward


def trace(model: nn.Module, path: str, **kw: Any) -> Trace:
    """Context manager form of :class:`Trace`; a ``StopForward`` raised inside is swallowed on exit."""
    return Trace(model, path, **kw)


@contextlib.contextmanager
def trace_many(
    model: nn.Module,
    paths: Iterable[str],
    *,
    stop: bool = False,
    order: Callable[[str], int] | None = None,
    **kw: Any,
) -> Iterator[dict[str, Trace]]:
    """Trace several modules at once. With ``stop``, the pass ends after the last path in ``order``."""
    paths = list(dict.fromkeys(paths))
    last = max(paths, key=order) if (stop and order) else (paths[-1] if stop else None)
    traces = {p: Trace(model, p, stop=(p == last), **kw) for p in paths}
    try:
        yield traces
    except StopForward:
        pass
    finally:
        for t in traces.values():
            t.close()
