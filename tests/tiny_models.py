"""Tiny, randomly initialised HuggingFace checkpoints for tests.

Everything here is built locally: no file is ever downloaded from the hub.

Public API
----------
FAMILIES            family name -> builder ``fn(variant="gqa", seed=0) -> model``
FAMILY_VARIANTS     list of (family, variant) pairs worth testing (the families before issue 10)
NEW_FAMILIES, NEW_FAMILY_VARIANTS   the families added for issue 10 and their pairs
ALL_FAMILY_VARIANTS both lists; variants_of(family) the variants a family can express
VARIANTS            ("mha", "mqa", "gqa")
SAVE_FORMATS        ("hf_dir", "hf_sharded", "safetensors", "pt", "bin")
build_model(family, variant="gqa", seed=0, *, perturb_norms=False)
build_tiny(config_cls, model_cls, seed=0, *, extra_ok=(), **config)   a family outside FAMILIES, same guard
build_tokenizer(template="none")            (template: "none" | "bos" | "bert")
tokenizer_for(family)                       build_tokenizer with the family's usual template
save_checkpoint(model, tokenizer, out_dir, fmt) -> Path
make_hub_cache(model, tokenizer, cache_dir, repo_id, revision_sha="0"*40) -> Path
attention_keys(family, layer)               state-dict key names of one layer's attention
expected_attention_shapes(family, variant)  the shapes those keys must have
kv_heads(family, variant), head_dim(family)

Sizes: 4 attention heads and head_dim 16 everywhere.  Where HF honours an
explicit ``config.head_dim`` (qwen3, llama, mistral, gemma2, gemma3,
qwen3_moe, mixtral) hidden_size is 48, so heads*head_dim (64) != hidden_size
and o_proj is not square.  Everywhere else hidden_size is 64 so that
hidden/heads is 16 as well.

Family quirks found in transformers 5.x (see also the comments below):
* olmoe: the projections honour ``config.head_dim`` but ``q_norm`` is built
  with ``hidden_size`` and ``k_norm`` with ``hidden/heads*kv``, so a head_dim
  different from hidden/heads crashes; olmoe uses hidden/heads.
* gpt_neox: attention uses hidden/heads (``head_size``) and ignores
  ``head_dim``, while the rotary embedding reads ``head_dim`` -> never set it.
* gpt2: no GQA; ``c_attn`` is a Conv1D, weight shape [in, out] = [H, 3H],
  columns [q | k | v].
* gpt_neox: ``query_key_value`` is [3H, H] interleaved per head:
  rows = heads x [q(hd) k(hd) v(hd)].
* phi3: ``qkv_proj`` is [(nq + 2 nkv) * hd, H], rows = [q all heads | k | v].
* gemma2/gemma3 RMSNorm computes x * (1 + w) with w initialised to zeros;
  the embedding is multiplied by sqrt(hidden_size); ``post_attention_layernorm``
  normalises the *attention output* (sandwich norm) and
  ``pre_feedforward_layernorm`` is the pre-MLP norm (in llama-style models
  ``post_attention_layernorm`` is the pre-MLP norm).
* bert is post-LN: there is no pre-attention norm; the LayerNorm after the
  attention block is ``attention.output.LayerNorm``.
* MoE experts (qwen3_moe, mixtral, olmoe) are stored fused as 3-D parameters
  ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj``
  [E, H, I] (no ``.weight`` suffix).  ``save_pretrained`` converts them back
  to the legacy per-expert layout on disk (qwen3_moe/olmoe:
  ``mlp.experts.{e}.{gate,up,down}_proj.weight``; mixtral:
  ``block_sparse_moe.experts.{e}.w{1,2,3}.weight`` and
  ``block_sparse_moe.gate.weight``), so hf_dir / hf_sharded key names differ
  from ``model.state_dict()`` for MoE; the bare formats keep the in-memory
  keys.  ``save_pretrained`` also drops tied ``lm_head.weight``.
* Unknown / misspelled config kwargs are silently stored as attributes, so
  every kwarg is checked against the config class fields and every module
  shape is checked after construction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "FAMILIES",
    "FAMILY_VARIANTS",
    "VARIANTS",
    "SAVE_FORMATS",
    "MHA_ONLY",
    "NEW_FAMILIES",
    "ALL_FAMILY_VARIANTS",
    "NEW_FAMILY_VARIANTS",
    "variants_of",
    "build_model",
    "build_tiny",
    "build_tokenizer",
    "tokenizer_for",
    "save_checkpoint",
    "make_hub_cache",
    "attention_keys",
    "expected_attention_shapes",
    "kv_heads",
    "head_dim",
    "hidden_size",
    "MAX_PARAMS",
    "PROMPT",
]

PROMPT = "The true meaning of life is absurdity and suffering"

VARIANTS = ("mha", "mqa", "gqa")
SAVE_FORMATS = ("hf_dir", "hf_sharded", "safetensors", "pt", "bin")
MAX_PARAMS = 1_000_000

N_HEADS = 4
HEAD_DIM = 16
N_LAYERS = 2
VOCAB = 512  # >= tokenizer vocab (<= 400)
MAX_POS = 128

# Special tokens (ids are fixed by their order in the tokenizer trainer).
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_VOCAB = 400

# Families whose HF config honours an explicit head_dim != hidden/heads.
EXPLICIT_HEAD_DIM = {"qwen3", "llama", "mistral", "gemma2", "gemma3", "qwen3_moe", "mixtral", "glm4", "llama4", "t5"}
# Families that cannot express GQA/MQA in HF.
MHA_ONLY = {"gpt2", "gpt_neox", "bert", "gptj", "bloom", "gpt_neo", "opt", "distilbert", "t5", "falcon_rw"}
# Families whose variants are another subset of VARIANTS (default: all three, or "mha" for MHA_ONLY).
VARIANTS_OF = {
    "falcon_mq": ("mqa",),  # Falcon-7B's old decoder: multi_query is one kv head or none
    "gpt_bigcode": ("mha", "mqa"),  # StarCoder: multi_query or plain MHA
    "stablelm_parallel": ("gqa",),
}
MOE = {"qwen3_moe", "mixtral", "olmoe"}
N_EXPERTS = 4
TOP_K = 2


def hidden_size(family: str) -> int:
    return 48 if family in EXPLICIT_HEAD_DIM else N_HEADS * HEAD_DIM


def head_dim(family: str) -> int:
    return HEAD_DIM


def kv_heads(family: str, variant: str) -> int:
    _check_variant(family, variant)
    return {"mha": N_HEADS, "mqa": 1, "gqa": 2}[variant]


def variants_of(family: str) -> tuple[str, ...]:
    """The variants ``family`` can express in HuggingFace."""
    return VARIANTS_OF.get(family, ("mha",) if family in MHA_ONLY else VARIANTS)


def _check_variant(family: str, variant: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant not in variants_of(family):
        raise ValueError(f"family {family!r} cannot express {variant!r} in HuggingFace; only {variants_of(family)}")


# --------------------------------------------------------------------------
# state-dict key names and expected shapes
# --------------------------------------------------------------------------

_LLAMA_LIKE_KEYS = {
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "norm": "model.layers.{i}.input_layernorm.weight",
}


def attention_keys(family: str, layer: int = 0) -> dict[str, str]:
    """State-dict key names of the attention weights of one layer.

    Roles: q/k/v/o for separate projections, ``qkv`` for a fused projection,
    ``norm`` for the norm feeding attention (for post-LN bert: the LayerNorm
    right after the attention block), ``q_norm``/``k_norm`` where present and
    ``q_bias``/``k_bias``/``v_bias``/``qkv_bias``/``o_bias`` where present.
    """
    if family in ("qwen3", "qwen3_moe", "gemma3"):
        keys = dict(_LLAMA_LIKE_KEYS)
        keys["q_norm"] = "model.layers.{i}.self_attn.q_norm.weight"
        keys["k_norm"] = "model.layers.{i}.self_attn.k_norm.weight"
    elif family == "olmoe":
        keys = dict(_LLAMA_LIKE_KEYS)
        keys["q_norm"] = "model.layers.{i}.self_attn.q_norm.weight"
        keys["k_norm"] = "model.layers.{i}.self_attn.k_norm.weight"
    elif family == "qwen2":
        keys = dict(_LLAMA_LIKE_KEYS)
        keys.update({r + "_bias": f"model.layers.{{i}}.self_attn.{r}_proj.bias" for r in "qkv"})
    elif family in ("llama", "mistral", "gemma2", "mixtral"):
        keys = dict(_LLAMA_LIKE_KEYS)
    elif family == "phi3":
        keys = {
            "qkv": "model.layers.{i}.self_attn.qkv_proj.weight",
            "o": "model.layers.{i}.self_attn.o_proj.weight",
            "norm": "model.layers.{i}.input_layernorm.weight",
        }
    elif family == "gpt2":
        keys = {
            "qkv": "transformer.h.{i}.attn.c_attn.weight",
            "qkv_bias": "transformer.h.{i}.attn.c_attn.bias",
            "o": "transformer.h.{i}.attn.c_proj.weight",
            "o_bias": "transformer.h.{i}.attn.c_proj.bias",
            "norm": "transformer.h.{i}.ln_1.weight",
        }
    elif family == "gpt_neox":
        keys = {
            "qkv": "gpt_neox.layers.{i}.attention.query_key_value.weight",
            "qkv_bias": "gpt_neox.layers.{i}.attention.query_key_value.bias",
            "o": "gpt_neox.layers.{i}.attention.dense.weight",
            "o_bias": "gpt_neox.layers.{i}.attention.dense.bias",
            "norm": "gpt_neox.layers.{i}.input_layernorm.weight",
        }
    elif family == "bert":
        keys = {
            "q": "encoder.layer.{i}.attention.self.query.weight",
            "k": "encoder.layer.{i}.attention.self.key.weight",
            "v": "encoder.layer.{i}.attention.self.value.weight",
            "o": "encoder.layer.{i}.attention.output.dense.weight",
            "q_bias": "encoder.layer.{i}.attention.self.query.bias",
            "k_bias": "encoder.layer.{i}.attention.self.key.bias",
            "v_bias": "encoder.layer.{i}.attention.self.value.bias",
            "o_bias": "encoder.layer.{i}.attention.output.dense.bias",
            "norm": "encoder.layer.{i}.attention.output.LayerNorm.weight",  # post-LN
        }
    elif family in _NEW_KEYS:
        keys = _NEW_KEYS[family]
    else:
        raise ValueError(f"unknown family {family!r}")
    return {role: k.format(i=layer) for role, k in keys.items()}


def _keys(layer: str, q: str, k: str, v: str, o: str, norm: str | None, qkv: bool = False) -> dict[str, str]:
    """role -> key template of one layer (``{i}`` the index); ``qkv``: ``q`` names the fused projection."""
    out = {"qkv": layer + q, "o": layer + o} if qkv else {"q": layer + q, "k": layer + k, "v": layer + v,
                                                            "o": layer + o}
    if norm:
        out["norm"] = layer + norm
    return out


_LL = "model.layers.{i}."
_FALCON = ("transformer.h.{i}.", "self_attention.query_key_value.weight", "", "", "self_attention.dense.weight")
# Key names of the families added for issue 10, read off each modeling file (q, k, v, o, norm feeding attention).
_NEW_KEYS = {
    **{f: _keys(_LL, "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "input_layernorm.weight")
       for f in ("granite", "glm4", "cohere", "stablelm", "stablelm_parallel", "starcoder2", "smollm3", "llama4")},
    # OLMo's LayerNorm has no parameters; OLMo 2 has no norm before attention at all
    **{f: _keys(_LL, "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", None) for f in ("olmo", "olmo2")},
    "phi": _keys(_LL, "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.dense.weight", "input_layernorm.weight"),
    "falcon": _keys(*_FALCON, "ln_attn.weight", qkv=True),  # new decoder: ln_attn (attention) + ln_mlp
    "falcon_mq": _keys(*_FALCON, "input_layernorm.weight", qkv=True),
    "falcon_rw": _keys(*_FALCON, "input_layernorm.weight", qkv=True),
    "bloom": _keys(*_FALCON, "input_layernorm.weight", qkv=True),
    "gptj": _keys("transformer.h.{i}.", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                  "attn.out_proj.weight", "ln_1.weight"),
    "gpt_neo": _keys("transformer.h.{i}.", "attn.attention.q_proj.weight", "attn.attention.k_proj.weight",
                     "attn.attention.v_proj.weight", "attn.attention.out_proj.weight", "ln_1.weight"),
    "gpt_bigcode": _keys("transformer.h.{i}.", "attn.c_attn.weight", "", "", "attn.c_proj.weight", "ln_1.weight",
                         qkv=True),  # an nn.Linear, [out, in]
    "opt": _keys("model.decoder.layers.{i}.", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.out_proj.weight", "self_attn_layer_norm.weight"),
    "distilbert": _keys("transformer.layer.{i}.", "attention.q_lin.weight", "attention.k_lin.weight",
                        "attention.v_lin.weight", "attention.out_lin.weight", "sa_layer_norm.weight"),  # post-LN
    "t5": _keys("encoder.block.{i}.layer.0.", "SelfAttention.q.weight", "SelfAttention.k.weight",
                "SelfAttention.v.weight", "SelfAttention.o.weight", "layer_norm.weight"),
}


def expected_attention_shapes(family: str, variant: str = "gqa") -> dict[str, tuple[int, ...]]:
    """Expected shapes for the roles returned by :func:`attention_keys`."""
    H = hidden_size(family)
    hd = head_dim(family)
    nq = N_HEADS
    nkv = kv_heads(family, variant)
    shapes: dict[str, tuple[int, ...]] = {
        "q": (nq * hd, H),
        "k": (nkv * hd, H),
        "v": (nkv * hd, H),
        "o": (H, nq * hd),
        "norm": (H,),
        "q_bias": (nq * hd,),
        "k_bias": (nkv * hd,),
        "v_bias": (nkv * hd,),
        "o_bias": (H,),
    }
    if family == "phi3":
        shapes["qkv"] = ((nq + 2 * nkv) * hd, H)
    elif family == "gpt2":
        shapes["qkv"] = (H, 3 * H)  # Conv1D: [in, out]
        shapes["qkv_bias"] = (3 * H,)
        shapes["o"] = (H, H)  # Conv1D: [in, out], square anyway
    elif family == "gpt_neox":
        shapes["qkv"] = (3 * H, H)
        shapes["qkv_bias"] = (3 * H,)
    elif family in ("falcon", "falcon_mq", "falcon_rw", "bloom", "gpt_bigcode"):  # Linear [(H + 2G) * hd, d]
        shapes["qkv"] = ((nq + 2 * nkv) * hd, H)
    if family in ("qwen3", "qwen3_moe", "gemma3"):
        shapes["q_norm"] = (hd,)
        shapes["k_norm"] = (hd,)
    elif family == "olmoe":
        shapes["q_norm"] = (nq * hd,)  # == hidden_size
        shapes["k_norm"] = (nkv * hd,)
    return {role: shapes[role] for role in attention_keys(family, 0)}


# --------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------


def _config_fields(config_cls) -> set[str]:
    if dataclasses.is_dataclass(config_cls):
        names = {f.name for f in dataclasses.fields(config_cls)}
    else:  # pragma: no cover - older transformers
        import inspect

        names = set(inspect.signature(config_cls.__init__).parameters)
    names |= {"attribute_map"} | set(getattr(config_cls, "attribute_map", {}))
    return names


def _make_config(config_cls, extra_ok: tuple[str, ...] = (), **kwargs):
    """Instantiate a config, refusing kwargs the class does not know.

    transformers silently stores unknown kwargs as attributes, so a typo like
    ``num_key_values_heads`` would be ignored.  ``extra_ok`` lists the
    attributes that are not declared fields but that the modeling code reads
    with ``getattr`` (e.g. ``head_dim`` for qwen3_moe).
    """
    unknown = set(kwargs) - _config_fields(config_cls) - set(extra_ok)
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no fields {sorted(unknown)}")
    config = config_cls(**kwargs)
    for name, value in kwargs.items():
        got = getattr(config, name)
        if name == "sliding_window" and got != value:
            raise AssertionError(f"{config_cls.__name__}.sliding_window was changed to {got!r}")
        if got != value and not isinstance(value, dict):
            raise AssertionError(f"{config_cls.__name__}.{name}: set {value!r}, config has {got!r}")
    return config


def _common_ids() -> dict:
    return dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def _decoder_kwargs(family: str, variant: str, explicit_head_dim: bool) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=hidden_size(family),
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=kv_heads(family, variant),
        max_position_embeddings=MAX_POS,
        **_common_ids(),
    )
    if explicit_head_dim:
        kw["head_dim"] = HEAD_DIM
    return kw


def _qwen3(variant: str = "gqa", seed: int = 0):
    cfg = _make_config(transformers.Qwen3Config, **_decoder_kwargs("qwen3", variant, True))
    return _instantiate("qwen3", variant, transformers.Qwen3ForCausalLM, cfg, seed)


def _qwen2(variant: str = "gqa", seed: int = 0):
    # Qwen2Config has no head_dim field (modeling reads it via getattr, real
    # Qwen2 checkpoints never set it): use hidden/heads.
    cfg = _make_config(transformers.Qwen2Config, **_decoder_kwargs("qwen2", variant, False))
    return _instantiate("qwen2", variant, transformers.Qwen2ForCausalLM, cfg, seed)


def _llama(variant: str = "gqa", seed: int = 0):
    cfg = _make_config(transformers.LlamaConfig, **_decoder_kwargs("llama", variant, True))
    return _instantiate("llama", variant, transformers.LlamaForCausalLM, cfg, seed)


def _mistral(variant: str = "gqa", seed: int = 0):
    # sliding_window=None (as in Mistral v0.2+); gemma covers sliding attention.
    cfg = _make_config(
        transformers.MistralConfig, sliding_window=None, **_decoder_kwargs("mistral", variant, True)
    )
    return _instantiate("mistral", variant, transformers.MistralForCausalLM, cfg, seed)


def _gemma2(variant: str = "gqa", seed: int = 0):
    kw = _decoder_kwargs("gemma2", variant, True)
    kw["num_hidden_layers"] = 3
    cfg = _make_config(
        transformers.Gemma2Config,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=HEAD_DIM,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        **kw,
    )
    return _instantiate("gemma2", variant, transformers.Gemma2ForCausalLM, cfg, seed)


def _gemma3(variant: str = "gqa", seed: int = 0):
    kw = _decoder_kwargs("gemma3", variant, True)
    kw["num_hidden_layers"] = 3
    cfg = _make_config(
        transformers.Gemma3TextConfig,
        sliding_window=4,
        # real Gemma3 is 5 sliding : 1 full; keep at least one of each
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=HEAD_DIM,
        **kw,
    )
    return _instantiate("gemma3", variant, transformers.Gemma3ForCausalLM, cfg, seed)


def _phi3(variant: str = "gqa", seed: int = 0):
    # Phi3Config has no head_dim field: use hidden/heads (as real Phi-3 does).
    cfg = _make_config(
        transformers.Phi3Config,
        original_max_position_embeddings=MAX_POS,
        **_decoder_kwargs("phi3", variant, False),
    )
    return _instantiate("phi3", variant, transformers.Phi3ForCausalLM, cfg, seed)


def _gpt2(variant: str = "mha", seed: int = 0):
    _check_variant("gpt2", variant)
    cfg = _make_config(
        transformers.GPT2Config,
        vocab_size=VOCAB,
        n_positions=MAX_POS,
        n_embd=hidden_size("gpt2"),
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_common_ids(),
    )
    return _instantiate("gpt2", variant, transformers.GPT2LMHeadModel, cfg, seed)


def _gpt_neox(variant: str = "mha", seed: int = 0):
    _check_variant("gpt_neox", variant)
    # Never set head_dim: attention uses hidden/heads but rotary would read it.
    # Default partial_rotary_factor 0.25 -> 4 rotary dims of 16.
    cfg = _make_config(
        transformers.GPTNeoXConfig,
        vocab_size=VOCAB,
        hidden_size=hidden_size("gpt_neox"),
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        max_position_embeddings=MAX_POS,
        **_common_ids(),
    )
    return _instantiate("gpt_neox", variant, transformers.GPTNeoXForCausalLM, cfg, seed)


def _bert(variant: str = "mha", seed: int = 0):
    _check_variant("bert", variant)
    cfg = _make_config(
        transformers.BertConfig,
        vocab_size=VOCAB,
        hidden_size=hidden_size("bert"),
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        max_position_embeddings=MAX_POS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD_ID,
    )
    return _instantiate("bert", variant, transformers.BertModel, cfg, seed)


def _qwen3_moe(variant: str = "gqa", seed: int = 0):
    # Qwen3MoeConfig has no declared head_dim field, but the modeling code
    # reads getattr(config, "head_dim", ...) and real checkpoints set it.
    cfg = _make_config(
        transformers.Qwen3MoeConfig,
        extra_ok=("head_dim",),
        moe_intermediate_size=32,
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **_decoder_kwargs("qwen3_moe", variant, True),
    )
    return _instantiate("qwen3_moe", variant, transformers.Qwen3MoeForCausalLM, cfg, seed)


def _mixtral(variant: str = "gqa", seed: int = 0):
    cfg = _make_config(
        transformers.MixtralConfig,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        **_decoder_kwargs("mixtral", variant, True),
    )
    return _instantiate("mixtral", variant, transformers.MixtralForCausalLM, cfg, seed)


def _olmoe(variant: str = "gqa", seed: int = 0):
    # OLMoE ignores head_dim consistency: q_norm is RMSNorm(hidden_size) and
    # k_norm RMSNorm(hidden/heads*kv) while the projections would use
    # head_dim -> use hidden/heads (no explicit head_dim).
    cfg = _make_config(
        transformers.OlmoeConfig,
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        **_decoder_kwargs("olmoe", variant, False),
    )
    return _instantiate("olmoe", variant, transformers.OlmoeForCausalLM, cfg, seed)


# ------------------------------------------------------------- families added for issue 10 (any architecture)


def _llama_named(family: str, config_cls, model_cls, explicit_head_dim: bool, **extra):
    """A builder for a family with Llama's kwargs (hidden_size, num_key_value_heads, ...) plus ``extra``."""
    def build(variant: str = "gqa", seed: int = 0):
        cfg = _make_config(config_cls, **extra, **_decoder_kwargs(family, variant, explicit_head_dim))
        return _instantiate(family, variant, model_cls, cfg, seed)

    return build


