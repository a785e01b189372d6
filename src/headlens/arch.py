"""Architecture table: where each family keeps its attention weights, keyed by ``model_type``.

Every difference between families that headlens cares about lives in :data:`SPECS`; the rest of the
code reads tensors through a spec and never branches on the family name.

Tensor names are relative to one layer: the full key is ``<prefix><layers_path>.<l>.<name>``, where the
prefix (``model.``, ``transformer.``, ``bert.``, or nothing) is discovered from the checkpoint itself.
Each spec's :class:`~headlens.layout.Layout` record (the class lives in :mod:`headlens.layout`; the records
are here) says which tensors hold q/k/v/o and how their rows are ordered (HuggingFace, ``nn.Linear.weight`` is
``[out, in]``), and it is the one splitter every reader goes through:

- separate (Llama, Qwen, Mistral, Gemma, MoE families, BERT; under other names GPT-J, GPT-Neo, OPT, Phi-1/2 with
  its ``dense`` output, DistilBERT, the T5 encoder): ``v`` is ``[G*hd, d]``, ``o`` is ``[d, H*hd]``.
- fused concat (Phi-3): ``qkv`` is ``[(H + 2G)*hd, d]`` laid out q | k | v.
- fused concat, transposed (GPT-2 ``Conv1D`` stores ``[in, out]``): ``c_attn`` is ``[d, 3*H*hd]`` (q | k | v
  columns), ``c_proj`` is ``[H*hd, d]``.
- fused interleaved (GPT-NeoX, Bloom): ``query_key_value`` is ``[H*3*hd, d]``, per head ``[q_h; k_h; v_h]``.
- fused interleaved per kv group (Falcon, GPTBigCode): ``[(H + 2G)*hd, d]``, per kv group ``g`` the ``H/G`` query
  heads it serves, then ``k_g``, then ``v_g``. With G = H this is the per-head interleave above (Falcon-RW, GPTBigCode
  without multi-query); with G = 1 it is q | k | v (Falcon-7B's and StarCoder's multi-query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from headlens.errors import HeadlensError
from headlens.layout import QKV, Block, Index, LayerSplit, Layout

__all__ = ["QKV", "Block", "Index", "LayerSplit", "Layout", "ArchSpec", "QKNorm", "SPECS", "GENERIC", "KeyMap", "LayerKeys",
           "supported_types", "spec_for_type", "detect_spec", "holds"]

_ATTN = "self_attn."
SEPARATE = Layout("separate", q=_ATTN + "q_proj.weight", k=_ATTN + "k_proj.weight", v=_ATTN + "v_proj.weight",
                  o=_ATTN + "o_proj.weight")
FUSED_CONCAT = Layout("fused_concat", qkv=_ATTN + "qkv_proj.weight", o=_ATTN + "o_proj.weight")
CONV1D = Layout("conv1d", qkv="attn.c_attn.weight", o="attn.c_proj.weight", transposed=True, grouped=False)
INTERLEAVED = Layout("interleaved", qkv="attention.query_key_value.weight", o="attention.dense.weight",
                     interleaved=True, grouped=False)
BERT_SEPARATE = Layout("separate", q="attention.self.query.weight", k="attention.self.key.weight",
                       v="attention.self.value.weight", o="attention.output.dense.weight")
# Falcon, every generation: query_key_value interleaved per kv group (see the module docstring).
FALCON = Layout("interleaved_grouped", qkv="self_attention.query_key_value.weight", o="self_attention.dense.weight",
                interleaved=True)
BLOOM = Layout("interleaved", qkv="self_attention.query_key_value.weight", o="self_attention.dense.weight",
               interleaved=True, grouped=False)  # per head [q_h; k_h; v_h], as GPT-NeoX
# GPTBigCode's c_attn is an nn.Linear ([out, in], not GPT-2's Conv1D): q | k | v under multi_query (G = 1),
# per head [q_h; k_h; v_h] otherwise (G = H); both are the per-kv-group interleave.
BIGCODE = Layout("interleaved_grouped", qkv="attn.c_attn.weight", o="attn.c_proj.weight", interleaved=True)


def _separate(q: str, k: str, v: str, o: str) -> Layout:
    """Separate q/k/v/o projections (``nn.Linear``) under other names than ``self_attn.{q,k,v,o}_proj``."""
    return Layout("separate", q=q + ".weight", k=k + ".weight", v=v + ".weight", o=o + ".weight")


GPTJ = _separate("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj")
GPT_NEO = _separate("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj",
                    "attn.attention.out_proj")
OPT = _separate(_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj", _ATTN + "out_proj")
PHI = _separate(_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj", _ATTN + "dense")  # Phi-1/2: `dense` output
DISTILBERT = _separate("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin")
T5 = _separate("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
               "layer.0.SelfAttention.o")  # T5's inner dim H * d_kv need not be d_model


@dataclass(frozen=True)
class QKNorm:
    """Norms applied to the queries and keys after their projections (Qwen3's ``q_norm``/``k_norm``).

    Each scales every coordinate of ``W_Q x`` (``W_K x``) by a stored gain and the whole vector by one number per
    token (its RMS, per head or over all heads); ``center`` norms also subtract each head's mean first (Cohere's
    LayerNorm without bias), which is linear too. The gain and the centring fold into ``W_Q``/``W_K``
    (:func:`headlens.circuits.heads.qk_norm_gains`); the per-token scale does not.
    """

    q: str  # the query norm's weight, relative to the layer: (hd,) shared by every head, or (H*hd,) / (H, hd)
    k: str  # the key norm's weight: (hd,) or (G*hd,) / (G, hd)
    offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    center: bool = False  # a LayerNorm that subtracts each head's mean (Cohere)


# Any tensor of a layer that looks like a query/key norm: one the spec does not declare is refused where the
# QK circuit is read, rather than left out of it (StableLM's per-head LayerNorms with biases, an unknown family).
QK_NORM_PATTERN = re.compile(r"(^|\.)(q|k|query|key)_?(norm|layernorm|ln)(\.|$)")


@dataclass(frozen=True)
class ArchSpec:
    """How one family stores and runs attention."""

    family: str  # a readable family name
    layers_path: str  # dotted path of the layer list, e.g. "layers", "h", "encoder.layer"
    layout: Layout  # which tensors hold q/k/v/o and how their heads are laid out
    attn_module: str = "self_attn"  # module whose first input is the attention input (for hooks)
    # Norm whose output feeds the attention: relative to the same layer (pre-norm families), or, for
    # post-norm encoders, the previous layer's output norm (``prev_norm``) and the embedding norm.
    norm: str | None = "input_layernorm.weight"
    prev_norm: str | None = None  # post-norm encoders: the previous layer's output norm feeds attention
    first_norm: str | None = None  # relative to the prefix (outside the layer list)
    norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (1 + weight)
    decoder: bool = True  # a causal decoder (False: a bidirectional encoder such as BERT)
    # Residual structure of one layer and the modules (relative to the layer) whose hooks give each site:
    #   "pre": x + attn(norm(x)), then + mlp(norm(.))              (Llama, Qwen, Mistral, MoE families, GPT-2)
    #   "sandwich": like "pre" but each branch output is normed before the add           (Gemma 2/3, GLM-4)
    #   "post_sublayer": x + norm(attn(x)), then + norm(mlp(.)): no norm before a branch   (OLMo 2)
    #   "parallel": x + attn(norm1(x)) + mlp(norm2(x))                (GPT-NeoX, GPT-J, Falcon, Phi-1/2, Cohere)
    #   "post": norm(x + attn(x)), then norm(. + mlp(.))                                  (BERT, DistilBERT)
    residual: str = "pre"  # one of the five residual structures above
    attn_out: str = "self_attn"  # forward hook, output (or output[0]): what attention adds to the stream
    mlp_out: str = "mlp"  # forward hook, output: what the MLP adds to the stream
    mid_input: str | None = "post_attention_layernorm"  # forward pre-hook, first input: resid_mid
    final_norm: str | None = "norm"  # relative to the layer list's parent; forward hook, output
    parallel_flag: str | None = None  # config flag that turns the residual "parallel" (then no resid_mid)
    # The pre-attention norm's other name, read when the checkpoint has no ``norm`` (Falcon's new decoder
    # architecture: ln_attn, beside ln_mlp).
    norm_alt: str | None = None
    # Config attribute every branch is multiplied by before its add, h = x + m * attn(..) (Granite's
    # residual_multiplier): the attn_out / mlp_out hooks then see the unscaled branch, so no module gives what is
    # added, and it must be derived by difference (resid_mid - resid_pre).
    branch_scale: str | None = None
    # The MLP branch's hooks (mid_input, mlp_out) may see the tokens flattened to (B*N, d) instead of the stream's
    # (B, N, d): OPT reshapes before its fc1/fc2, Llama 4's MoE returns (B*N, d).
    flat_mlp: bool = False
    # Config (flag, value) pairs the residual fields above assume. A config that differs has another structure
    # (OPT-350m's do_layer_norm_before=False is post-norm; Bloom's apply_residual_connection_post_layernorm adds
    # the norm's output, not the layer input), which site capture must refuse rather than mislabel.
    sites_require: tuple[tuple[str, bool], ...] = ()
    # Config (flag, value) pairs under which ``norm`` is the norm that feeds attention (OPT-350m's
    # do_layer_norm_before=False applies self_attn_layer_norm after the attention's add instead).
    norm_requires: tuple[tuple[str, bool], ...] = ()
    # The transformers class that runs this family's stack, where AutoModel builds more than the spec covers
    # (T5: AutoModel is the encoder-decoder, whose forward needs decoder inputs; T5EncoderModel runs the encoder).
    model_class: str | None = None
    # Index of the attention probabilities in the attention module's output tuple under eager attention
    # (T5 returns (output, position_bias, probabilities)).
    probs_at: int = 1
    # The QK circuit (``headlens ov --circuit qk``). Norms applied to the projected queries and keys, relative to the
    # layer (``{h}``: the head index, where each head has a module of its own, as StableLM's); their gains fold into
    # W_Q / W_K, their per-token scale cannot. A gain may be (hd,) shared by the heads, (n*hd,) over all heads
    # (OLMo 2) or (n, hd). An absent tensor means the checkpoint has no such norm.
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_centered: bool = False  # a LayerNorm over each head (subtracts the mean: a linear map, folded too)
    # How positions enter the logits: "rotary", "absolute" (already in the stream), "alibi", "relative_bias";
    # ``position_flags``: (config flag, position) that holds instead when the flag is set (Falcon's alibi).
    position: str = "rotary"
    position_flags: tuple[tuple[str, str], ...] = ()
    # (config key, note): what else the model does to its logits, said when the key is set ("": always).
    qk_notes: tuple[tuple[str, str], ...] = ()

    @property
    def qk_norm(self) -> QKNorm | None:
        """The query/key norms as the sweep folds them (one weight tensor each, the family's norm offset, centring),
        from ``q_norm``/``k_norm``; None where the family declares none, or one module per head (``{h}``: StableLM's
        per-head LayerNorms carry biases, which cannot fold into W_Q/W_K for a whole layer)."""
        if not self.q_norm or not self.k_norm or "{h}" in self.q_norm + self.k_norm:
            return None
        return QKNorm(self.q_norm, self.k_norm, offset=self.norm_offset, center=self.qk_norm_centered)

    def position_kind(self, config: Mapping | None) -> str:
        """How positions enter this checkpoint's attention logits (see ``position``)."""
        return next((kind for flag, kind in self.position_flags if config and config.get(flag)), self.position)


_QK_NORM = dict(q_norm=_ATTN + "q_norm.weight", k_norm=_ATTN + "k_norm.weight")
_LLAMA = dict(layers_path="layers", layout=SEPARATE, **_QK_NORM)
_SCALE = "the prompt's logits here are scaled by head_dim^-1/2"
_GEMMA_SCALE = ("query_pre_attn_scalar", f"the model scales logits by query_pre_attn_scalar^-1/2; {_SCALE}")
_SANDWICH = dict(residual="sandwich", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                 mid_input="pre_feedforward_layernorm")

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("Llama", **_LLAMA),
    "mistral": ArchSpec("Mistral", **_LLAMA),
    "qwen2": ArchSpec("Qwen2/2.5", **_LLAMA),
    "qwen3": ArchSpec("Qwen3", **_LLAMA),
    "qwen2_moe": ArchSpec("Qwen2-MoE", **_LLAMA),
    "qwen3_moe": ArchSpec("Qwen3-MoE", **_LLAMA),
    "mixtral": ArchSpec("Mixtral", **_LLAMA),
    "olmoe": ArchSpec("OLMoE", **_LLAMA),  # q/k norms over all heads
    "gemma": ArchSpec("Gemma", norm_offset=1.0, qk_notes=(_GEMMA_SCALE,), **_LLAMA),
    "gemma2": ArchSpec("Gemma 2", norm_offset=1.0, **_SANDWICH, **_LLAMA, qk_notes=(
        ("attn_logit_softcapping", "the model soft-caps its logits (tanh, attn_logit_softcapping): left out"),
        _GEMMA_SCALE)),
    "gemma3_text": ArchSpec("Gemma 3", norm_offset=1.0, qk_notes=(_GEMMA_SCALE,), **_SANDWICH, **_LLAMA),
    "phi3": ArchSpec("Phi-3", layers_path="layers", layout=FUSED_CONCAT),
    # Each entry below: where the weights are, then the norm feeding attention, then the residual sites.
    "gpt2": ArchSpec("GPT-2", layers_path="h", layout=CONV1D, attn_module="attn",
                     norm="ln_1.weight", position="absolute",
                     attn_out="attn", mid_input="ln_2", final_norm="ln_f"),
    "gpt_neox": ArchSpec("GPT-NeoX/Pythia", layers_path="layers", layout=INTERLEAVED, attn_module="attention",
                         residual="parallel", parallel_flag="use_parallel_residual",
                         attn_out="attention", final_norm="final_layer_norm"),
    "bert": ArchSpec("BERT", layers_path="encoder.layer", layout=BERT_SEPARATE, attn_module="attention.self",
                     norm=None, prev_norm="output.LayerNorm.weight", first_norm="embeddings.LayerNorm.weight",
                     decoder=False, residual="post", position="absolute",
                     attn_out="attention.output.dense", mlp_out="output.dense", mid_input="intermediate",
                     final_norm=None),
    # Falcon: parallel unless parallel_attn is false (Falcon-RW); the new decoder (40B/180B) norms with ln_attn.
    "falcon": ArchSpec("Falcon", layers_path="h", layout=FALCON, attn_module="self_attention",
                       norm_alt="ln_attn.weight", position_flags=(("alibi", "alibi"),),
                       residual="parallel", parallel_flag="parallel_attn", attn_out="self_attention", final_norm="ln_f"),
    "gptj": ArchSpec("GPT-J", layers_path="h", layout=GPTJ, attn_module="attn", norm="ln_1.weight",
                     residual="parallel", attn_out="attn", mid_input=None, final_norm="ln_f"),
    # Bloom's attention and MLP modules add the residual themselves: their output projections give the branches.
    "bloom": ArchSpec("Bloom", layers_path="h", layout=BLOOM, attn_module="self_attention", position="alibi",
                      attn_out="self_attention.dense", mlp_out="mlp.dense_4h_to_h", final_norm="ln_f",
                      sites_require=(("apply_residual_connection_post_layernorm", False),)),
    "gpt_neo": ArchSpec("GPT-Neo", layers_path="h", layout=GPT_NEO, attn_module="attn", norm="ln_1.weight",
                        position="absolute",
                        attn_out="attn", mid_input="ln_2", final_norm="ln_f"),
    "gpt_bigcode": ArchSpec("GPTBigCode/StarCoder", layers_path="h", layout=BIGCODE, attn_module="attn",
                            norm="ln_1.weight", attn_out="attn", mid_input="ln_2", final_norm="ln_f",
                            position="absolute"),
    "opt": ArchSpec("OPT", layers_path="decoder.layers", layout=OPT, norm="self_attn_layer_norm.weight",
                    position="absolute",
                    mlp_out="fc2", mid_input="final_layer_norm", final_norm="final_layer_norm", flat_mlp=True,
                    sites_require=(("do_layer_norm_before", True),), norm_requires=(("do_layer_norm_before", True),)),
    "phi": ArchSpec("Phi-1/2", layers_path="layers", layout=PHI,
                    residual="parallel", mid_input=None, final_norm="final_layernorm"),
    "distilbert": ArchSpec("DistilBERT", layers_path="transformer.layer", layout=DISTILBERT, attn_module="attention",
                           norm=None, prev_norm="output_layer_norm.weight", first_norm="embeddings.LayerNorm.weight",
                           decoder=False, residual="post", position="absolute",
                           attn_out="attention", mlp_out="ffn", mid_input="ffn", final_norm=None),
    # T5 encoder (T5EncoderModel, or the encoder of a full T5): relative attention bias, no 1/sqrt(hd) scaling.
    "t5": ArchSpec("T5 encoder", layers_path="encoder.block", layout=T5, attn_module="layer.0.SelfAttention",
                   norm="layer.0.layer_norm.weight", decoder=False,
                   attn_out="layer.0.SelfAttention", mlp_out="layer.1.DenseReluDense", mid_input="layer.1",
                   final_norm="final_layer_norm", model_class="T5EncoderModel", probs_at=2,
                   position="relative_bias", qk_notes=(("", f"T5 does not scale its logits; {_SCALE}"),)),
    # Llama-named projections with another residual structure.
    "olmo2": ArchSpec("OLMo 2", norm=None, residual="post_sublayer", attn_out="post_attention_layernorm",
                      mlp_out="post_feedforward_layernorm", mid_input="mlp", **_LLAMA),
    "glm4": ArchSpec("GLM-4", residual="sandwich", attn_out="post_self_attn_layernorm", mlp_out="post_mlp_layernorm",
                     mid_input="post_attention_layernorm", **_LLAMA),
    "granite": ArchSpec("Granite", branch_scale="residual_multiplier", **_LLAMA, qk_notes=(
        ("attention_multiplier", f"the model scales logits by attention_multiplier; {_SCALE}"),)),
    "cohere": ArchSpec("Cohere", residual="parallel", mid_input=None, qk_norm_centered=True,  # LayerNorm (H, hd)
                       **_LLAMA),
    "stablelm": ArchSpec("StableLM", residual="parallel", parallel_flag="use_parallel_residual",
                         q_norm=_ATTN + "q_layernorm.norms.{h}.weight", k_norm=_ATTN + "k_layernorm.norms.{h}.weight",
                         qk_norm_centered=True, layers_path="layers", layout=SEPARATE),
    "llama4_text": ArchSpec("Llama 4", mlp_out="feed_forward", flat_mlp=True, **_LLAMA, qk_notes=(
        ("use_qk_norm", "the model L2-normalises q and k per token in its rotary layers (use_qk_norm): left out"),)),
}
SPECS.update({t: ArchSpec(name, **_LLAMA) for t, name in (  # Llama's names and structure
    ("olmo", "OLMo"), ("starcoder2", "Starcoder2"), ("smollm3", "SmolLM3"))})
