"""Adapter discovery from the module structure (lmedit.models.discover) on tiny models of real families."""

from __future__ import annotations

import logging

import pytest
import torch

from lmedit.models.adapter import ModelAdapter, UnsupportedArchitectureError
from lmedit.models.architectures import TABLE
from lmedit.models.discover import DiscoveryError, discover, validate
from lmedit.models.handle import ModelHandle
from lmedit.models.lookup import adapter_for, registered_adapter
from lmedit.models.tiny import causal_lm_classes, tiny_config, tiny_model

DECODER_TABLE = sorted(n for n, (a, _) in TABLE.items() if not a.encoder_decoder)


@pytest.mark.parametrize("name", DECODER_TABLE)
def test_discovery_finds_the_registered_parts(name):
    """Each registered decoder-only class: the discovered adapter has exactly the table's parts."""
    model = tiny_model(name)
    found = discover(model)
    assert found.discovered and not registered_adapter(model).discovered
    assert found.parts() == registered_adapter(model).parts()


def test_t5_keeps_its_table_adapter_and_other_encoder_decoders_are_refused():
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8,
                                                   vocab_size=64, decoder_start_token_id=0))
    assert adapter_for(t5).encoder_decoder and not adapter_for(t5).discovered
    bart = tf.BartForConditionalGeneration(tf.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                                         encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="(?s)encoder-decoder.*T5.*register_adapter"):
        adapter_for(bart)


def test_unregistered_families_are_discovered_with_their_layout():
    """Conv1D read in [in, out] (a class outside the table that uses it), Linear in [out, in]; BERT-style
    blocks keep the FFN linears in sibling modules, OPT in the block itself on flattened tokens."""
    gpt_bigcode = adapter_for(tiny_model("GPTBigCodeForCausalLM"))
    assert gpt_bigcode.discovered and gpt_bigcode.weight_layout in ("in_out", "out_in")
    phi3 = adapter_for(tiny_model("Phi3ForCausalLM"))  # fused gate_up projection: one input, 2·d_ff wide
    assert phi3.mlp_out.endswith("mlp.down_proj") and len(phi3.mlp_in) == 1 and phi3.weight_layout == "out_in"
    roberta = adapter_for(tiny_model("RobertaForCausalLM"))
    assert roberta.mlp_out.endswith("output.dense") and roberta.mlp_in[0].endswith("intermediate.dense")
    assert roberta.mlp == roberta.mlp_out  # no single module holds the FFN
    opt = adapter_for(tiny_model("OPTForCausalLM"))
    assert opt.mlp_out.endswith("fc2") and opt.mlp_in[0].endswith("fc1")


def test_gpt2_conv1d_orientation_is_read_and_checked():
    model = tiny_model("GPT2LMHeadModel")
    found = discover(model)
    assert found.weight_layout == "in_out"
    with pytest.raises(DiscoveryError, match="does not compute W x"):
        validate(model, found.replace(weight_layout="out_in"))


def test_mixture_of_experts_edits_a_shared_expert_or_the_attention_output():
    shared = adapter_for(tiny_model("Qwen2MoeForCausalLM"))  # routed experts + a shared one, flattened tokens
    assert shared.mlp_out.endswith("mlp.shared_expert.down_proj") and shared.mlp.endswith("mlp")
    assert shared.edit_site == "ffn" and not shared.edit_site_reason
    routed = adapter_for(tiny_model("MixtralForCausalLM"))  # routed experts only: no dense FFN in any block
    assert routed.edit_site == "attn_out" and "mixture of routed experts" in routed.edit_site_reason
    assert routed.mlp_out == routed.attn_out == routed.mlp == "model.layers.{}.self_attn.o_proj"
    assert routed.mlp_in == () and routed.ffn_layers is None


def test_a_model_without_a_feed_forward_block_is_edited_at_its_mixer_output():
    mamba = adapter_for(tiny_model("MambaForCausalLM"))  # state-space mixer only
    assert (mamba.edit_site, mamba.mlp_out) == ("attn_out", "backbone.layers.{}.mixer.out_proj")
    assert "no position-wise feed-forward" in mamba.edit_site_reason


