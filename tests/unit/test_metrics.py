"""Scorers and evaluation against values computed by hand with plain ``model(input_ids)`` calls."""

from __future__ import annotations

import math
import mmap
import time

import pytest
import torch
import torch.nn.functional as F

from lmedit.digests import tensor_digest
from lmedit.edits import WeightDelta
from lmedit.metrics.efficiency import _rss_reader, current_rss, measure
from lmedit.metrics.evaluate import baseline, evaluate, score_cases
from lmedit.metrics.records import PROB_COMPARE, TOKEN_ACC
from lmedit.metrics.scoring import TargetScore, score_targets
from lmedit.types import QA, EditCase, EditRequest

PROMPT = "The mother tongue of Danielle Darrieux is"


@torch.no_grad()
def hand(handle, prompt: str, answer: str) -> tuple[list[int], list[int], list[float]]:
    """(predictions, answer ids, log-probs) of ``answer`` after ``prompt``, from one unpadded forward pass.

    The answer is joined with one space and its ids are the joint encoding past the prompt's ids.
    """
    tok = handle.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    assert full[: len(p)] == p
    a = full[len(p):]
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    bos = [tok.bos_token_id] if with_special[0] == tok.bos_token_id else []
    logits = handle.model(torch.tensor([bos + full])).logits[0].float()  # [seq, vocab]
    logp = F.log_softmax(logits, -1)
    pos = [len(bos) + len(p) - 1 + j for j in range(len(a))]
    return [int(logits[q].argmax()) for q in pos], a, [float(logp[q, y]) for q, y in zip(pos, a, strict=True)]


def _acc(pred, labels):
    return sum(x == y for x, y in zip(pred, labels, strict=True)) / len(labels)


def _prob(lp):
    return math.exp(sum(lp) / len(lp))


def _perturb(handle, scale=1.5, layer=1):
    """A WeightDelta of random noise on one MLP output projection (so predictions change)."""
    name = handle.adapter.mlp_out.format(layer) + ".weight"
    p = handle.model.get_parameter(name)
    g = torch.Generator().manual_seed(1)
    return WeightDelta({name: torch.randn(p.shape, generator=g) * scale}, {name: tensor_digest(p)})


PAIRS = [(PROMPT, "English"), ("The capital of France is", "Paris"),
         ("What university did Watts Humphrey attend?", "University of Michigan"),
         ("Tokyo is in", "Japan"), ("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving")]


def test_score_targets_matches_hand_computation(tiny_decoder):
    # all pairs in one padded batch, and again with batch size 2: the same numbers as unpadded forwards
    for bs in (32, 2):
        scores = score_targets(tiny_decoder, [p for p, _ in PAIRS], [a for _, a in PAIRS], batch_size=bs)
        for (prompt, answer), s in zip(PAIRS, scores, strict=True):
            pred, labels, lp = hand(tiny_decoder, prompt, answer)
            assert list(s.labels) == labels and list(s.pred) == pred
            assert s.logprobs == pytest.approx(lp, abs=1e-4)
            assert s.accuracy == _acc(pred, labels)
            assert s.prob == pytest.approx(_prob(lp), rel=1e-4)


def test_target_ids_use_the_spaced_form(tiny_llama):
    tok = tiny_llama.tokenizer
    bare = tok("French", add_special_tokens=False)["input_ids"]
    spaced = tok(" French", add_special_tokens=False)["input_ids"]
    assert bare != spaced, "the tiny tokenizer must tokenize 'French' and ' French' differently for this test"
    assert tiny_llama.tokens.target_ids(PROMPT, "French") == spaced
    (s,) = score_targets(tiny_llama, [PROMPT], ["French"])
    assert list(s.labels) == spaced


def test_target_score_properties():
    s = TargetScore(pred=(1, 2, 3), labels=(1, 5, 3), logprobs=(-1.0, -2.0, -3.0))
    assert s.accuracy == pytest.approx(2 / 3)
    assert s.nll == pytest.approx(2.0) and s.prob == pytest.approx(math.exp(-2.0))
    other = TargetScore(pred=(1, 2, 4), labels=(1, 5, 3), logprobs=(0.0, 0.0, 0.0))
    assert s.agreement(other) == pytest.approx(2 / 3)  # agreement of predictions, not correctness
    with pytest.raises(ValueError, match="same answer"):
        s.agreement(TargetScore((1,), (1,), (0.0,)))