_olmo = _llama_named("olmo", transformers.OlmoConfig, transformers.OlmoForCausalLM, False)
# OLMo 2: RMSNorm after each sublayer, before the add; q_norm/k_norm over all heads.
_olmo2 = _llama_named("olmo2", transformers.Olmo2Config, transformers.Olmo2ForCausalLM, False)
# Granite: every multiplier away from 1 so that a missed one shows (residual_multiplier scales each branch).
_granite = _llama_named("granite", transformers.GraniteConfig, transformers.GraniteForCausalLM, False,
                        residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.125,
                        logits_scaling=2.0)
# GLM-4: post_self_attn_layernorm / post_mlp_layernorm after each branch; partial rotary (0.5), q/k/v biases.
_glm4 = _llama_named("glm4", transformers.Glm4Config, transformers.Glm4ForCausalLM, True)
# Cohere: one LayerNorm, attention and MLP in parallel; q/k norms on.
_cohere = _llama_named("cohere", transformers.CohereConfig, transformers.CohereForCausalLM, False, use_qk_norm=True)
# StableLM: sequential by default (use_parallel_residual=False), per-head q/k LayerNorms; partial rotary 0.25.
_stablelm = _llama_named("stablelm", transformers.StableLmConfig, transformers.StableLmForCausalLM, False,
                         qk_layernorm=True)
