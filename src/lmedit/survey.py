"""Which causal LM architectures of the installed transformers lmedit can edit, checked on tiny models.

``python -m lmedit.survey [--out docs/architectures.md] [CLASS ...]`` builds every ``*ForCausalLM``
class from a tiny config (``tiny.py``), finds its adapter (registered or discovered), and edits one fact with
ROME and with FT-M: each edit must compute without touching the model, raise the target's probability when
applied, and revert bit-exactly. It writes a page listing each architecture with its status and, for the
rest, the reason, and prints the count.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .models.handle import ModelHandle

log = logging.getLogger(__name__)

EDITABLE, NOT_EDITED, REFUSED, NO_BUILD = "editable", "edit failed", "refused", "does not build"

# tiny settings: a few value / training steps, second moments over a few hundred tokens, no context templates
EDITORS: dict[str, dict[str, Any]] = {
    "rome": {"v_num_grad_steps": 20, "v_weight_decay": 0.0, "mom2_tokens": 2000, "context_lengths": []},
    "ft-m": {"steps": 6, "lr": 2e-2},
}
# ‖ΔW‖/‖W‖ bound when applying: the default (lmedit.edits.MAX_RELATIVE_UPDATE = 100) is meant for trained weights;
# a random two-layer model stores no facts and needs larger relative updates (ROME on tiny Phi: 1.6e3), so the
# survey lifts it as the fast tests do (tests/conftest.py)
TINY_UPDATE_BOUND = 1e9


@dataclass
class ArchResult:
    """One architecture's outcome. ``status``: editable | edit failed | refused | does not build."""

    name: str
    status: str
    reason: str = ""
    adapter: str = ""  # "registered" or "discovered: <edit site template>"
    site: str = ""  # the adapter's edit_site: "ffn", or "attn_out" for a model without a dense FFN
    site_reason: str = ""  # why not an FFN (the adapter's edit_site_reason)
    seconds: float = 0.0
    gains: tuple[float, ...] = ()  # log p(target) after - before, per editor

    @property
    def builds(self) -> bool:
        return self.status != NO_BUILD


def _request():
    from .types import EditRequest

    # the subject ends the prompt: in a two-layer random model, an edit at the subject's last token then reaches
    # the prediction directly instead of through one random attention layer (the machinery is what is tested)
    return EditRequest(prompt="The mother tongue of {}", subject="Danielle Darrieux", target_new=" is English",
                       target_true=" is French", case_id=0)


def _short(e: BaseException) -> str:
    text = str(e).split(". If the model has the parts")[0].split("\n")[0]
    return f"{type(e).__name__}: {text[:300]}"


def edit_and_revert(handle: ModelHandle, editor_name: str, overrides: dict[str, Any], layer: int) -> float:
    """Compute, apply and revert one edit; returns the gain in log p(target). Raises AssertionError when
    compute changed the model, the target did not rise, or the revert was not bit-exact."""
    from .metrics.scoring import score_targets
    from .registry import get_editor

    req = _request()
    state = {k: v.detach().clone() for k, v in handle.model.state_dict().items()}

    def same() -> bool:
        now = handle.model.state_dict()
        return set(now) == set(state) and all(torch.equal(v, state[k]) for k, v in now.items())

    def logp() -> float:
        return -score_targets(handle, [req.text], [req.target_new])[0].nll

    before = logp()
    edit = get_editor(editor_name, layers=[layer], **overrides).compute(handle, [req])
    assert same(), f"{editor_name}: compute changed the model"
    edit.apply(handle, max_relative_update=TINY_UPDATE_BOUND)
    try:
        after = logp()
    finally:
        edit.revert(handle)
    assert same(), f"{editor_name}: revert did not restore the weights bit-exactly"
    assert after > before, f"{editor_name}: log p(target) did not rise ({before:.4f} -> {after:.4f})"
    return after - before


def tiny_corpus(folder: Path) -> Path:
    """A small text file for ROME's second moments (the tiny tokenizer's own sentences), in ``folder``."""
    from .models.tiny import CORPUS

    path = Path(folder) / "tiny-corpus.txt"
    path.write_text("\n".join(CORPUS * 40) + "\n")
    return path