SPECS["roberta"] = SPECS["bert"]
SPECS["xlm-roberta"] = SPECS["bert"]
# Multimodal wrappers whose text model is one of the above.
SPECS["gemma3"] = SPECS["gemma3_text"]
SPECS["llama4"] = SPECS["llama4_text"]

# A model without a known model_type (a bare state dict): Llama's names, and q/k norms where Qwen3, OLMo 2 and OLMoE
# keep them (gain w; Gemma 3's 1 + w is known only from its config, as for its input norm).
GENERIC = ArchSpec("generic (self_attn.{q,k,v,o}_proj)", **_LLAMA)


def holds(requires: tuple[tuple[str, bool], ...], config: Mapping | None) -> bool:
    """Whether a config dict has every (flag, value) of ``requires`` (a missing flag has the value required, as
    each flag's default does; no config at all: assumed to)."""
    return config is None or all(bool(config.get(flag, value)) == value for flag, value in requires)


def supported_types() -> list[str]:
    """The ``model_type`` values with an explicit spec, sorted."""
    return sorted(SPECS)


def _supported() -> str:
    return ", ".join(supported_types()) + " (or any model whose layers use self_attn.{q,k,v,o}_proj)"


def spec_for_type(model_type: str | None, keys: Iterable[str] | None = None) -> ArchSpec:
    """Spec for ``model_type``; an unknown type whose layers hold ``self_attn.{v,o}_proj`` gets :data:`GENERIC`.

    Raises HeadlensError, "unsupported architecture X; supported: ...", otherwise: a family the table does not
    know fails here, by name, and never later on a tensor the generic spec would look for.
    """
    if model_type in SPECS:
        return SPECS[model_type]
    keys = list(keys) if keys is not None else []
    if all(any(k.endswith(name) for k in keys) for name in (GENERIC.layout.anchor, GENERIC.layout.o)):
        return GENERIC
    raise HeadlensError(f"unsupported architecture {model_type!r}; supported: {_supported()}")


