"""The generation protocol: answer normalisation and scores by hand, stop rules on a scripted model, batched
generation against one-by-one and against transformers' greedy search, and its scores in evaluation."""

from __future__ import annotations

import logging

import pytest
import torch

from lmedit.kv import body_and_head
from lmedit.metrics.answers import (
    EmptyGoldError,
    agree,
    contains,
    exact_match,
    extract_answer,
    normalize,
    token_f1,
)
from lmedit.metrics.evaluate import baseline, evaluate, score_cases
from lmedit.metrics.gen_protocol import GEN, generate_records, scores_from_records
from lmedit.metrics.generate import (
    GenerationError,
    GenSettings,
    answer_ended,
    frame,
    generate_texts,
)
from lmedit.metrics.records import TOKEN_ACC
from lmedit.types import QA, EditCase, EditRequest

PROMPTS = ["The capital of France is", "What university did Watts Humphrey attend?", "Tokyo is in",
           "nq question: who played desmond doss father in hacksaw ridge", "Apple makes the",
           "The mother tongue of Danielle Darrieux is", "Michel Rocard is a native speaker of"]


# --- answers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,norm", [
    ("The  U.S.A.!", "usa"), ("  An apple, a day ", "apple day"), ("Paris\n", "paris"), ("THEATRE", "theatre"),
    ("Hugo Weaving.", "hugo weaving"), ("“Curly” quotes — dash", "curly quotes dash"), ("", ""), ("the", ""),
])
def test_normalize_by_hand(text, norm):
    assert normalize(text) == norm


def test_scores_by_hand():
    assert exact_match("The University of Michigan.", "University of Michigan") == 1.0
    assert exact_match("University of Michigan, USA", "University of Michigan") == 0.0
    # answer tokens: university of michigan usa (4); gold: university of michigan (3); common 3
    # precision 3/4, recall 1 -> F1 = 2 * (3/4) / (3/4 + 1) = 6/7
    assert token_f1("University of Michigan, USA", "University of Michigan") == pytest.approx(6 / 7)
    # answer: a michigan university (articles go: michigan university); gold: university of michigan
    # common 2 -> precision 2/2, recall 2/3 -> F1 = 2 * 1 * (2/3) / (5/3) = 0.8
    assert token_f1("A Michigan university", "University of Michigan") == pytest.approx(0.8)
    # answer: paris paris (2), gold: paris (1): common 1 -> P 1/2, R 1 -> F1 2/3
    assert token_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert token_f1("", "Paris") == 0.0 and token_f1("Rome", "Paris") == 0.0
    assert contains("He went to the University of Michigan in 1950", "University of Michigan") == 1.0
    assert contains("Parisian", "Paris") == 0.0, "whole words only"
    assert contains("", "Paris") == 0.0
    for fn in (exact_match, token_f1, contains):
        with pytest.raises(EmptyGoldError, match="empty after normalisation"):
            fn("anything", "The")
    assert agree("", "") == (1.0, 1.0) and agree("Paris.", "paris") == (1.0, 1.0)
    assert agree("Paris, France", "Paris") == (0.0, pytest.approx(2 / 3))


def test_extract_answer():
    assert extract_answer("\n\nA: Paris.\nQ: next") == "Paris."
    assert extract_answer(" Answer: French language") == "French language"
    assert extract_answer("  \n") == "" and extract_answer("") == ""
    assert answer_ended("\n \nParis\n") and not answer_ended("\n\n  Paris") and not answer_ended("\n\n")


# --- a scripted model: the head's output is replaced, step by step -------------------------------------

class Script:
    """Forces the head to pick ``ids[step]`` at each generation step (every row alike)."""

    def __init__(self, handle, ids: list[int]) -> None:
        self.ids, self.step = ids, 0
        _, head = body_and_head(handle.model)
        self.hook = head.register_forward_hook(self._force)

    def _force(self, module, inputs, out):
        tok = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        forced = torch.full_like(out, -1e4)
        forced[..., tok] = 1e4
        return forced

    def remove(self):
        self.hook.remove()


def _ids(handle, text):
    return handle.tokens.encode(text)