def _case():
    req = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                      target_true="French", case_id=0)
    return EditCase(req, paraphrases=("Where Danielle Darrieux is from, people speak the language of",
                                      "Danielle Darrieux was an actress who spoke"),
                    locality=(QA("The capital of France is", "Paris"), QA("Tokyo is in", "Japan"),
                              QA("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving")),
                    portability={"one_hop": (QA("Danielle Darrieux's language is", "English"),)},
                    neighborhood=("Michel Rocard is a native speaker of", "Barack Obama was born in"))


def _expected_token_acc(handle, case):
    r = case.request
    gen = [_acc(*hand(handle, p, r.target_new)[:2]) for p in case.paraphrases]
    port = [_acc(*hand(handle, q.prompt, q.answer)[:2]) for q in case.portability["one_hop"]]
    return {"reliability": _acc(*hand(handle, r.text, r.target_new)[:2]), "generalization": sum(gen) / len(gen),
            "portability_one_hop": sum(port) / len(port)}


def _expected_prob(handle, case):
    """ROME's ES/PS/NS and magnitudes (methods-spec A.4) from hand-computed per-token probabilities."""
    r = case.request
    out = {}
    for name, prompts, sign in (("efficacy", [r.text], 1), ("paraphrase", case.paraphrases, 1),
                                ("neighborhood", case.neighborhood, -1)):
        new = [_prob(hand(handle, p, r.target_new)[2]) for p in prompts]
        true = [_prob(hand(handle, p, r.target_true)[2]) for p in prompts]
        out[f"{name}_score"] = sum(sign * (n - t) > 0 for n, t in zip(new, true, strict=True)) / len(prompts)
        out[f"{name}_magnitude"] = sum(sign * (n - t) for n, t in zip(new, true, strict=True)) / len(prompts)
    return out


def test_pre_scores_match_hand_values(tiny_llama):
    case = _case()
    (pre,) = baseline(tiny_llama, [case]).pre
    for name, value in _expected_token_acc(tiny_llama, case).items():
        assert pre[name].value == pytest.approx(value) and pre[name].protocol == TOKEN_ACC
    for name, value in _expected_prob(tiny_llama, case).items():
        assert pre[name].value == pytest.approx(value, abs=1e-5) and pre[name].protocol == PROB_COMPARE
    assert pre["paraphrase_score"].n == 2 and pre["neighborhood_score"].n == 2
    # without target_true there is nothing to compare: no prob_compare scores
    bare = EditCase(EditRequest(prompt=case.request.prompt, subject="Danielle Darrieux", target_new="English"))
    (pre_bare,) = baseline(tiny_llama, [bare]).pre
    assert "efficacy_score" not in pre_bare and "reliability" in pre_bare


def test_locality_is_agreement_with_pre_edit_predictions(tiny_llama):
    case = _case()
    base = baseline(tiny_llama, [case])
    before = [hand(tiny_llama, q.prompt, q.answer) for q in case.locality]
    edit = _perturb(tiny_llama)
    with edit.applied(tiny_llama):
        after = [hand(tiny_llama, q.prompt, q.answer) for q in case.locality]
        (post,) = score_cases(tiny_llama, [case], base)
        expected_prob = _expected_prob(tiny_llama, case)
        expected_acc = _expected_token_acc(tiny_llama, case)
    per_prompt = [_acc(a[0], b[0]) for a, b in zip(after, before, strict=True)]
    expected = sum(per_prompt) / len(per_prompt)
    assert 0 < expected < 1, "the perturbation must change some, not all, predictions for this test to bite"
    assert post["locality"].value == pytest.approx(expected) and post["locality"].n == 3
    correctness = sum(_acc(a[0], a[1]) for a in after) / len(after)
    assert correctness != pytest.approx(expected)  # locality is not accuracy against the stored answers
    for name, value in {**expected_prob, **expected_acc}.items():
        assert post[name].value == pytest.approx(value, abs=1e-5), name


def test_evaluate_applies_scores_and_reverts(tiny_llama):
    case = _case()
    digest = tiny_llama.state_digest()
    edit = _perturb(tiny_llama)
    (res,) = evaluate(tiny_llama, [case], edit)
    assert tiny_llama.state_digest() == digest
    base = baseline(tiny_llama, [case])
    with edit.applied(tiny_llama):
        (post,) = score_cases(tiny_llama, [case], base)
    assert res.post == post and res.pre == base.pre[0]
    assert res.case_id == 0