_stablelm_parallel = _llama_named("stablelm_parallel", transformers.StableLmConfig, transformers.StableLmForCausalLM,
                                  False, use_parallel_residual=True)
_starcoder2 = _llama_named("starcoder2", transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM, False)
_smollm3 = _llama_named("smollm3", transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, False)
# Phi-1/2: q/k/v_proj and a `dense` output, partial rotary (0.5), attention and MLP in parallel.
_phi = _llama_named("phi", transformers.PhiConfig, transformers.PhiForCausalLM, False,
                    resid_pdrop=0.0, embd_pdrop=0.0)
# Llama 4 text: layer 1 is a MoE (4 experts, top 1, a shared expert), layer 0 a dense MLP; q/k L2 norm.
_llama4 = _llama_named("llama4", transformers.Llama4TextConfig, transformers.Llama4ForCausalLM, True,
                       intermediate_size_mlp=64, num_local_experts=N_EXPERTS, num_experts_per_tok=1, moe_layers=[1])


def _falcon_kind(family: str, **arch):
    """Falcon builders: ``arch`` picks the decoder generation (new_decoder_architecture, multi_query, ...)."""
    def build(variant: str = "gqa", seed: int = 0):
        _check_variant(family, variant)
        cfg = _make_config(transformers.FalconConfig, vocab_size=VOCAB, hidden_size=hidden_size(family),
                           num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, ffn_hidden_size=64,
                           max_position_embeddings=MAX_POS, hidden_dropout=0.0, attention_dropout=0.0,
                           **arch, **({"num_kv_heads": kv_heads(family, variant)} if family == "falcon" else {}),
                           **_common_ids())
        return _instantiate(family, variant, transformers.FalconForCausalLM, cfg, seed)

    return build


