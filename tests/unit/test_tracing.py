"""Causal tracing on tiny random models: shapes, subject spans, exact recovery, batching, noise, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmedit.tracing import (
    AverageEffect,
    Tracer,
    average_indirect_effect,
    embedding_std,
    resolve_noise,
    subject_token_range,
    suggest_layers,
    trace_all,
    trace_fact,
    window_layers,
)
from lmedit.tracing.aggregate import CATEGORIES, category_rows

PROMPT = "The Eiffel Tower is located in Paris"
MID_PROMPT = "Where is he from? Danielle Darrieux was an actress"


def sharpen(handle, factor: float = 8.0):
    """Scale the (tied) embeddings so the random model makes confident predictions corruption can destroy."""
    with torch.no_grad():
        emb = handle.model.get_input_embeddings().weight
        emb.mul_(factor)
    return handle


def test_subject_range_start_and_middle(tiny_llama):
    h = tiny_llama
    ids = h.tokens.prompt_ids(PROMPT)
    b, e = subject_token_range(h, ids, "The Eiffel Tower")
    assert b == len(h.tokens.bos) and "".join(h.tokens.words(ids[b:e])).strip() == "The Eiffel Tower"
    ids = h.tokens.prompt_ids(MID_PROMPT)
    b, e = subject_token_range(h, ids, "Danielle Darrieux")
    assert b > 3 and "".join(h.tokens.words(ids[b:e])).strip() == "Danielle Darrieux"
    assert "".join(h.tokens.words(ids[:b])).strip() == "Where is he from?"
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_range(h, ids, "Barack Obama")


def test_window_layers_clipped():
    assert list(window_layers(0, 10, 30)) == [0, 1, 2, 3, 4]
    assert list(window_layers(10, 10, 30)) == list(range(5, 15))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(2, 1, 4)) == [2]


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_trace_shapes(tiny_decoder, kind):
    h = tiny_decoder
    res = trace_fact(h, PROMPT, "Eiffel Tower", kind=kind, samples=3, noise=0.5, window=2)
    n_tokens = len(h.tokens.prompt_ids(PROMPT))
    assert res.scores.shape == (n_tokens, h.n_layers)
    assert np.isfinite(res.scores).all() and ((res.scores >= 0) & (res.scores <= 1)).all()
    assert len(res.tokens) == n_tokens and res.kind == kind and res.window == (1 if kind == "hidden" else 2)
    assert res.correct_prediction and 0 < res.high_score <= 1


def test_restoring_embeddings_recovers_clean_exactly(tiny_decoder):
    h = sharpen(tiny_decoder)
    tr = Tracer(h, PROMPT, "Eiffel Tower", samples=4, noise=2.0)
    all_tokens = list(range(len(tr.ids)))
    full, subject_only, nothing = tr.restore([
        {h.adapter.embed: all_tokens},
        {h.adapter.embed: list(range(*tr.subject_range))},
        {},
    ])
    assert full == pytest.approx(tr.high_score, rel=1e-5, abs=1e-7)
    assert subject_only == pytest.approx(tr.high_score, rel=1e-5, abs=1e-7)
    assert nothing == pytest.approx(tr.low_score, abs=1e-7)


def test_corruption_lowers_probability(tiny_llama):
    h = sharpen(tiny_llama)
    # a random model predicts mostly from the last token, so put the subject there to see the corruption
    prompt, subject = "The capital of France", "France"
    res = trace_fact(h, prompt, subject, kind="hidden", samples=5, noise=3 * embedding_std(h, [subject]))
    assert res.subject_range[1] == len(res.tokens)
    assert res.low_score < 0.5 * res.high_score
    # the clean last-layer state at the last token carries the whole prediction
    assert res.scores[-1, -1] == pytest.approx(res.high_score, rel=1e-4)
    # tokens before the subject never see it: restoring them changes nothing
    b, _ = res.subject_range
    if b > 0:
        np.testing.assert_allclose(res.scores[:b], res.low_score, atol=1e-6)


def test_batched_equals_unbatched(tiny_decoder):
    h = sharpen(tiny_decoder)
    tr = Tracer(h, MID_PROMPT, "Danielle Darrieux", samples=3, noise=1.0)
    b, e = tr.subject_range
    rows = [b, e - 1, len(tr.ids) - 1]
    for kind in ("hidden", "mlp", "attn"):
        batched = tr.trace(kind, window=3, max_rows=10_000)
        one_by_one = tr.trace(kind, window=3, token_range=rows, max_rows=1)  # one set (S rows) per forward
        np.testing.assert_allclose(batched.scores[rows], one_by_one.scores[rows], rtol=1e-5, atol=1e-6)
        # and a few cells against a hand-written reference: corrupt, restore, read p(answer)
        for t, layer in [(b, 0), (e - 1, 1), (rows[-1], h.n_layers - 1)]:
            paths = tr.module_paths(kind, layer, 3)
            assert batched.scores[t, layer] == pytest.approx(_reference(tr, paths, t), rel=1e-5, abs=1e-7)


def _reference(tr, paths, t):
    """One unbatched forward with plain hooks, written independently of Tracer._forward."""
    h, ad, (b, e) = tr.handle, tr.handle.adapter, tr.subject_range
    ids = torch.tensor([tr.ids] * tr.samples)
    handles = []

    def corrupt(_m, _a, out):
        x = ad.hidden(out).clone()
        x[:, b:e] = x[:, b:e] + tr.eps
        return ad.with_hidden(out, x)

    def restore(path):
        def hook(_m, _a, out):
            x = ad.hidden(out).clone()
            x[:, t] = tr.clean[path][t]
            return ad.with_hidden(out, x)
        return hook

    handles.append(h.model.get_submodule(ad.embed).register_forward_hook(corrupt))
    handles += [h.model.get_submodule(p).register_forward_hook(restore(p)) for p in paths]
    try:
        with torch.no_grad():
            logits = h.model(input_ids=ids).logits
    finally:
        for hd in handles:
            hd.remove()
    return float(torch.softmax(logits[:, -1].float(), -1)[:, tr.answer_id].mean())


def test_noise_seed_and_answer(tiny_llama):
    h = tiny_llama
    a = Tracer(h, PROMPT, "Eiffel Tower", samples=2, noise=0.5)
    b = Tracer(h, PROMPT, "Eiffel Tower", samples=2, noise=0.5)
    assert torch.equal(a.eps, b.eps) and a.low_score == b.low_score
    forced = Tracer(h, PROMPT, "Eiffel Tower", samples=2, noise=0.5, answer="French")
    assert forced.answer_id == h.tokens.target_ids(PROMPT, "French")[0]
    assert forced.correct_prediction == (forced.answer_id == a.answer_id)
    slot = Tracer(h, "The {} is located in Paris", "Eiffel Tower", samples=2, noise=0.5)
    assert slot.ids == a.ids


def test_noise_levels(tiny_llama, tmp_path, monkeypatch):
    h = tiny_llama
    sigma = embedding_std(h, ["Eiffel Tower", "Paris"])
    ids = h.tokens.encode("Eiffel Tower") + h.tokens.encode("Paris")
    expected = h.model.get_input_embeddings().weight[ids].double().std()
    assert sigma == pytest.approx(float(expected))
    assert resolve_noise(h, 0.25) == 0.25 and resolve_noise(h, "0.5") == 0.5
    with pytest.raises(ValueError):
        resolve_noise(h, "loud")
    # the 3-sigma rule reads known facts, caches on the handle and on disk by fingerprint
    known = tmp_path / "misc" / "known_1000.json"
    known.parent.mkdir()
    known.write_text(json.dumps([{"known_id": 0, "subject": "Eiffel Tower", "attribute": "Paris",
                                  "prompt": "Eiffel Tower is in"},
                                 {"known_id": 1, "subject": "Paris", "attribute": "France", "prompt": "Paris is in"}]))
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("lmedit.tracing.noise.load_known_facts",
                        lambda path=None: json.loads(known.read_text()))
    assert resolve_noise(h, None) == pytest.approx(3 * sigma)
    assert resolve_noise(h, "s2") == pytest.approx(2 * sigma)
    assert list((tmp_path / "home" / "tracing").glob(f"*{h.fingerprint}*"))


def test_encoder_decoder_refused(tokenizer):
    from conftest import make_handle

    with pytest.raises(ValueError, match="decoder-only"):
        trace_fact(make_handle("t5", tokenizer), PROMPT, "Eiffel Tower", noise=0.1)


def test_category_rows():
    rows = category_rows(10, (2, 6))
    assert rows == [[2], [3, 4], [5], [6], [7, 8], [9]]
    assert category_rows(4, (0, 1)) == [[0], [], [0], [1], [2], [3]]
    assert category_rows(3, (1, 2)) == [[1], [], [1], [], [], [2]]


def test_average_and_suggest(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    h = sharpen(tiny_llama)
    prompts = [("The Eiffel Tower is located in", "The Eiffel Tower"),
               ("Danielle Darrieux was an", "Danielle Darrieux"), ("The capital of France is", "France")]
    facts = []
    for i, (p, s) in enumerate(prompts):
        ids = torch.tensor([h.tokens.prompt_ids(p)])
        top = h.tokenizer.decode([int(h.model(input_ids=ids).logits[0, -1].argmax())])
        facts.append({"known_id": i, "prompt": p, "subject": s, "attribute": top.strip() or top})
    facts.append({"known_id": 9, "prompt": "Tokyo is in", "subject": "Tokyo", "attribute": "zzzz"})  # wrong
    avg = average_indirect_effect(h, facts, "mlp", n=10, samples=2, noise=2.0, window=2)
    correct = [f for f in facts if f["attribute"] != "zzzz"]
    assert avg.effects.shape == (len(CATEGORIES), h.n_layers)
    assert avg.n_skipped >= 1 and avg.n_facts + avg.n_skipped == len(facts)
    assert avg.counts[2] == avg.n_facts == len(avg.fact_ids) <= len(correct)
    back = AverageEffect.load(avg.save(tmp_path / "avg"))
    np.testing.assert_allclose(back.effects, avg.effects)
    sug = suggest_layers(h, n_facts=10, kind="mlp", facts=facts, samples=2, noise=2.0, window=2)
    assert 0 <= sug.layer < h.n_layers
    assert sug.layer == int(np.nanargmax(sug.evidence.effects[2])) == sug.ranked()[0]
    span = sug.span(2)
    assert len(span) == 2 and span[1] == span[0] + 1
    row = sug.evidence.effects[2]
    assert row[span].sum() == pytest.approx(max(row[i:i + 2].sum() for i in range(len(row) - 1)))
    assert suggest_layers(h, n_facts=10, kind="mlp", facts=facts, samples=2, noise=2.0, window=2) is sug


def test_result_save_load(tiny_llama, tmp_path):
    from lmedit.tracing import TraceResult

    res = trace_fact(tiny_llama, PROMPT, "Eiffel Tower", kind="hidden", samples=2, noise=0.5,
                     token_range="subject_last")
    assert np.isnan(res.scores[0]).all() and np.isfinite(res.scores[res.subject_range[1] - 1]).all()
    npz, js = res.save(tmp_path / "r")
    back = TraceResult.load(npz)
    np.testing.assert_array_equal(back.scores, res.scores)
    assert back.subject_range == res.subject_range and back.tokens == res.tokens
    assert json.loads(js.read_text())["answer"] == res.answer


def test_plots_write_files(tiny_llama, tmp_path):
    pytest.importorskip("matplotlib")
    from lmedit.tracing.plot import plot_average, plot_trace, plot_trace_all

    results = trace_all(tiny_llama, MID_PROMPT, "Danielle Darrieux", samples=2, noise=0.5, window=2)
    files = plot_trace(results["mlp"], tmp_path / "one")
    files += plot_trace_all(results, tmp_path / "all")
    avg = AverageEffect(kind="mlp", window=2, samples=2, effects=np.random.rand(6, 4), scores=np.random.rand(6, 4),
                        counts=[1] * 6, n_facts=1, n_skipped=0, mean_high=0.5, mean_low=0.1, fact_ids=[0])
    files += plot_average(avg, tmp_path / "avg")
    assert [f.suffix for f in files] == [".png", ".svg"] * 3
    for f in files:
        assert f.exists() and f.stat().st_size > 1000




def test_cli_trace_writes_data_and_plots(tiny_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lmedit.cli import main

    out = tmp_path / "out"
    rc = main(["trace", "--model", str(tiny_dir), "--prompt", MID_PROMPT, "--subject", "Danielle Darrieux",
               "--kind", "all", "--samples", "2", "--noise", "0.5", "--window", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "answer:" in printed and "peak p" in printed
    for kind in ("hidden", "mlp", "attn"):
        assert len(list(out.glob(f"*_{kind}.*"))) == 4  # npz, json, png, svg
    assert list(out.glob("*_all.png"))
    assert main(["trace", "--model", str(tiny_dir), "--prompt", MID_PROMPT, "--out", str(out)]) == 1


def test_cli_trace_batch_known(tiny_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from lmedit.cli import main
    from lmedit.models.loading import load_model

    h = load_model(str(tiny_dir), device="cpu")
    facts = []
    for i, (p, s) in enumerate([("The Eiffel Tower is located in", "The Eiffel Tower"),
                                ("Danielle Darrieux was an", "Danielle Darrieux")]):
        top = int(h.model(input_ids=torch.tensor([h.tokens.prompt_ids(p)])).logits[0, -1].argmax())
        facts.append({"known_id": i, "prompt": p, "subject": s, "attribute": h.tokenizer.decode([top]).strip()})
    facts.append({"known_id": 2, "prompt": "Tokyo is in", "subject": "Tokyo", "attribute": "zzzz"})
    data = tmp_path / "data" / "misc"
    data.mkdir(parents=True)
    (data / "known_1000.json").write_text(json.dumps(facts))
    monkeypatch.setenv("LMEDIT_DATA", str(tmp_path / "data"))
    out = tmp_path / "avg"
    rc = main(["trace", "--model", str(tiny_dir), "--batch", "known", "--n", "5", "--kind", "mlp", "--samples", "2",
               "--noise", "0.5", "--window", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "skipped" in printed and "peak AIE" in printed
    avg = AverageEffect.load(out / "average_mlp.json")
    assert avg.n_skipped >= 1 and avg.n_facts + avg.n_skipped == 3
    assert (out / "average_mlp.png").exists()
