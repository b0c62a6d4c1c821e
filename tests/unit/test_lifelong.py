"""Lifelong editors: memory edits (kv-memory, GRACE) and peft LoRA adapters added and deleted in any order.

Every "exact" check compares logits with torch.equal against the model that never had the deleted edit.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_handle
from lmedit.edits import Edit, EditError, EditMismatchError
from lmedit.hooks import get_module
from lmedit.registry import editor_class, get_editor
from lmedit.types import EditRequest

REQS = [
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
    EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
    EditRequest(prompt="{} was born in", subject="Barack Obama", target_new="Tokyo"),
]
SAME_A_OTHER_TARGET = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                                  target_new="Spain")
PROBES = [r.text for r in REQS] + ["Michel Rocard is a native speaker of", "Tokyo is in Japan"]


def editor(name: str, **kw):
    return get_editor(name, **{**editor_class(name).quick, **kw})


@torch.no_grad()
def logits(handle) -> torch.Tensor:
    batch = handle.tokens.teacher_forced(PROBES, ["French"] * len(PROBES))
    return handle.logits(batch)


def weights(handle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in handle.model.state_dict().items()}


def logits_with(handle, edits) -> torch.Tensor:
    """Logits of the model with exactly ``edits`` applied (in that order), then restored."""
    for e in edits:
        e.apply(handle)
    try:
        return logits(handle)
    finally:
        for e in reversed(edits):
            e.revert(handle)


@pytest.fixture
def llama(tokenizer):
    return make_handle("llama", tokenizer)


@pytest.mark.parametrize("name", ["kv-memory", "grace", "lora"])
def test_delete_any_edit_in_any_order(name, llama):
    handle = llama
    path = handle.adapter.mlp_out.format(1)
    original = get_module(handle.model, path)
    snap, base = weights(handle), logits(handle)
    ed = editor(name)
    edits = []
    for r in REQS:  # computed sequentially: each on the model with the earlier ones applied
        edits.append(ed.compute(handle, [r]).apply(handle))
    assert all(getattr(type(e), "order_free", False) for e in edits)
    edits[0].revert(handle)  # the oldest, while the newer two stay applied
    after = logits(handle)
    edits[2].revert(handle)
    edits[1].revert(handle)
    assert torch.equal(logits(handle), base)
    assert torch.equal(after, logits_with(handle, edits[1:])), "deleting the oldest edit left a trace"
    # any other order: middle first, then newest, then oldest
    for e in edits:
        e.apply(handle)
    edits[1].revert(handle)
    assert torch.equal(logits(handle), logits_with_kept(handle, edits, keep=(0, 2)))
    edits[2].revert(handle)
    edits[0].revert(handle)
    assert torch.equal(logits(handle), base)
    now = handle.model.state_dict()
    assert set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)
    assert get_module(handle.model, path) is original, "the original module object is not back"
    with pytest.raises(EditError):
        edits[0].revert(handle)  # deleting twice


def logits_with_kept(handle, edits, keep) -> torch.Tensor:
    """Logits now, compared by the caller against a fresh model state holding only ``keep``."""
    now = logits(handle)
    applied = [e for i, e in enumerate(edits) if i in keep]
    for e in reversed(applied):
        e.revert(handle)
    fresh = logits_with(handle, applied)
    for e in applied:
        e.apply(handle)
    assert torch.equal(now, fresh)
    return now


@pytest.mark.parametrize("name", ["kv-memory", "grace"])
def test_colliding_key_newer_wins_older_returns(name, llama):
    handle = llama
    ed = editor(name)
    first = ed.compute(handle, [REQS[0]]).apply(handle)
    second = ed.compute(handle, [SAME_A_OTHER_TARGET]).apply(handle)  # same subject and prompt: same key
    both = logits(handle)
    first.revert(handle)
    assert torch.equal(both, logits(handle)), "while the newer edit is applied the older one must not act"
    first.apply(handle)  # now the older is the newest applied: it wins
    assert torch.equal(logits(handle), logits_with_only(handle, [second, first], first))
    second.revert(handle)
    first.revert(handle)


@pytest.mark.parametrize("rule,same_fact", [("gate", None), ("gate", 0.9), ("codebook", None)])
def test_memory_kept_up_to_date_equals_recomputing_it(rule, same_fact):
    """MemoryLayer.add updates what it computes in O(n) when it can; after any sequence of adds (near and
    equal keys, several labels, entries of two keys) and removals, what it computes equals a layer that
    recomputes everything from the applied entries (the same output; the same table up to rounding)."""
    from lmedit.methods._memory import Entries, MemoryLayer

    g = torch.Generator().manual_seed(0)
    layer, applied = MemoryLayer(torch.nn.Identity()), {}
    keys: list[torch.Tensor] = []
    x = torch.randn(64, 8, generator=g)
    for step in range(120):
        if applied and torch.rand(1, generator=g) < 0.25:
            token = list(applied)[int(torch.randint(len(applied), (1,), generator=g))]
            layer.remove(token)
            del applied[token]
        else:
            n = 2 if torch.rand(1, generator=g) < 0.1 else 1
            pick = torch.rand(1, generator=g)
            if keys and pick < 0.2:  # an earlier key again
                k = keys[int(torch.randint(len(keys), (1,), generator=g))].clone().expand(n, -1).clone()
            elif keys and pick < 0.4:  # near an earlier key
                k = keys[int(torch.randint(len(keys), (1,), generator=g))] + 0.05 * torch.randn(n, 8, generator=g)
            else:
                k = torch.randn(n, 8, generator=g)
            keys += list(k)
            e = Entries(rule, k, torch.randn(n, 8, generator=g), [1.5] * n,
                        [str(int(torch.randint(3, (1,), generator=g))) for _ in range(n)], same_fact)
            applied[layer.add(e)] = e
        fresh = MemoryLayer(torch.nn.Identity())
        fresh._owned = dict(applied)
        fresh._compile()
        assert torch.equal(layer(x), fresh(x)), f"step {step}"
        for r in fresh._tables:
            for a, b in zip(layer._tables[r], fresh._tables[r], strict=True):
                # radii from matmul distances: equal up to their rounding (~3e-4 of the keys' norms)
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), f"step {step}, {r}"


def test_kv_memory_same_fact_reworded_newer_wins(llama):
    """A reworded prompt about the same subject gives a near-equal key, not an equal one: only with
    same_fact does the newer correction shadow the older (and deleting it brings the older back)."""
    from lmedit.methods._memory import memory_at

    handle = llama
    reworded = EditRequest(prompt="What language did {} speak? The answer is", subject="Danielle Darrieux",
                           target_new="Spain")
    for same_fact, kept in ((None, 2), (0.05, 1)):
        ed = editor("kv-memory", same_fact=same_fact, threshold=0.0)
        first = ed.compute(handle, [REQS[0]]).apply(handle)
        second = ed.compute(handle, [reworded]).apply(handle)
        path = handle.adapter.mlp_out.format(ed.config_for(handle).layers[0])
        assert len(memory_at(handle, path).active()["gate"][0]) == kept
        second.revert(handle)
        assert len(memory_at(handle, path).active()["gate"][0]) == 1
        first.revert(handle)
        assert memory_at(handle, path) is None


def logits_with_only(handle, applied, keep) -> torch.Tensor:
    for e in reversed(applied):
        e.revert(handle)
    out = logits_with(handle, [keep])
    for e in applied:
        e.apply(handle)
    return out


def test_memory_editors_share_one_module(llama):
    handle = llama
    path = handle.adapter.mlp_out.format(1)
    original = get_module(handle.model, path)
    kv = editor("kv-memory").compute(handle, [REQS[0]]).apply(handle)
    memory = get_module(handle.model, path)
    codebook = editor("grace", layer=1).compute(handle, [REQS[1]]).apply(handle)
    assert get_module(handle.model, path) is memory and len(memory) == 2
    assert set(memory.active()) == {"gate", "codebook"}
    kv.revert(handle)  # the older edit leaves; the memory stays for the newer
    assert get_module(handle.model, path) is memory and set(memory.active()) == {"codebook"}
    codebook.revert(handle)
    assert get_module(handle.model, path) is original


def test_weight_edit_and_memory_edit_at_one_layer_revert_in_any_order(llama):
    from lmedit.digests import tensor_digest
    from lmedit.edits import WeightDelta

    handle = llama
    name = handle.adapter.mlp_out.format(1) + ".weight"
    snap, base = weights(handle), logits(handle)
    memory = editor("kv-memory").compute(handle, [REQS[0]]).apply(handle)
    p = handle.model.get_parameter(name)  # the wrapped projection's weight, under its usual name
    delta = WeightDelta({name: torch.full_like(p, 0.01)}, {name: tensor_digest(p)}).apply(handle)
    memory.revert(handle)  # the older memory edit leaves first; the weight edit stays on the same module
    assert not torch.equal(logits(handle), base)
    delta.revert(handle)
    assert torch.equal(logits(handle), base)
    assert all(torch.equal(v, snap[k]) for k, v in handle.model.state_dict().items())


def test_codebook_split_radii_follow_the_applied_set(llama):
    from lmedit.methods._memory import Entries, MemoryLayer

    memory = MemoryLayer(torch.nn.Identity())
    key = torch.zeros(1, 4)
    a = memory.add(Entries("codebook", key, torch.ones(1, 4), [3.0], ["x"]))
    b = memory.add(Entries("codebook", key + torch.tensor([[2.0, 0, 0, 0]]), torch.ones(1, 4), [3.0], ["y"]))
    c = memory.add(Entries("codebook", key + torch.tensor([[0, 8.0, 0, 0]]), torch.ones(1, 4), [3.0], ["x"]))
    assert memory.active()["codebook"][2].tolist() == [1.0, 1.0, 3.0]  # x/y split at d/2; same label: no split
    memory.remove(b)
    assert memory.active()["codebook"][2].tolist() == [3.0, 3.0]  # as if b had never been added
    memory.remove(a)
    memory.remove(c)
    assert not memory.active()
    out = memory(torch.tensor([[0.5, 0, 0, 0]]))
    assert torch.equal(out, torch.tensor([[0.5, 0, 0, 0]]))


def test_gate_fires_only_on_a_matching_key():
    from lmedit.methods._memory import Entries, MemoryLayer

    memory = MemoryLayer(torch.nn.Identity())
    memory.add(Entries("gate", torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 10.0]]), [0.9], ["t"]))
    x = torch.tensor([[2.0, 0.1], [0.0, 1.0], [1.0, 1.0]])  # cos 0.999, 0, 0.707
    assert torch.equal(memory(x), torch.tensor([[2.0, 10.1], [0.0, 1.0], [1.0, 1.0]]))


def test_a_gate_key_of_the_same_fact_shadows_the_older_until_it_is_deleted(tmp_path):
    """same_fact: a newer key this similar to an older one is the same fact corrected again; the newer
    residual answers, and deleting it brings the older back. Keys below the bound both stay."""
    from lmedit.methods._memory import Entries, MemoryLayer

    memory = MemoryLayer(torch.nn.Identity())
    old = memory.add(Entries("gate", torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 10.0]]), [0.9], ["a"]))
    near = torch.tensor([[1.0, 0.2]])  # cos 0.981 with the older key
    x = torch.tensor([[1.0, 0.0]])
    new = memory.add(Entries("gate", near, torch.tensor([[0.0, -5.0]]), [0.9], ["b"], same_fact=0.99))
    assert torch.equal(memory(x), torch.tensor([[1.0, 10.0]])), "below same_fact: the most similar key wins"
    memory.remove(new)
    new = memory.add(Entries("gate", near, torch.tensor([[0.0, -5.0]]), [0.9], ["b"], same_fact=0.95))
    assert torch.equal(memory(x), torch.tensor([[1.0, -5.0]])), "the later correction of the fact stands"
    memory.remove(new)
    assert torch.equal(memory(x), torch.tensor([[1.0, 10.0]])) and len(memory) == 1 and old is not None
    with pytest.raises(EditError, match="same_fact"):
        Entries("gate", near, torch.ones(1, 2), [0.9], ["b"], same_fact=1.5)
    from lmedit.methods._memory import MemoryEdit

    saved = MemoryEdit({"m": Entries("gate", near, torch.ones(1, 2), [0.9], ["b"], same_fact=0.95)},
                       meta={"model_fingerprint": "toy"})
    path = saved.save(tmp_path / "e")
    assert Edit.load(path).entries["m"].same_fact == 0.95


@pytest.mark.parametrize("name", ["kv-memory", "grace", "lora"])
def test_saved_edit_is_tensors_and_json_and_refuses_another_model(name, llama, tokenizer, tmp_path):
    handle = llama
    edit = editor(name).compute(handle, [REQS[0]])
    want = logits_with(handle, [edit])
    edit.save(tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["edit.json", "tensors.safetensors"]
    body = json.loads((tmp_path / "e" / "edit.json").read_text())["body"]
    assert "class" not in json.dumps(body), "a saved lifelong edit names no class to import"
    loaded = Edit.load(tmp_path / "e")
    assert torch.equal(logits_with(handle, [loaded]), want)
    other = make_handle("llama", tokenizer)
    with torch.no_grad():
        next(other.model.parameters()).add_(0.5)
    other.fingerprint = "another-model"
    snap = weights(other)
    with pytest.raises(EditMismatchError):
        loaded.apply(other)
    assert all(torch.equal(v, snap[k]) for k, v in other.model.state_dict().items())


def test_lora_is_saved_in_peft_format(llama, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    edit = editor("lora").compute(llama, [REQS[0]])
    edit.save(tmp_path / "e")
    tensors = load_file(tmp_path / "e" / "tensors.safetensors")
    assert tensors and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    cfg = json.loads((tmp_path / "e" / "edit.json").read_text())["body"]["peft_config"]
    assert LoraConfig(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}).r == 4


def test_memory_entries_of_another_width_are_refused(llama):
    from lmedit.methods._memory import Entries, MemoryEdit

    path = llama.adapter.mlp_out.format(1)
    bad = MemoryEdit({path: Entries("gate", torch.ones(1, 7), torch.ones(1, 32), [0.9], ["x"])})
    snap = weights(llama)
    with pytest.raises(EditMismatchError, match="width"):
        bad.apply(llama)
    assert type(get_module(llama.model, path)).__name__ != "MemoryLayer"
    assert all(torch.equal(v, snap[k]) for k, v in llama.model.state_dict().items())
    with pytest.raises(EditError, match="inconsistent"):
        Entries("gate", torch.ones(2, 7), torch.ones(1, 32), [0.9], ["x"])
    with pytest.raises(EditError, match="rule"):
        Entries("nearest", torch.ones(1, 7), torch.ones(1, 32), [0.9], ["x"])


@pytest.mark.slow
def test_kv_memory_on_smollm2_deletes_an_older_fact():
    from lmedit.metrics.scoring import score_targets
    from lmedit.models.loading import load_model

    handle = load_model("smollm2-135m")
    ed = get_editor("kv-memory", context_lengths=[], v_num_grad_steps=25)
    facts = [EditRequest(prompt="What university did {} attend?", subject="Watts Humphrey",
                         target_new="University of Michigan"),
             EditRequest(prompt="Which family does {} belong to?", subject="Ramalinaceae", target_new="Lamiinae")]

    def acc(r):
        return score_targets(handle, [r.text], [r.target_new])[0].accuracy

    before = [acc(r) for r in facts]
    base = logits(handle)
    edits = [ed.compute(handle, [r]).apply(handle) for r in facts]
    assert all(acc(r) == 1.0 for r in facts)
    edits[0].revert(handle)  # the older fact leaves, the newer stays
    assert acc(facts[0]) == before[0] and acc(facts[1]) == 1.0
    edits[1].revert(handle)
    assert torch.equal(logits(handle), base)


def test_lora_dropout_is_seeded_and_only_the_adapters(llama):
    ed = editor("lora", dropout=0.1)
    first, again = ed.compute(llama, [REQS[0]]), ed.compute(llama, [REQS[0]])
    assert all(torch.equal(first.weights[k], again.weights[k]) for k in first.weights)
    assert not any(m.training for m in llama.model.modules()), "compute left modules in training mode"
    assert first.meta["stats"]["loss_last"] < first.meta["stats"]["loss_first"]


def test_lora_merged_is_the_same_update_as_a_weight_edit(llama):
    """merge=True: the same training gives a low-rank WeightDelta whose model matches the peft adapter's (to
    float rounding), touches no module, and stacks and reverts newest first bit-exactly."""
    from lmedit.edits import WeightDelta

    adapter = editor("lora").compute(llama, [REQS[0]])
    merged = editor("lora", merge=True).compute(llama, [REQS[0]])
    assert isinstance(merged, WeightDelta) and merged.meta["peft_config"]["r"] == 4
    assert len(merged.deltas) == len({k.split(".lora_")[0] for k in adapter.weights})
    assert torch.allclose(logits_with(llama, [merged]), logits_with(llama, [adapter]), atol=1e-4)
    base, snap = logits(llama), weights(llama)
    modules = [type(m) for m in llama.model.modules()]
    stack = []
    for r in REQS:
        stack.append(editor("lora", merge=True).compute(llama, [r]).apply(llama))
    assert [type(m) for m in llama.model.modules()] == modules, "a merged edit adds no module"
    for e in reversed(stack):
        e.revert(llama)
    assert torch.equal(logits(llama), base)
    assert all(torch.equal(v, snap[k]) for k, v in llama.model.state_dict().items())