def check(name: str, tokenizer: Any, corpus: Path) -> ArchResult:
    """Build ``name`` tiny, find its adapter, and edit it with every editor of :data:`EDITORS` (ROME's
    statistics over the text file ``corpus``)."""
    from .models.handle import ModelHandle
    from .models.lookup import registered_adapter
    from .models.tiny import tiny_model

    start = time.perf_counter()
    try:
        model = tiny_model(name)
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    except (Exception, MemoryError) as e:  # noqa: BLE001 -- reported as the reason in the survey
        return ArchResult(name, NO_BUILD, _short(e), seconds=time.perf_counter() - start)
    try:
        handle = ModelHandle(model, tokenizer, name=f"tiny-{name}")
    except Exception as e:  # noqa: BLE001
        return ArchResult(name, REFUSED, _short(e), seconds=time.perf_counter() - start)
    ad = handle.adapter
    how = "registered" if registered_adapter(model) is not None else f"discovered: {ad.mlp_out}"
    if ad.edit_site == "attn_out":
        how += " (attention output: no dense FFN)"
    layer = ad.nearest_ffn_layer(0)
    gains = []
    site = {"site": ad.edit_site, "site_reason": ad.edit_site_reason}
    for editor_name, overrides in EDITORS.items():
        try:
            extra = {"mom2_corpus": str(corpus)} if "mom2_tokens" in overrides else {}
            gains.append(edit_and_revert(handle, editor_name, {**overrides, **extra}, layer))
        except (Exception, MemoryError) as e:  # noqa: BLE001
            return ArchResult(name, NOT_EDITED, f"{editor_name}: {_short(e)}", how, **site,
                              seconds=time.perf_counter() - start, gains=tuple(gains))
    return ArchResult(name, EDITABLE, "", how, **site, seconds=time.perf_counter() - start, gains=tuple(gains))