# Falcon-40B/180B: fused qkv per kv group, ln_attn + ln_mlp, parallel; Falcon-7B: multi-query (q | k | v), one
# input_layernorm, parallel; Falcon-RW: per-head interleave, ALiBi, sequential (parallel_attn=False).
_falcon = _falcon_kind("falcon", new_decoder_architecture=True)
_falcon_mq = _falcon_kind("falcon_mq", new_decoder_architecture=False, multi_query=True)
_falcon_rw = _falcon_kind("falcon_rw", new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                          alibi=True, bias=True)


def _gptj(variant: str = "mha", seed: int = 0):
    _check_variant("gptj", variant)
    cfg = _make_config(transformers.GPTJConfig, vocab_size=VOCAB, n_positions=MAX_POS, n_embd=hidden_size("gptj"),
                       n_layer=N_LAYERS, n_head=N_HEADS, n_inner=64, rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, **_common_ids())  # rotary_dim 8 of head_dim 16: partial rotary
    return _instantiate("gptj", variant, transformers.GPTJForCausalLM, cfg, seed)


def _bloom(variant: str = "mha", seed: int = 0):
    _check_variant("bloom", variant)
    cfg = _make_config(transformers.BloomConfig, vocab_size=VOCAB, hidden_size=hidden_size("bloom"), n_layer=N_LAYERS,
                       n_head=N_HEADS, hidden_dropout=0.0, attention_dropout=0.0, **_common_ids())
    return _instantiate("bloom", variant, transformers.BloomForCausalLM, cfg, seed)