# Bare state dicts (no config): the first suffix that some tensor name ends with decides, most specific first.
_PROBES = (
    ("bloom", "word_embeddings_layernorm.weight"),  # Bloom and Falcon share self_attention.query_key_value
    ("falcon", "self_attention.query_key_value.weight"),
    ("gpt_neox", "attention.query_key_value.weight"),
    ("gpt2", "attn.c_attn.weight"),  # or GPTBigCode, same names: detect_spec tells them apart by the shape
    ("phi3", "self_attn.qkv_proj.weight"),
    ("gpt_neo", "attn.attention.out_proj.weight"),
    ("opt", "self_attn.out_proj.weight"),
    ("gptj", "attn.out_proj.weight"),  # after OPT, whose self_attn.out_proj ends the same way
    ("phi", "self_attn.dense.weight"),
    ("distilbert", "attention.out_lin.weight"),
    ("t5", "SelfAttention.o.weight"),
    ("bert", "attention.self.value.weight"),
)


def detect_spec(keys: Iterable[str], shape: Callable[[str], tuple[int, ...]] | None = None) -> tuple[str, ArchSpec]:
    """Guess the family of a bare state dict (no config) from its tensor names: (model_type, spec), with
    ``"unknown"`` and :data:`GENERIC` for any ``self_attn.{v,o}_proj`` model.

    ``shape`` (name -> stored shape) tells GPT-2 from GPTBigCode, whose tensors have the same names: GPT-2's
    ``Conv1D`` c_attn is stored ``[d, 3d]`` (wider than tall), GPTBigCode's ``nn.Linear`` ``[(H + 2G) hd, d]``."""
    keys = list(keys)
    for model_type, suffix in _PROBES:
        found = next((k for k in keys if k.endswith(suffix)), None)
        if found is None:
            continue
        if model_type == "gpt2" and shape is not None:
            rows, cols = shape(found)[:2]
            model_type = "gpt_bigcode" if rows > cols else "gpt2"
        return model_type, SPECS[model_type]
    if all(any(k.endswith(name) for k in keys) for name in (GENERIC.layout.anchor, GENERIC.layout.o)):
        return "unknown", GENERIC
    raise HeadlensError(
        "cannot recognise the architecture from the tensor names (no self_attn.{v,o}_proj, qkv_proj, c_attn, "
        "query_key_value or other attention weights of a known family); supported model types are "
        f"{_supported()}"
    )