def test_stop_rules_on_a_scripted_model(tiny_llama):
    h = tiny_llama
    nl, eos = _ids(h, "\n"), h.tokens.eos_id
    paris = _ids(h, " Paris")
    # leading newlines do not stop; the first line break after the answer does
    s = Script(h, nl + nl + paris + nl + paris)
    (g,) = generate_texts(h, ["The capital of France is"])
    s.remove()
    assert (g.text, g.stop, g.tokens) == ("\n\n Paris\n", "newline", 2 + len(paris) + 1)
    assert extract_answer(g.text) == "Paris"
    # EOS at once: an empty answer, not an error
    s = Script(h, [eos])
    (g,) = generate_texts(h, ["The capital of France is"])
    s.remove()
    assert (g.text, g.stop, g.tokens) == ("", "eos", 0)
    # never stopping: the cap
    s = Script(h, paris[:1])
    (g,) = generate_texts(h, ["The capital of France is"], max_new_tokens=7)
    s.remove()
    assert (g.stop, g.tokens) == ("cap", 7)


def test_the_cap_never_depends_on_the_gold(tiny_llama):
    h = tiny_llama
    short = EditRequest(prompt="The capital of {} is", subject="France", target_new="Paris", case_id=0)
    long = EditRequest(prompt="The capital of {} is", subject="Italy",
                       target_new="the University of Michigan and Trinity College in Tokyo Japan", case_id=1)
    assert len(h.tokens.target_ids(short.text, short.target_new)) == 1
    assert len(h.tokens.target_ids(long.text, long.target_new)) >= 10
    s = Script(h, _ids(h, " Paris")[:1])  # never stops by itself
    recs = generate_records(h, [EditCase(short), EditCase(long)], GenSettings())
    s.remove()
    assert [r[0]["tokens"] for r in recs] == [32, 32] and {r[0]["stop"] for r in recs} == {"cap"}


# --- batching ----------------------------------------------------------------------------------------

def test_batched_equals_one_by_one_and_transformers_greedy(tiny_decoder):
    h = tiny_decoder
    texts = [frame(h, p, "question") for p in PROMPTS]
    batched = generate_texts(h, texts, max_new_tokens=12, batch_size=4)
    single = [generate_texts(h, [t], max_new_tokens=12)[0] for t in texts]
    assert [g.text for g in batched] == [g.text for g in single]
    for t, g in zip(texts, batched, strict=True):
        hf = h.generate(t, max_new_tokens=12)  # transformers' own greedy search, one unpadded row
        assert hf.startswith(g.text), (hf, g.text)


def test_in_context_edits_apply_to_generation_and_share_their_prefix(tiny_llama, monkeypatch):
    import lmedit.metrics.generate as gen_module

    made = []

    class Counted(gen_module.SharedPrefix):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(len(self.ids))

    monkeypatch.setattr(gen_module, "SharedPrefix", Counted)
    h = tiny_llama
    demo = "New Fact: The capital of France is Rome.\nPrompt: The capital of France is Rome.\n\n" * 3
    h.contexts.append(demo)
    try:
        framed = [frame(h, p, "question") for p in PROMPTS]
        assert all(f.startswith(demo) for f in framed)
        with_ctx = generate_texts(h, framed, max_new_tokens=8, batch_size=3)
    finally:
        h.contexts.clear()
    assert len(made) == 1 and made[0] >= len(h.tokens.prompt_ids(demo)) - 2, "the context runs once"
    hf = [h.generate(f, max_new_tokens=8) for f in framed]  # the whole framed text, no cache shared
    assert all(a.startswith(g.text) for a, g in zip(hf, with_ctx, strict=True))


def test_encoder_decoder_generation_runs(tokenizer):
    from conftest import make_handle

    h = make_handle("t5", tokenizer)
    gens = generate_texts(h, PROMPTS[:3], max_new_tokens=5)
    assert all(g.tokens <= 5 and g.stop in ("eos", "newline", "cap") for g in gens)


# --- contexts ----------------------------------------------------------------------------------------

