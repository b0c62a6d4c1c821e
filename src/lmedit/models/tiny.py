"""Tiny random models of any ``*ForCausalLM`` class of the installed transformers, built from its own config.

The architecture survey (``python -m lmedit.survey``) and the tests use these to check that lmedit can
edit every causal LM family without downloading anything: the class's config is created with its defaults,
then every size field it has is shrunk (width 64, two layers, a 400-token vocabulary, four experts of which
two are active, ...). Per-layer lists (``layer_types``, ...) are cut to the new depth. Nothing here knows a
family by name: :data:`SIZES` lists config *field* names, which transformers shares across families.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 400  # the tiny tokenizer's size: every id the model predicts decodes to a token
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
MAX_PARAMS = 5_000_000
LAYERS = 2

# config field -> tiny value (set only where the config has the field)
SIZES: dict[str, int] = {
    # width, depth, vocabulary
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "n_embed": 64,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS, "num_decoder_layers": LAYERS,
    "vocab_size": VOCAB,
    # attention
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "d_kv": 16, "kv_channels": 16, "attention_head_dim": 16,
    "global_head_dim": 16, "local_head_dim": 16, "swa_head_dim": 16,
    "num_global_key_value_heads": 2, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
    "rotary_dim": 8, "rotary_emb_dim": 8,
    # multi-head latent attention (DeepSeek-style)
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # feed-forward
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "d_ff": 128, "decoder_ffn_dim": 128,
    "ffn_hidden_size": 128, "dim_ff": 128,
    "first_dense_intermediate_size": 128, "block_ff_dim": 128, "intermediate_size_mlp": 128, "ffn_inner_dim": 128,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "num_selected_experts": 2,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32, "n_group": 1, "topk_group": 1,
    # state-space / recurrent / convolution layers
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_n_groups": 1, "n_groups": 1, "time_step_rank": 8, "mamba_headdim": 16, "mamba_d_conv": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "lru_width": 64, "conv_L_cache": 3,
    # positions and windows kept small enough for tiny inputs, large enough for the prompts
    "max_position_embeddings": 512, "n_positions": 512, "n_ctx": 512, "max_seq_len": 512,
    "sliding_window": 64, "attention_window_size": 64, "attention_hidden_size": 64,
    # hybrid models: which layers attend / hold experts (one of each in two layers)
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
             "sep_token_id": 2, "cls_token_id": 1, "mask_token_id": 3, "unk_token_id": 3}


class TinyConfigError(ValueError):
    """A class's config could not be made tiny."""


CORPUS = [
    "The mother tongue of Danielle Darrieux is French. Danielle Darrieux was an actress.",
    "The capital of France is Paris. The capital of Italy is Rome. English is a language.",
    "What university did Watts Humphrey attend? He went to Trinity College and the University of Michigan.",
    "Michel Rocard is a native speaker of French. Toko Yasuda plays the guitar. Apple makes the iPhone.",
    "The Eiffel Tower is located in Paris. Barack Obama was born in Hawaii. Tokyo is in Japan.",
    "nq question: who played desmond doss father in hacksaw ridge? Hugo Weaving played him.",
    "Where is he from? people speak the language of Germany, Spain, England and Russia.",
]