def _gpt_neo(variant: str = "mha", seed: int = 0):
    _check_variant("gpt_neo", variant)
    cfg = _make_config(transformers.GPTNeoConfig, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                       hidden_size=hidden_size("gpt_neo"), num_layers=N_LAYERS, num_heads=N_HEADS,
                       attention_types=[[["global", "local"], 1]], window_size=4, intermediate_size=64,
                       resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, **_common_ids())
    return _instantiate("gpt_neo", variant, transformers.GPTNeoForCausalLM, cfg, seed)


def _gpt_bigcode(variant: str = "mqa", seed: int = 0):
    _check_variant("gpt_bigcode", variant)
    cfg = _make_config(transformers.GPTBigCodeConfig, vocab_size=VOCAB, n_positions=MAX_POS,
                       n_embd=hidden_size("gpt_bigcode"), n_layer=N_LAYERS, n_head=N_HEADS, n_inner=64,
                       multi_query=variant == "mqa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_common_ids())
    return _instantiate("gpt_bigcode", variant, transformers.GPTBigCodeForCausalLM, cfg, seed)


def _opt(variant: str = "mha", seed: int = 0):
    _check_variant("opt", variant)
    cfg = _make_config(transformers.OPTConfig, vocab_size=VOCAB, hidden_size=hidden_size("opt"),
                       word_embed_proj_dim=hidden_size("opt"), num_hidden_layers=N_LAYERS, ffn_dim=64,
                       num_attention_heads=N_HEADS, max_position_embeddings=MAX_POS, dropout=0.0,
                       attention_dropout=0.0, **_common_ids())
    return _instantiate("opt", variant, transformers.OPTForCausalLM, cfg, seed)


def _distilbert(variant: str = "mha", seed: int = 0):
    _check_variant("distilbert", variant)
    cfg = _make_config(transformers.DistilBertConfig, vocab_size=VOCAB, dim=hidden_size("distilbert"),
                       hidden_dim=64, n_layers=N_LAYERS, n_heads=N_HEADS, max_position_embeddings=MAX_POS,
                       dropout=0.0, attention_dropout=0.0, pad_token_id=PAD_ID)
    return _instantiate("distilbert", variant, transformers.DistilBertModel, cfg, seed)


def _t5(variant: str = "mha", seed: int = 0):
    # The T5 encoder: d_kv (16) * heads (4) = 64 while d_model is 48, relative attention bias, no 1/sqrt(d) scaling.
    _check_variant("t5", variant)
    cfg = _make_config(transformers.T5Config, vocab_size=VOCAB, d_model=hidden_size("t5"), d_kv=HEAD_DIM, d_ff=64,
                       num_layers=N_LAYERS, num_heads=N_HEADS, dropout_rate=0.0, pad_token_id=PAD_ID,
                       eos_token_id=EOS_ID)
    return _instantiate("t5", variant, transformers.T5EncoderModel, cfg, seed)


FAMILIES: dict[str, Callable[..., PreTrainedModel]] = {
    "qwen3": _qwen3,
    "qwen2": _qwen2,
    "llama": _llama,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "bert": _bert,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    # issue 10
    "olmo": _olmo,
    "olmo2": _olmo2,
    "granite": _granite,
    "glm4": _glm4,
    "cohere": _cohere,
    "stablelm": _stablelm,
    "stablelm_parallel": _stablelm_parallel,
    "gptj": _gptj,
    "falcon": _falcon,
    "falcon_mq": _falcon_mq,
    "falcon_rw": _falcon_rw,
    "bloom": _bloom,
    "gpt_neo": _gpt_neo,
    "gpt_bigcode": _gpt_bigcode,
    "opt": _opt,
    "phi": _phi,
    "distilbert": _distilbert,
    "t5": _t5,
    "starcoder2": _starcoder2,
    "smollm3": _smollm3,
    "llama4": _llama4,
}
# The families added for issue 10 (tests/test_families.py checks each against dense float64 and HuggingFace).
NEW_FAMILIES = tuple(list(FAMILIES)[list(FAMILIES).index("olmo"):])

MODEL_TYPES = {
    "qwen3": "qwen3",
    "qwen2": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "bert": "bert",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    **{f: f for f in ("olmo", "olmo2", "granite", "glm4", "cohere", "stablelm", "gptj", "falcon", "bloom", "gpt_neo",
                      "gpt_bigcode", "opt", "phi", "distilbert", "t5", "starcoder2", "smollm3")},
    "stablelm_parallel": "stablelm",
    "falcon_mq": "falcon",
    "falcon_rw": "falcon",
    "llama4": "llama4_text",
}

ALL_FAMILY_VARIANTS: list[tuple[str, str]] = [(family, variant) for family in FAMILIES for variant in variants_of(family)]
# The families before issue 10 (the suites that parametrize over them keep their size); the new ones are
# NEW_FAMILY_VARIANTS, checked in tests/test_families.py.
FAMILY_VARIANTS = [(f, v) for f, v in ALL_FAMILY_VARIANTS if f not in NEW_FAMILIES]
NEW_FAMILY_VARIANTS = [(f, v) for f, v in ALL_FAMILY_VARIANTS if f in NEW_FAMILIES]


def _instantiate(family: str, variant: str, model_cls, config, seed: int) -> PreTrainedModel:
    _check_variant(family, variant)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    _verify(family, variant, model)
    return model


def _verify(family: str, variant: str, model: PreTrainedModel) -> None:
    """Assert the modules really use the sizes we asked for."""
    cfg = model.config
    assert cfg.model_type == MODEL_TYPES[family], (cfg.model_type, family)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_PARAMS, f"{family}/{variant}: {n_params} parameters is not tiny"
    assert cfg.num_attention_heads == N_HEADS
    if family not in MHA_ONLY and hasattr(cfg, "num_key_value_heads"):  # else: the weight shapes below say it
        assert cfg.num_key_value_heads == kv_heads(family, variant), cfg.num_key_value_heads
    if family in EXPLICIT_HEAD_DIM:
        assert cfg.head_dim == HEAD_DIM and cfg.hidden_size // N_HEADS != HEAD_DIM
    assert cfg.hidden_size == hidden_size(family)
    assert cfg.vocab_size == VOCAB
    sd = model.state_dict()
    for layer in range(cfg.num_hidden_layers):
        expected = expected_attention_shapes(family, variant)
        for role, key in attention_keys(family, layer).items():
            assert key in sd, f"{family}: missing {key}"
            assert tuple(sd[key].shape) == expected[role], (family, key, tuple(sd[key].shape), expected[role])
    # the attention modules' own idea of the head geometry
    for name, module in model.named_modules():
        hd = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
        if hd is not None and re.search("attn|attention", name.lower() + type(module).__name__.lower()):
            assert hd == HEAD_DIM, (family, name, hd)
        if hasattr(module, "attention_head_size"):  # bert
            assert module.attention_head_size == HEAD_DIM
    if family in MOE:
        n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
        assert n_exp == N_EXPERTS and cfg.num_experts_per_tok == TOP_K
        experts = [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]
        assert len(experts) == cfg.num_hidden_layers, experts
        assert all(sd[k].shape[0] == N_EXPERTS for k in experts)
    if family in ("gemma2", "gemma3"):
        assert cfg.sliding_window == 4
        assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
        layers = model.model.layers
        for layer, lt in zip(layers, cfg.layer_types):
            want = 4 if lt == "sliding_attention" else None
            assert layer.self_attn.sliding_window == want, (family, lt, layer.self_attn.sliding_window)
    if family == "gemma2":
        assert cfg.attn_logit_softcapping == 50.0


def build_tiny(config_cls, model_cls, seed: int = 0, *, extra_ok: tuple[str, ...] = (),
               **config_kwargs) -> PreTrainedModel:
    """A tiny model of a family that ``FAMILIES`` does not build (DeepSeek, Qwen2-MoE, Gemma v1, RoBERTa...),
    through the same guard: every config kwarg must be a field of ``config_cls`` and read back unchanged
    (:func:`_make_config`), and the model must stay under ``MAX_PARAMS``. Seeded, in eval mode."""
    config = _make_config(config_cls, extra_ok, **config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_PARAMS, f"{model_cls.__name__}: {n_params} parameters is not tiny"
    model.eval()
    return model


def build_model(
    family: str, variant: str = "gqa", seed: int = 0, *, perturb_norms: bool = False
) -> PreTrainedModel:
    """Build a tiny, seeded, randomly initialised model in eval mode.

    ``variant``: "mha" (kv heads == heads), "mqa" (1 kv head), "gqa" (2 kv
    heads of 4).  gpt2, gpt_neox and bert only accept "mha".

    ``perturb_norms``: HF initialises norm weights to 1 (0 for Gemma's
    ``1 + w`` RMSNorm) and biases to 0; set this to add seeded noise to every
    norm weight/bias so that code folding norms into weights is exercised.
    """
    _check_variant(family, variant)
    model = FAMILIES[family](variant, seed)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_PARAMS, n_params
    if perturb_norms:
        gen = torch.Generator().manual_seed(seed + 12345)
        with torch.no_grad():
            for name, module in model.named_modules():
                if "norm" in type(module).__name__.lower():
                    for p in module.parameters(recurse=False):
                        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.eval()
    return model


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

_CORPUS = """
The true meaning of life is absurdity and suffering, said the old man to the
young woman who sat beside him on the bench. She laughed and said that the
meaning of life is love, and that suffering is only the price we pay for it.
The man looked at the river and did not answer for a long time. Then he said
that he had once believed the same thing, when he was young and the world was
new. The world is not new anymore, he said, and neither am I. The woman
thought about this. She thought about her mother and her father, about the
small house by the sea where she grew up, about the dog that had died when she
was seven years old. She thought that there was meaning in all of it, even in
the absurdity, even in the pain. Maybe the meaning is that there is no
meaning, she said, and we have to make our own. The man smiled for the first
time. That is what the philosophers say, he told her. Camus said that we must
imagine Sisyphus happy, pushing his stone up the mountain every day, knowing
that it will roll back down every night. Is that true happiness, she asked, or
is it just another story we tell ourselves so that we can keep going? The man
did not know. Nobody knows, he said. The sun was going down over the water and
the birds were flying home. A child ran past them with a red balloon, and a
small brown dog ran after the child, barking with joy. The woman watched them
go. Look, she said, there is the meaning of life: a child, a dog, a balloon,
and the evening light on the river. The man laughed. You may be right, he said.
Time passes and people change, but the river keeps running to the sea. We read
books, we write letters, we eat bread and drink water, we work and we sleep and
we dream. One, two, three, four, five, six, seven, eight, nine, ten. Monday,
Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Mary went to Paris and
John went to London; when Mary and John met again, John gave a book to Mary.
The cat sat on the mat. The quick brown fox jumps over the lazy dog. What is
the capital of France? The capital of France is Paris. What is two plus two?
Two plus two is four. Attention is all you need, said the researcher, and the
heads of the transformer looked at the previous token, the first token, and
the token that came after the same token last time.
"""


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = " ".join(_CORPUS.split())
    sentences = [s.strip() + "." for s in text.split(".") if s.strip()]
    tk.train_from_iterator(sentences * 3, trainer=trainer)
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tk.token_to_id(tok) == i, (tok, tk.token_to_id(tok))
    assert tk.get_vocab_size() <= TOKENIZER_VOCAB <= VOCAB
    return tk.to_str()


def build_tokenizer(template: str = "none") -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (vocab <= 400) trained on inline text.

    template:
      "none" - no special tokens added (gpt2 / qwen / phi3 style)
      "bos"  - prepend ``<s>`` (llama / mistral / gemma style)
      "bert" - ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` with token_type_ids
    Special ids: <pad>=0 <unk>=1 <s>=2 </s>=3 [CLS]=4 [SEP]=5 [MASK]=6.
    """
    from tokenizers import Tokenizer, processors

    tk = Tokenizer.from_str(_tokenizer_json())
    if template == "none":
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    elif template == "bos":
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    elif template == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
        )
    else:
        raise ValueError(f"unknown template {template!r}")
    input_names = ["input_ids", "attention_mask"]
    if template == "bert":
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POS,
        model_input_names=input_names,
    )
    assert tok.pad_token_id == PAD_ID and tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    return tok


def tokenizer_for(family: str) -> PreTrainedTokenizerFast:
    if family == "bert":
        return build_tokenizer("bert")
    if family == "distilbert":  # [CLS] A [SEP], but DistilBERT takes no token_type_ids
        tok = build_tokenizer("bert")
        tok.model_input_names = ["input_ids", "attention_mask"]
        return tok
    if family in ("llama", "mistral", "mixtral", "gemma2", "gemma3"):
        return build_tokenizer("bos")
    return build_tokenizer("none")


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------


def _state_dict_for_file(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    # clone: tied / shared tensors (lm_head <-> embeddings) cannot be saved
    # as aliases by safetensors; keep every key of the model's state_dict.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _model_bytes(model: PreTrainedModel) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def save_checkpoint(model: PreTrainedModel, tokenizer, out_dir: Path, fmt: str) -> Path:
    """Save ``model`` (and ``tokenizer`` for the HF formats) under ``out_dir``.

    fmt: "hf_dir" | "hf_sharded" -> the directory;
         "safetensors" (model.safetensors) | "pt" (model.pt) |
         "bin" (pytorch_model.bin) -> the file (bare state dict, no config).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "hf_dir":
        model.save_pretrained(out_dir)
        assert (out_dir / "model.safetensors").is_file()
        assert not (out_dir / "model.safetensors.index.json").exists()
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return out_dir
    if fmt == "hf_sharded":
        shard = max(_model_bytes(model) // 4, 1024)
        model.save_pretrained(out_dir, max_shard_size=shard)
        index = out_dir / "model.safetensors.index.json"
        assert index.is_file(), sorted(p.name for p in out_dir.iterdir())
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shards) >= 2, shards
        assert all((out_dir / s).is_file() for s in shards)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return out_dir
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out_dir / "model.safetensors"
        save_file(_state_dict_for_file(model), str(path), metadata={"format": "pt"})
        return path
    if fmt in ("pt", "bin"):
        path = out_dir / ("model.pt" if fmt == "pt" else "pytorch_model.bin")
        torch.save(_state_dict_for_file(model), path)
        return path
    raise ValueError(f"unknown format {fmt!r}; expected one of {SAVE_FORMATS}")


def make_hub_cache(
    model: PreTrainedModel,
    tokenizer,
    cache_dir: Path,
    repo_id: str,
    revision_sha: str = "0" * 40,
    sharded: bool = False,
) -> Path:
    """Lay out a HuggingFace hub cache entry for ``repo_id`` by hand, as ``huggingface_hub`` does.

    ``cache_dir/models--{org}--{name}/blobs/<sha256>`` holds the file contents,
    ``snapshots/{sha}/<file>`` are relative symlinks to the blobs, and ``refs/main`` holds the sha,
    which is enough for ``hf_hub_download(..., cache_dir=cache_dir, local_files_only=True)`` and
    ``from_pretrained(repo_id, cache_dir=...)`` offline. ``sharded`` saves several weight shards and
    an index. Returns the snapshot directory.
    """
    import hashlib
    import os

    assert len(revision_sha) == 40 and all(c in "0123456789abcdef" for c in revision_sha)
    cache_dir = Path(cache_dir)
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision_sha
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.mkdir(parents=True)
    blobs = repo_dir / "blobs"
    blobs.mkdir(exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    if sharded:
        model.save_pretrained(snapshot, max_shard_size=max(_model_bytes(model) // 4, 1024))
    else:
        model.save_pretrained(snapshot)
    if tokenizer is not None:
        tokenizer.save_pretrained(snapshot)
    for f in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.move(str(f), blob)
        else:
            f.unlink()
        f.symlink_to(os.path.relpath(blob, f.parent))
    (repo_dir / "refs" / "main").write_text(revision_sha)
    return snapshot