def test_contexts(tiny_llama):
    h = tiny_llama
    assert frame(h, "Tokyo is in", "question") == "Tokyo is in"
    assert "Question: Tokyo is in\nAnswer:" in frame(h, "Tokyo is in", "qa")
    with pytest.raises(GenerationError, match="no chat template; use --context question or qa"):
        frame(h, "Tokyo is in", "chat")
    with pytest.raises(GenerationError, match="unknown generation context"):
        GenSettings(context="story")
    with pytest.raises(GenerationError, match="positive integer"):
        GenSettings(max_new_tokens=0)
    tok = h.tokenizer
    old = getattr(tok, "chat_template", None)
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    try:
        assert frame(h, "Tokyo is in", "chat") == "<|user|>Tokyo is in\n<|assistant|>"
    finally:
        tok.chat_template = old


# --- scores in evaluation --------------------------------------------------------------------------------

def _greedy_word(h, prompts):
    """A prompt whose first greedy token is ' <letters>': (prompt, that word)."""
    for p in prompts:
        (g,) = generate_texts(h, [p], max_new_tokens=1)
        if g.text.startswith(" ") and g.text.strip().isalpha():
            return p, g.text.strip()
    pytest.skip("no prompt of this tiny model starts its answer with a word")


def test_a_known_greedy_answer_gets_the_same_verdict_under_both_protocols(tiny_llama):
    h = tiny_llama
    prompt, word = _greedy_word(h, PROMPTS + [f"{p} and" for p in PROMPTS])
    req = EditRequest(prompt=prompt, subject=prompt.split()[0], target_new=word, case_id=0)
    wrong = EditRequest(prompt=prompt, subject=prompt.split()[0], target_new="Zzyzx", case_id=1)
    cases = [EditCase(req), EditCase(wrong)]
    settings = GenSettings(max_new_tokens=1)
    (right, bad) = evaluate(h, cases, protocols=(TOKEN_ACC, GEN), generation=settings)
    assert right.post["reliability"].value == 1.0 and right.post["reliability@gen_em"].value == 1.0
    assert bad.post["reliability"].value < 1.0 and bad.post["reliability@gen_em"].value == 0.0
    assert right.texts["post"][0]["text"].strip() == word


def test_locality_compares_with_the_unedited_answer_and_the_truth(tiny_llama):
    h = tiny_llama
    req = EditRequest(prompt="The capital of {} is", subject="France", target_new="Paris", case_id=0)
    case = EditCase(req, paraphrases=("Where is the capital of France?",),
                    locality=(QA("Tokyo is in", "Japan"),))
    base = baseline(h, [case], protocols=(GEN,))
    assert set(base.pre[0]) == {f"{m}@{t}" for m in ("reliability", "generalization", "locality_truth")
                                for t in ("gen_em", "gen_f1", "gen_contains")}
    post = score_cases(h, [case], base, protocols=(GEN,))[0]
    assert post["locality@gen_em"].value == 1.0 and post["locality@gen_f1"].value == 1.0, "unedited: unchanged"
    assert all(s.protocol == k.split("@")[1] for k, s in post.items())
    # by hand: the unedited model said X; an edited one that says X plus more is not the same answer
    before = [{"metric": "locality", "prompt": "q", "gold": "Japan", "text": "\nJapan\n"}]
    after = [{"metric": "locality", "prompt": "q", "gold": "Japan", "text": " Japan, Asia"}]
    s = scores_from_records(after, before)
    assert s["locality@gen_em"].value == 0.0 and s["locality@gen_f1"].value == pytest.approx(2 / 3)
    assert s["locality_truth@gen_em"].value == 0.0 and s["locality_truth@gen_contains"].value == 1.0


def test_empty_gold_is_not_scored_and_not_zero(caplog):
    recs = [{"metric": "portability_one_hop", "prompt": "q?", "gold": "the", "text": "Paris"},
            {"metric": "reliability", "prompt": "p", "gold": "Paris", "text": "Paris"}]
    with caplog.at_level(logging.WARNING):
        s = scores_from_records(recs)
    assert "portability_one_hop@gen_em" not in s and s["reliability@gen_em"].value == 1.0
    assert "empty after normalisation" in caplog.text


def test_score_cases_needs_a_generation_baseline(tiny_llama):
    h = tiny_llama
    case = EditCase(EditRequest(prompt="Tokyo is in", subject="Tokyo", target_new="Japan"))
    base = baseline(h, [case], protocols=(TOKEN_ACC,))
    with pytest.raises(ValueError, match="no generated answers"):
        score_cases(h, [case], base, protocols=(TOKEN_ACC, GEN))