def test_a_model_whose_ffn_sees_other_positions_names_what_is_missing():
    """CPM-Ant prepends prompt positions inside the model: the subject's token has no fixed place in the FFN."""
    with pytest.raises(DiscoveryError, match="(?s)cannot edit CpmAntForCausalLM: its FFN sees .* positions for 16 "
                                             "input tokens.*register_adapter"):
        adapter_for(tiny_model("CpmAntForCausalLM"))


def test_editors_that_need_ffn_neurons_refuse_a_model_without_one(tokenizer):
    from lmedit.config import ConfigError
    from lmedit.methods._ffn import UnsupportedFFNError, ffn_info
    from lmedit.training.functional import edited_paths

    handle = ModelHandle(tiny_model("MixtralForCausalLM"), tokenizer)
    with pytest.raises(UnsupportedFFNError, match="(?s)no dense FFN.*routed experts.*attention output projection"):
        ffn_info(handle, 0)
    with pytest.raises(ConfigError, match="no FFN input projection.*matrices='out'"):
        edited_paths(handle, [0], "both")
    assert edited_paths(handle, [0], "out") == ["model.layers.0.self_attn.o_proj"]


@pytest.mark.parametrize("name", ["rome", "memit", "ft-m"])
def test_attention_output_site_edits_and_reverts(name, tokenizer, tmp_path):
    """A routed-only mixture of experts, edited at o_proj: the target rises and the revert is bit-exact."""
    from lmedit.survey import edit_and_revert, tiny_corpus

    handle = ModelHandle(tiny_model("MixtralForCausalLM"), tokenizer, name="tiny-mixtral")
    quick = {"v_num_grad_steps": 20, "v_weight_decay": 0.0, "mom2_tokens": 2000, "context_lengths": [],
             "mom2_corpus": str(tiny_corpus(tmp_path))}
    overrides = {"ft-m": {"steps": 6, "lr": 2e-2}}.get(name, quick)
    assert edit_and_revert(handle, name, overrides, 0) > 0


def test_hyper_connection_blocks_and_a_hidden_head_are_found(tokenizer, tmp_path):
    """DeepSeek-V4 carries four residual streams per token ([batch, seq, 4, d] between blocks): ROME edits it,
    MEMIT (which spreads a residual target over layers) refuses it. CLVP's decoder returns None from
    get_output_embeddings, so its head is the linear map whose output is the logits."""
    from lmedit.registry import get_editor
    from lmedit.survey import _request, edit_and_revert, tiny_corpus

    if "DeepseekV4ForCausalLM" in causal_lm_classes():
        handle = ModelHandle(tiny_model("DeepseekV4ForCausalLM"), tokenizer, name="tiny-dsv4")
        dsv4 = handle.adapter
        assert dsv4.layers == "model.layers.{}" and dsv4.mlp_out.endswith("mlp.shared_experts.down_proj")
        assert dsv4.residual_streams == 4
        quick = {"v_num_grad_steps": 20, "v_weight_decay": 0.0, "mom2_tokens": 2000, "context_lengths": [],
                 "mom2_corpus": str(tiny_corpus(tmp_path))}
        assert edit_and_revert(handle, "rome", quick, 0) > 0
        with pytest.raises(UnsupportedArchitectureError, match="4 residual streams.*ROME or FT"):
            get_editor("memit", layers=[0, 1], **quick).compute(handle, [_request()])
    clvp = tiny_model("ClvpForCausalLM")
    assert clvp.get_output_embeddings() is None and adapter_for(clvp).lm_head == "lm_head"


def test_tiny_models_have_no_all_zero_weight_matrix():
    """xLSTM initialises its FFN's gate projection to zero: every key behind it would be zero."""
    model = tiny_model("xLSTMForCausalLM")
    assert all(p.any() for p in model.parameters() if p.dim() >= 2)


def test_validation_catches_a_part_that_does_not_feed_the_logits():
    model = tiny_model("Phi3ForCausalLM")
    found = discover(model)
    # the first block's input norm runs, returns [b, s, d], but a constant shift of its output is undone by
    # nothing downstream only if it feeds the logits; a module that never runs is named as missing
    with pytest.raises(DiscoveryError, match="did not run"):
        validate(model, found.replace(ln_final="model.rotary_emb.nowhere"))