@contextlib.contextmanager
def memory_limit(gib: float | None) -> Iterator[None]:
    """Cap this process's address space for the block (a tiny config whose forward still allocates gigabytes
    then fails with a MemoryError/RuntimeError, reported as its reason, instead of exhausting the machine)."""
    if not gib:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (min(cap, hard) if hard != resource.RLIM_INFINITY else cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def survey(names: Sequence[str] | None = None, max_memory_gib: float | None = 14.0) -> list[ArchResult]:
    from .models.tiny import causal_lm_classes, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    results = []
    with tempfile.TemporaryDirectory() as tmp, memory_limit(max_memory_gib):
        corpus = tiny_corpus(Path(tmp))
        for name in names or causal_lm_classes():
            results.append(check(name, tokenizer, corpus))
            r = results[-1]
            log.info("%s: %s %s (%.1fs)", name, r.status, r.reason, r.seconds)
    return results


def counts(results: Sequence[ArchResult]) -> tuple[int, int, int]:
    """(editable, built, total)."""
    built = [r for r in results if r.builds]
    return sum(r.status == EDITABLE for r in built), len(built), len(results)


# why a model has no dense FFN (the start of discovery's reason) -> how the page names the kind
NO_FFN_KINDS = {
    "mixture of routed experts": "mixtures of experts with routed experts only",
    "no position-wise feed-forward": "models without a feed-forward block (state-space / recurrent layers only)",
}


def _breakdown(results: Sequence[ArchResult]) -> list[str]:
    """Lines counting the editable architectures by edit site, and naming the built ones that are not."""
    editable = [r for r in results if r.status == EDITABLE]
    attn = [r for r in editable if r.site == "attn_out"]
    lines = [f"Edit sites: {len(editable) - len(attn)} are edited at a dense FFN output projection (a shared "
             f"expert's in mixtures of experts that have one) and {len(attn)} at the token mixer's output "
             "projection, because none of their blocks has a dense FFN:", ""]
    for key, label in NO_FFN_KINDS.items():
        names = [r.name for r in attn if key in r.site_reason]
        lines.append(f"- {len(names)} {label} ({', '.join(names)});")
    other = [r.name for r in attn if not any(k in r.site_reason for k in NO_FFN_KINDS)]
    if other:
        lines.append(f"- {len(other)} for other reasons ({', '.join(other)});")
    lines[-1] = lines[-1][:-1] + "."
    rest = [r for r in results if r.builds and r.status != EDITABLE]
    if rest:
        lines += ["", f"The {len(rest)} built architectures that are not editable:", ""]
        lines += [f"- {r.name} ({r.status}): {r.reason.replace(chr(10), ' ')[:520]}" for r in rest]
    return [*lines, ""]


def render(results: Sequence[ArchResult], version: str, seconds: float) -> str:
    editable, built, total = counts(results)
    lines = [
        "# Architectures lmedit can edit",
        "",
        "Generated by `python -m lmedit.survey` (do not edit by hand) with transformers "
        f"{version}, in {seconds:.0f} s on one CPU core.",
        "",
        f"**{editable} of the {built} causal LM architectures that build from a tiny config are editable by ROME "
        f"and FT-M with a bit-exact revert ({100 * editable / max(built, 1):.1f}%)**; {total - built} of the "
        f"{total} `*ForCausalLM` classes do not build from a generated tiny config (reasons below).",
        "",
        *_breakdown(results),
        "Every `*ForCausalLM` class of the installed transformers is built with random weights from its own "
        "config, shrunk (width 64, two layers, a 400-token vocabulary, four experts of which two are active; a "
        "weight matrix the class initialises to all zeros gets small random values, as training would give it; "
        "`lmedit/models/tiny.py`). Its adapter comes from the registered table when the class is there, and is "
        "otherwise discovered from the module structure (`lmedit/models/discover.py`). *Editable* means: ROME "
        "and FT-M each compute an edit of one fact without changing the model, the edit raises the target's "
        "log-probability when applied, and reverting it restores every parameter bit for bit. The bound on "
        "‖ΔW‖/‖W‖ that refuses diverged edits of real models (100) is lifted here, as in the fast tests: a random "
        "two-layer model stores no facts, and an edit of it can need a relative update of 10³.",
        "",
        "Edit sites: ROME and FT-M rewrite one linear map that every token passes through and that writes into "
        "the residual stream; its input at the subject's last token is the key. That is the FFN's output "
        "projection wherever a block has a dense FFN; in a mixture of experts, a dense shared expert's (the "
        "routed experts, which see only their tokens, are left alone). A model none of whose blocks has a dense "
        "FFN (routed experts only, or no FFN at all) is edited at its token mixer's output projection (attention "
        "`o_proj`, or the state-space / recurrent mixer's output): the adapter records `edit_site=\"attn_out\"` "
        "and the reason, and editors that need FFN neurons (knowledge neurons, T-Patcher, CaliNet, MEND's input "
        "matrices) refuse such a model with that reason.",
        "",
        "## How an unregistered model gets its adapter",
        "",
        "`lmedit.load_model(...)` / `ModelHandle(model, tokenizer)` call `adapter_for(model)` "
        "(`lmedit/models/lookup.py`): a class in the registered table (`lmedit/models/architectures.py`) gets "
        "its adapter as written there; any other model gets one discovered from one short forward pass with "
        "hooks on every module (`lmedit/models/discover.py`):",
        "",
        "- decoder blocks: the outermost `nn.ModuleList` whose blocks map [batch, seq, d] to the same shape;",
        "- attention (token mixer) vs position-wise parts: a module is re-run on its recorded input with "
        "position 0 changed; a position-wise module's other positions do not move;",
        "- FFN output projection (the keys of ROME/MEMIT are its input): a linear map outside the token mixer "
        "that writes width d and reads every token, Linear or Conv1D, its orientation read from the weight "
        "shape and confirmed by recomputing its output; the FFN input projection(s) read width d (two, or one "
        "fused, when gated); routed experts (which see only their tokens) are never chosen;",
        "- embeddings and head from `get_input_embeddings` / `get_output_embeddings` (tied or not), the final "
        "norm as the module between the last block and the head;",
        "- no dense FFN in any block: the token mixer's output projection (the last linear map inside it that "
        "writes width d and reads every token) is the edit site;",
        "- blocks that carry several residual streams ([batch, seq, streams, d], hyper-connections) are found "
        "like single-stream ones; a head hidden from `get_output_embeddings` is the linear map whose output is "
        "the logits;",
        "- hybrid models whose layers differ (recurrent or expert layers beside dense ones) record the layers "
        "that have the FFN; layer checks refuse the others by name and depth defaults move to the nearest "
        "FFN layer.",
        "",
        "The adapter is then validated: every part runs with the expected shapes, and perturbing the FFN output "
        "and the final norm output must change the logits. It is logged once when a handle is made. Models "
        "without a tuned preset take layers from depth and hyperparameters from width, and `--layers auto` "
        "(causal tracing) works on them. Encoder-decoders other than T5 are refused. When discovery fails, "
        "the error names what it could not find and shows how to register an adapter by hand:",
        "",
        "```python",
        "from lmedit.models.adapter import ModelAdapter",
        "from lmedit.models.lookup import register_adapter",
        'register_adapter("MyForCausalLM", ModelAdapter(family="my", embed="model.embed_tokens", '
        'layers="model.layers.{}",',
        '    attn="model.layers.{}.self_attn", attn_out="model.layers.{}.self_attn.o_proj", '
        'mlp="model.layers.{}.mlp",',
        '    mlp_in=("model.layers.{}.mlp.up_proj",), mlp_out="model.layers.{}.mlp.down_proj", '
        'ln_final="model.norm", lm_head="lm_head"))',
        "```",
        "",
        "## Every class",
        "",
        "| architecture | status | adapter | reason |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.adapter} | {r.reason.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import transformers

    p = argparse.ArgumentParser(prog="python -m lmedit.survey", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="classes to check (default: every *ForCausalLM)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown page here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = survey(args.names)
    seconds = time.perf_counter() - start
    editable, built, total = counts(results)
    for r in results:
        print(f"{r.name:40s} {r.status:15s} {r.reason[:110]}")
    print(f"editable: {editable} / {built} that build ({total} classes), {seconds:.0f} s")
    if args.out:
        args.out.write_text(render(results, transformers.__version__, seconds))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
