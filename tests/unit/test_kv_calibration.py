"""kv-memory's per-entry gate thresholds, calibrated on a reference text (``calibrate_*`` options).

A key taken at a generic subject token (" 20" in "HK Orange 20") also matches that token in running text;
each entry's gate therefore opens ``calibrate_margin`` above the key's highest cosine on a reference text,
never above its own prompt's cosine and never below the shared threshold.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_handle
from lmedit.config import ConfigError
from lmedit.hooks import get_module
from lmedit.locate.keys import token_inputs
from lmedit.methods.kv_memory import gate_thresholds, reference_inputs
from lmedit.registry import editor_class, get_editor
from lmedit.types import EditRequest

FACT = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
# the subject in other sentences: its last token's W_out input resembles the fact's key
REFERENCE = ("Yesterday Danielle Darrieux sang at the opera. Critics said Danielle Darrieux was tired. "
             "Rain fell on the town, and the market closed early. ") * 8


def kv(**kw):
    return get_editor("kv-memory", **{**editor_class("kv-memory").quick, **kw})


def test_thresholds_by_hand():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    prompts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.5, 0.866]])  # own cosines 1, 1, 0.6, 0.5
    reference = torch.tensor([0.2, 0.8, 0.8, 0.8])
    bounds, capped = gate_thresholds(keys, prompts, reference, threshold=0.7, margin=0.05)
    assert bounds[0] == pytest.approx(0.7)  # far from the reference: the shared threshold
    assert bounds[1] == pytest.approx(0.85)  # raised to 0.8 + 0.05
    assert bounds[2] == pytest.approx(0.7)  # the cap (its own prompt, 0.6) is below the threshold: threshold
    assert bounds[3] == pytest.approx(0.7)
    assert capped == [2, 3]
    keys2 = torch.tensor([[1.0, 0.0]])
    bounds, capped = gate_thresholds(keys2, torch.tensor([[0.9, 0.43589]]), torch.tensor([0.88]), 0.7, 0.05)
    assert bounds[0] == pytest.approx(0.9 - 1e-4, abs=1e-5) and capped == [0]  # capped at its own prompt
    assert gate_thresholds(keys2, keys2, None, 0.7, 0.05) == ([0.7], [])


def _gate_opened(handle, edit, ids, layer) -> int:
    """Token positions of ``ids`` where the memory at ``layer`` adds anything to W_out's output."""
    path = handle.adapter.mlp_out.format(layer)
    outs = []

    def grab(_m, _a, out):
        outs.append(out.detach().clone())

    def run():
        hook = get_module(handle.model, path).register_forward_hook(grab)
        try:
            with torch.no_grad():
                handle.model(input_ids=torch.tensor([ids]))
        finally:
            hook.remove()
        return outs.pop()

    plain = run()
    edit.apply(handle)
    try:
        with_memory = run()
    finally:
        edit.revert(handle)
    return int((with_memory - plain).abs().amax(-1).gt(0).sum())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_calibrated_gate_stays_shut_on_its_reference_text(family, tokenizer, tmp_path):
    handle = make_handle(family, tokenizer)
    text = tmp_path / "reference.txt"
    text.write_text(REFERENCE)
    ids = handle.tokens.encode(REFERENCE)[:120]
    common = {"threshold": 0.3, "calibrate_text": str(text), "calibrate_tokens": 120}
    loose = kv(**{**common, "calibrate_tokens": 0}).compute(handle, [FACT])
    calibrated = kv(**common).compute(handle, [FACT])
    layer = calibrated.meta["stats"]["layer"]
    (bound,) = calibrated.meta["stats"]["threshold"]
    (ref_cos,) = calibrated.meta["stats"]["reference_cosine"]
    assert ref_cos > 0.3, "the reference text holds the subject: its key must resemble an input there"
    assert bound == pytest.approx(ref_cos + 0.05, abs=1e-4)  # raised above the reference (0.47 / 0.84 here)
    assert _gate_opened(handle, loose, ids, layer) > 0, "the shared threshold lets the subject's mentions in"
    assert _gate_opened(handle, calibrated, ids, layer) == 0
    # the fact itself still opens it: the edit prompt's subject token
    prompt_ids = handle.tokens.prompt_ids(FACT.text)
    assert _gate_opened(handle, calibrated, prompt_ids, layer) >= 1


def test_a_key_that_matches_the_reference_as_well_as_its_prompt_is_capped_and_said(tokenizer, tmp_path, caplog):
    handle = make_handle("llama", tokenizer)
    text = tmp_path / "reference.txt"
    text.write_text(FACT.text + " " + FACT.target_new + ". " + REFERENCE)  # the edit prompt itself
    ed = kv(calibrate_text=str(text), calibrate_tokens=100, key="prompt")
    with caplog.at_level(logging.WARNING, logger="lmedit.methods.kv_memory"):
        edit = ed.compute(handle, [FACT])
    assert "as close to ordinary text" in caplog.text and "Danielle Darrieux" in caplog.text
    (bound,) = edit.meta["stats"]["threshold"]
    assert 0.9 <= bound < 1.0
    edit.apply(handle)  # the edit still answers its prompt
    edit.revert(handle)


def test_the_reference_is_read_once_for_memory_edits_and_again_after_a_weight_edit(tokenizer, tmp_path):
    from lmedit.digests import tensor_digest
    from lmedit.edits import WeightDelta

    handle = make_handle("llama", tokenizer)
    text = tmp_path / "reference.txt"
    text.write_text(REFERENCE)
    ed = kv(calibrate_text=str(text), calibrate_tokens=100)
    cfg = ed.config_for(handle)
    first = reference_inputs(handle, cfg.layers[0], cfg)
    memory = ed.compute(handle, [FACT]).apply(handle)
    assert reference_inputs(handle, cfg.layers[0], cfg) is first  # its own memory does not change its inputs
    name = handle.adapter.mlp_out.format(0) + ".weight"  # a weight edit below the memory's layer
    p = handle.model.get_parameter(name)
    delta = WeightDelta({name: torch.full_like(p, 0.05)}, {name: tensor_digest(p)}).apply(handle)
    second = reference_inputs(handle, cfg.layers[0], cfg)
    assert second is not first and not torch.equal(second, first)
    delta.revert(handle)
    memory.revert(handle)
    again = token_inputs(handle, handle.tokens.encode(REFERENCE)[:100], cfg.layers[0])
    assert torch.allclose(torch.nn.functional.normalize(again, dim=-1).half(), first)


def test_a_missing_or_short_reference_text_says_what_to_do(tokenizer, tmp_path):
    handle = make_handle("llama", tokenizer)
    with pytest.raises(ConfigError, match="calibrate_text") as err:
        kv(calibrate_text=str(tmp_path / "nowhere.txt")).compute(handle, [FACT])
    assert "calibrate_tokens=0" in str(err.value)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(ConfigError, match="lower calibrate_tokens"):
        kv(calibrate_text=str(short), calibrate_tokens=500).compute(handle, [FACT])
    with pytest.raises(ConfigError, match="calibrate_margin"):
        kv(calibrate_margin=1.5).config_for(handle)
    kv(calibrate_tokens=0, calibrate_text=str(tmp_path / "nowhere.txt")).compute(handle, [FACT])  # off: not read