@dataclass(frozen=True)
class LayerKeys:
    """Resolved full tensor names of one layer's attention, for a spec and a checkpoint prefix."""

    v: str | None
    o: str
    qkv: str | None
    norm: str | None
    q: str | None = None
    k: str | None = None
    q_norm: str | None = None  # the query/key norms' weights, where the spec declares them and the checkpoint has them
    k_norm: str | None = None

    def name(self, role: str) -> str:
        """The full name of the tensor stored for ``role`` (``q``, ``k``, ``v``, ``o``, ``qkv``)."""
        name = getattr(self, role)
        assert name is not None, f"this layout stores no {role} tensor"
        return name


class KeyMap:
    """Finds the prefix and the layer count of a checkpoint for a spec."""

    def __init__(self, spec: ArchSpec, keys: Iterable[str]):
        self.spec = spec
        keys = list(keys)
        anchor = spec.layout.anchor
        pattern = re.compile(r"^(.*?)" + re.escape(spec.layers_path) + r"\.(\d+)\." + re.escape(anchor) + "$")
        prefixes: dict[str, set[int]] = {}
        for k in keys:
            m = pattern.match(k)
            if m and (m.group(1) == "" or m.group(1).endswith(".")):
                prefixes.setdefault(m.group(1), set()).add(int(m.group(2)))
        if not prefixes:
            raise HeadlensError(
                f"no {spec.family} attention weights found: expected tensors named like "
                f"'{spec.layers_path}.0.{anchor}'"
            )
        if len(prefixes) > 1:
            # A multimodal checkpoint (vision tower beside the language model): prefer the language model,
            # else the longest layer list.
            lm = [p for p in prefixes if "language_model" in p or "text_model" in p]
            best = lm[0] if lm else max(prefixes, key=lambda p: len(prefixes[p]))
        else:
            best = next(iter(prefixes))
        self.prefix = best
        layers = sorted(prefixes[best])
        if layers != list(range(len(layers))):
            raise HeadlensError(f"layer indices in the checkpoint are not contiguous: {layers}")
        self.num_layers = len(layers)
        self._keys = set(keys)

    def layer(self, layer: int) -> LayerKeys:
        """The full tensor names of ``layer``'s attention (and of the norm feeding it, when the checkpoint has it)."""
        s, p, lay = self.spec, self.prefix, self.spec.layout
        base = f"{p}{s.layers_path}.{layer}."
        norm: str | None = None
        if s.norm:
            norm = base + s.norm
            if norm not in self._keys and s.norm_alt:
                norm = base + s.norm_alt
        elif s.prev_norm and layer > 0:
            norm = f"{p}{s.layers_path}.{layer - 1}.{s.prev_norm}"
        elif s.first_norm:
            norm = p + s.first_norm
        def full(rel: str | None) -> str | None:
            return base + rel if rel else None

        qk = s.qk_norm
        q_norm, k_norm = (base + qk.q, base + qk.k) if qk is not None else (None, None)
        return LayerKeys(v=full(lay.v), o=base + lay.o, qkv=full(lay.qkv), norm=norm if norm in self._keys else None,
                         q=full(lay.q), k=full(lay.k), q_norm=q_norm if q_norm in self._keys else None,
                         k_norm=k_norm if k_norm in self._keys else None)

    def qk_norm_tensors(self, layer: int) -> list[str]:
        """The tensors of ``layer`` whose names look like a query or key norm (:data:`QK_NORM_PATTERN`), sorted."""
        base = f"{self.prefix}{self.spec.layers_path}.{layer}."
        return sorted(k for k in self._keys if k.startswith(base) and QK_NORM_PATTERN.search(k[len(base):]))
