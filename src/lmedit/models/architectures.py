"""Per-family module paths, as data: the registered table, the exact path for the classes it names.

Models of other classes get an adapter discovered from their module structure (``discover.py``). This module
imports only the adapter type; ``lookup.py`` reads :data:`TABLE` (the dependency runs one way).

Keys are Hugging Face architecture class names (``type(model).__name__``), never checkpoint names.
Templates take the layer index in ``{}``. ``weight_layout`` says how a projection stores its weight:
``"out_in"`` for ``nn.Linear`` (PyTorch's [out, in]) and ``"in_out"`` for GPT-2's ``Conv1D``.
"""

from __future__ import annotations

from .adapter import ModelAdapter

GPT2 = ModelAdapter(
    family="gpt2",
    embed="transformer.wte",
    layers="transformer.h.{}",
    attn="transformer.h.{}.attn",
    attn_out="transformer.h.{}.attn.c_proj",
    mlp="transformer.h.{}.mlp",
    mlp_in=("transformer.h.{}.mlp.c_fc",),
    mlp_out="transformer.h.{}.mlp.c_proj",
    ln_final="transformer.ln_f",
    lm_head="lm_head",
    weight_layout="in_out",
)

GPTJ = ModelAdapter(
    family="gptj",
    embed="transformer.wte",
    layers="transformer.h.{}",
    attn="transformer.h.{}.attn",
    attn_out="transformer.h.{}.attn.out_proj",
    mlp="transformer.h.{}.mlp",
    mlp_in=("transformer.h.{}.mlp.fc_in",),
    mlp_out="transformer.h.{}.mlp.fc_out",
    ln_final="transformer.ln_f",
    lm_head="lm_head",
)

GPT_NEOX = ModelAdapter(
    family="gpt_neox",
    embed="gpt_neox.embed_in",
    layers="gpt_neox.layers.{}",
    attn="gpt_neox.layers.{}.attention",
    attn_out="gpt_neox.layers.{}.attention.dense",
    mlp="gpt_neox.layers.{}.mlp",
    mlp_in=("gpt_neox.layers.{}.mlp.dense_h_to_4h",),
    mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
    ln_final="gpt_neox.final_layer_norm",
    lm_head="lm_head",  # "embed_out" before transformers 5; adapter.unembedding falls back to get_output_embeddings()
)

# Llama, Mistral, Qwen2/3, Gemma, SmolLM2: SwiGLU MLP, down_proj(act(gate_proj(x)) * up_proj(x)).
LLAMA = ModelAdapter(
    family="llama",
    embed="model.embed_tokens",
    layers="model.layers.{}",
    attn="model.layers.{}.self_attn",
    attn_out="model.layers.{}.self_attn.o_proj",
    mlp="model.layers.{}.mlp",
    mlp_in=("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"),
    mlp_out="model.layers.{}.mlp.down_proj",
    ln_final="model.norm",
    lm_head="lm_head",
)

# T5: the answer is produced by the decoder, so "layers" are decoder blocks; the encoder is named apart.
T5 = ModelAdapter(
    family="t5",
    embed="shared",
    layers="decoder.block.{}",
    attn="decoder.block.{}.layer.0",
    attn_out="decoder.block.{}.layer.0.SelfAttention.o",
    mlp="decoder.block.{}.layer.2.DenseReluDense",
    mlp_in=("decoder.block.{}.layer.2.DenseReluDense.wi",),
    mlp_out="decoder.block.{}.layer.2.DenseReluDense.wo",
    ln_final="decoder.final_layer_norm",
    lm_head="lm_head",
    encoder_decoder=True,
    encoder_layers="encoder.block.{}",
    encoder_mlp_out="encoder.block.{}.layer.1.DenseReluDense.wo",
)
# T5 v1.1 / Flan-T5 use a gated FFN (wi_0, wi_1); the output projection is the same "wo".
T5_GATED = T5.replace(
    family="t5",
    mlp_in=("decoder.block.{}.layer.2.DenseReluDense.wi_0", "decoder.block.{}.layer.2.DenseReluDense.wi_1"),
)

# architecture class -> (adapter, variants); a variant named "gated" is used when its first input projection
# exists in the model (T5 v1.1)
TABLE: dict[str, tuple[ModelAdapter, dict[str, ModelAdapter]]] = {
    "GPT2LMHeadModel": (GPT2, {}),
    "GPTJForCausalLM": (GPTJ, {}),
    "GPTNeoXForCausalLM": (GPT_NEOX, {}),
    **{name: (LLAMA, {}) for name in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
    )},
    "T5ForConditionalGeneration": (T5, {"gated": T5_GATED}),
}

# Preset names by architecture shape (model_type, layers, hidden size); used to pick tuned hyperparameters.
PRESET_SHAPES: dict[tuple[str, int, int], str] = {
    ("llama", 30, 576): "smollm2-135m",
    ("gpt2", 48, 1600): "gpt2-xl",
    ("gpt2", 12, 768): "gpt2",
    ("gptj", 28, 4096): "gpt-j-6b",
    ("llama", 32, 4096): "llama-7b",
}