def test_scoring_an_in_context_edit_computes_each_shared_prefix_once(tiny_llama, monkeypatch):
    """Every teacher-forced batch and generation batch of one scoring reads the same context: inside
    reusing_prefixes its key/value cache is computed once per distinct prefix, and the scores and generated
    texts equal those of a scoring that recomputes it for every batch."""
    import contextlib

    import lmedit.kv as kv
    import lmedit.metrics.evaluate as evaluate_module
    from lmedit.edits import PromptContext
    from lmedit.metrics.gen_protocol import GEN

    protocols = (TOKEN_ACC, PROB_COMPARE, GEN)
    case = _case()
    base = baseline(tiny_llama, [case], protocols=protocols)
    ctx = "New Fact: The capital of France is Lyon\nPrompt: The capital of France is Lyon\n\n" * 4 + "New Fact: "
    edit = PromptContext(ctx, meta={"model_fingerprint": tiny_llama.fingerprint})
    computed: list[int] = []
    new_cache = kv.new_cache
    monkeypatch.setattr(kv, "new_cache", lambda model: computed.append(1) or new_cache(model))

    def scored() -> tuple[list, list, int]:
        computed.clear()
        with edit.applied(tiny_llama):
            post, texts = evaluate_module.score_cases_with_texts(tiny_llama, [case], base, protocols=protocols,
                                                                 batch_size=2)
        return post, texts, len(computed)

    shared, shared_texts, once = scored()
    monkeypatch.setattr(evaluate_module, "reusing_prefixes", lambda model: contextlib.nullcontext())
    alone, alone_texts, every = scored()
    assert 1 <= once < every, (once, every)
    assert shared_texts == alone_texts
    assert shared[0].keys() == alone[0].keys()
    for name, score in shared[0].items():
        assert score.value == pytest.approx(alone[0][name].value, abs=1e-6), name
    assert kv._MEMO not in tiny_llama.model.__dict__, "the caches are dropped when the scoring ends"


def test_measure_time_and_memory():
    read = _rss_reader()
    if read is None:
        pytest.skip("no way to read RSS on this platform")
    rss0 = read()
    with measure() as m:
        time.sleep(0.03)
        # fresh anonymous pages from the kernel (malloc may hand back memory that is already resident)
        block = mmap.mmap(-1, 64 * 2**20)
        page_run = b"\x01" * 2**20  # touch every page so it is resident, 1 MiB at a time: a 64 MiB temporary
        for _ in range(64):          # bytes object could come from malloc's heap and stay resident after it
            block.write(page_run)    # is freed, which is what this test's last RSS check would then see
        time.sleep(0.02)
        block.close()  # unmapped before the block ends: only the sampled peak can see it
    assert m.seconds >= 0.05
    assert m.peak_rss_bytes - rss0 >= 60 * 2**20
    assert abs(m.rss_start_bytes - rss0) < 16 * 2**20 and m.peak_rss_bytes - m.rss_start_bytes >= 60 * 2**20
    assert m.rss_delta_bytes < 32 * 2**20
    assert m.rss_samples >= 3
    if not torch.cuda.is_available():
        assert m.cuda_peak_bytes is None
    with measure() as quiet:
        pass
    assert quiet.seconds < m.seconds
    assert abs(current_rss() - read()) < 16 * 2**20


def test_in_context_scoring_runs_the_shared_context_once_with_the_same_scores(tiny, monkeypatch):
    """Under an in-context edit every row starts with the same context: it is served from one key/value cache
    (decoder-only models), and the scores equal those of full forwards. T5 reads the whole prompt."""
    import lmedit.kv as kv
    import lmedit.metrics.scoring as scoring

    ctx = "New Fact: The capital of France is Lyon\nPrompt: The capital of France is Lyon\n\n" * 3 + "Prompt: "
    prompts = [PROMPT, "The capital of France is", "Paris is the capital of", "x"]
    answers = ["English", "Lyon", "France and more", "y z"]
    tiny.contexts.append(ctx)
    served: list[int] = []
    hidden = kv.SharedPrefix.hidden
    monkeypatch.setattr(kv.SharedPrefix, "hidden",
                        lambda self, ids, mask, k: served.append(k) or hidden(self, ids, mask, k))
    fast = score_targets(tiny, prompts, answers, batch_size=3)
    monkeypatch.setattr(scoring, "MIN_SHARED_TOKENS", 10**9)  # every row runs its whole context
    full = score_targets(tiny, prompts, answers, batch_size=3)
    tiny.contexts.clear()
    if tiny.is_encoder_decoder:
        assert not served
    else:
        assert served and min(served) >= 16, "the context ran once; each batch ran only its rows' own tokens"
    for a, b in zip(fast, full, strict=True):
        assert a.labels == b.labels and a.pred == b.pred
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