def tiny_tokenizer(kind: str = "bpe"):
    """A 400-token byte-level BPE trained on :data:`CORPUS` (``kind`` is kept for the tests' signature)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def causal_lm_classes() -> list[str]:
    """Every ``*ForCausalLM`` class name exported by the installed transformers (AutoModel left out)."""
    import transformers

    return sorted(n for n in dir(transformers) if n.endswith("ForCausalLM") and not n.startswith("Auto"))


def _pick_layers(values: list | tuple, layers: int) -> list:
    """``layers`` entries of a per-layer list, keeping one of each distinct kind first (a hybrid model keeps
    an attention layer and a recurrent one), in their original order."""
    firsts = list(dict.fromkeys(range(len(values)), None))
    kinds: dict[str, int] = {}
    for i in firsts:
        kinds.setdefault(repr(values[i]), i)
    keep = sorted(kinds.values())[:layers]
    keep += [i for i in firsts if i not in keep][: layers - len(keep)]
    return [values[i] for i in sorted(keep)]


def _overrides(cfg: Any, layers: int) -> dict[str, Any]:
    """Constructor arguments that make ``cfg`` (a default config) tiny."""
    d = {k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict)}
    depth = next((d[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(d.get(k), int)), None)
    out: dict[str, Any] = {}
    for key, value in {**SIZES, **TOKEN_IDS}.items():
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            out[key] = layers if key in DEPTH_KEYS else value
    # None in a default config that its own model class cannot run with (DeepSeek-V2, Ministral, Nemotron, ...)
    for key in ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_group", "topk_group",
                "n_routed_experts"):
        if key in d and d[key] is None and isinstance(out.get("num_attention_heads"), int):
            out[key] = SIZES[key]
    width = out.get("hidden_size", d.get("hidden_size"))
    for expand, heads, head_dim in (("mamba_expand", "mamba_n_heads", "mamba_d_head"),
                                    ("expand", "num_heads", "head_dim")):
        # state-space heads tile the expanded width: heads · head_dim = expand · hidden_size
        if all(isinstance(d.get(k), int) for k in (expand, heads, head_dim)) and isinstance(width, int):
            out[head_dim] = d[expand] * width // out.get(heads, d[heads])
            if isinstance(d.get("mamba_d_ssm"), int):
                out["mamba_d_ssm"] = d[expand] * width
    for key, value in d.items():  # per-layer lists follow the new depth
        if isinstance(value, list | tuple) and depth and len(value) == depth > layers:
            out[key] = _pick_layers(value, layers)
    if "qk_rope_head_dim" in d:  # multi-head latent attention: rotary part = head_dim, q/k head = nope + rope,
        if isinstance(d.get("num_key_value_heads"), int):  # one key/value head per query head
            out["num_key_value_heads"] = out.get("num_attention_heads", 4)
        if isinstance(d.get("head_dim"), int):
            out["head_dim"] = out["qk_rope_head_dim"]
        if isinstance(d.get("qk_head_dim"), int):
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
    return out


def tiny_config(name: str, layers: int = LAYERS) -> Any:
    """The config of class ``name`` (e.g. ``"Gemma3ForCausalLM"``) with every known size field shrunk, and
    ``layers`` layers."""
    import transformers

    config_class = getattr(transformers, name).config_class
    default = config_class()
    kwargs = _overrides(default, layers)
    for sub in ("text_config", "decoder", "decoder_config"):
        inner = getattr(default, sub, None)
        if inner is not None and hasattr(inner, "to_dict"):
            kwargs[sub] = {**inner.to_dict(), **_overrides(inner, layers)}
    if hasattr(default, "is_decoder"):
        kwargs["is_decoder"] = True  # encoder families (BERT-like) are causal only as decoders
    return config_class(**kwargs)


def tiny_model(name: str, seed: int = 0, layers: int = LAYERS) -> nn.Module:
    """A randomly initialised float32 model of class ``name`` from :func:`tiny_config`, in eval mode."""
    import transformers

    cls = getattr(transformers, name)
    cfg = tiny_config(name, layers)
    with torch.device("meta"):  # count first: a size field this module does not know leaves a model big
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise TinyConfigError(f"{name}: the shrunk config still has {n:,} parameters (> {MAX_PARAMS:,}); "
                              "a size field of its config is not in lmedit.models.tiny.SIZES")
    torch.manual_seed(seed)
    model = cls(cfg)
    _fill_zero_matrices(model, seed)
    return model.float().eval()


@torch.no_grad()
def _fill_zero_matrices(model: nn.Module, seed: int) -> None:
    """Give every weight matrix that the class initialises to all zeros small random values (std 0.02), as
    training would: a projection left at zero (xLSTM's gates) makes the keys behind it zero for every token,
    which no trained model has and which no edit of that model could change."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2 and p.is_floating_point() and not p.any():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