def test_hybrid_model_edits_only_layers_with_an_ffn(tokenizer):
    """A hybrid model whose layers differ: the adapter says which layers have the FFN, layer checks refuse the
    others with the list, and the depth default moves to the nearest FFN layer."""
    names = [n for n in ("JambaForCausalLM", "LongcatFlashForCausalLM", "FalconH1ForCausalLM")
             if n in causal_lm_classes()]
    model = None
    for name in names:
        try:
            found = adapter_for(tiny_model(name))
        except (DiscoveryError, RuntimeError, ValueError):
            continue
        if found.ffn_layers is not None:
            model = name
            break
    if model is None:
        pytest.skip("no hybrid family with FFN-less layers builds in this transformers")
    handle = ModelHandle(tiny_model(model), tokenizer)
    missing = next(i for i in range(handle.n_layers) if i not in handle.adapter.ffn_layers)
    with pytest.raises(ValueError, match="no feed-forward block"):
        handle.adapter.check_layers(handle.model, [missing])
    assert handle.adapter.nearest_ffn_layer(missing) in handle.adapter.ffn_layers


def test_discovered_adapter_is_logged_once_per_handle_and_has_no_preset(tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="lmedit.models.discover"):
        handle = ModelHandle(tiny_model("Olmo2ForCausalLM"), tokenizer)
        assert handle.preset is None  # layers then come from depth, hyperparameters from width
    assert sum("discovered the parts of Olmo2ForCausalLM" in r.message for r in caplog.records) == 1


def test_discovery_leaves_the_model_as_it_was():
    model = tiny_model("Olmo2ForCausalLM").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    discover(model)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_tiny_configs_are_tiny():
    cfg = tiny_config("LlamaForCausalLM")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 400)
    assert isinstance(adapter_for(tiny_model("LlamaForCausalLM")), ModelAdapter)
    mamba2 = tiny_config("Mamba2ForCausalLM")  # state-space heads tile the expanded width
    assert mamba2.num_heads * mamba2.head_dim == mamba2.expand * mamba2.hidden_size
    falcon_h1 = tiny_config("FalconH1ForCausalLM")
    assert falcon_h1.mamba_n_heads * falcon_h1.mamba_d_head == falcon_h1.mamba_d_ssm == 2 * falcon_h1.hidden_size
    ministral = tiny_config("MinistralForCausalLM")  # None in the default config, required by the model class
    assert (ministral.head_dim, ministral.num_key_value_heads) == (16, 2)


@pytest.mark.parametrize("name", ["OPTForCausalLM", "DeepseekV3ForCausalLM", "MixtralForCausalLM"])
def test_layers_auto_traces_a_discovered_model(name, tokenizer, tmp_path, monkeypatch):
    """``--layers auto`` (causal tracing over known facts) on an FFN that reads flattened tokens (OPT) and on a
    model whose last layer holds experts instead of the dense FFN (DeepSeek-V3): the chosen layer has one; and on
    routed experts only (Mixtral), traced at the attention output that is its edit site."""
    from lmedit.locate.pipeline import auto_layers

    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    handle = ModelHandle(tiny_model(name, layers=4), tokenizer)
    from lmedit.models.tiny import CORPUS

    # facts the random model "knows": its own top answers after prefixes of the corpus sentences (tracing keeps
    # those whose answer token round-trips through the tokenizer)
    prompts = [" ".join(sent.split()[:k]) for sent in CORPUS for k in (3, 4, 5, 6)]
    with torch.no_grad():
        top = handle.logits(handle.tokens.prompts(prompts, side="left"))[:, -1].argmax(-1)
    facts = [{"known_id": i, "prompt": p, "subject": " ".join(p.split()[:2]),
              "attribute": handle.tokenizer.decode([int(t)])}
             for i, (p, t) in enumerate(zip(prompts, top, strict=True))]
    monkeypatch.setattr("lmedit.tracing.aggregate.load_known_facts", lambda path=None: facts)
    monkeypatch.setattr("lmedit.tracing.noise.load_known_facts", lambda path=None: facts)
    (layer,) = auto_layers(handle, 1, "rome")
    handle.adapter.check_layers(handle.model, [layer])
    assert handle.adapter.ffn_layers is None or layer in handle.adapter.ffn_layers
