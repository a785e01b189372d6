"""Architecture table: where each family keeps its attention weights, keyed by ``model_type``.

Every difference between families that headlens cares about lives in :data:`SPECS`; the rest of the
code reads tensors through a spec and never branches on the family name.

Tensor names are relative to one layer: the full key is ``<prefix><layers_path>.<l>.<name>``, where the
prefix (``model.``, ``transformer.``, ``bert.``, or nothing) is discovered from the checkpoint itself.
Weight layouts (HuggingFace, ``nn.Linear.weight`` is ``[out, in]``):

- ``separate``: ``v`` is ``[G*hd, d]``, ``o`` is ``[d, H*hd]`` (Llama, Qwen, Mistral, Gemma, MoE families, BERT).
- ``fused_concat``: ``qkv`` is ``[(H + 2G)*hd, d]`` laid out q | k | v (Phi-3).
- ``conv1d``: GPT-2 ``Conv1D`` stores ``[in, out]``: ``c_attn`` is ``[d, 3*H*hd]`` (q | k | v columns),
  ``c_proj`` is ``[H*hd, d]``.
- ``interleaved``: GPT-NeoX ``query_key_value`` is ``[H*3*hd, d]``, per head ``[q_h; k_h; v_h]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from headlens.errors import HeadlensError


@dataclass(frozen=True)
class ArchSpec:
    """How one family stores and runs attention."""

    family: str  # a readable family name
    layers_path: str  # dotted path of the layer list, e.g. "layers", "h", "encoder.layer"
    layout: str  # "separate" | "fused_concat" | "conv1d" | "interleaved"
    q: str = "self_attn.q_proj.weight"  # query projection (separate layout)
    k: str = "self_attn.k_proj.weight"  # key projection (separate layout)
    v: str = "self_attn.v_proj.weight"  # value projection (separate layout)
    o: str = "self_attn.o_proj.weight"  # output projection
    qkv: str | None = None  # fused projection (other layouts)
    attn_module: str = "self_attn"  # module whose first input is the attention input (for hooks)
    # Norm whose output feeds the attention: relative to the same layer (pre-norm families), or, for
    # post-norm encoders, the previous layer's output norm (``prev_norm``) and the embedding norm.
    norm: str | None = "input_layernorm.weight"
    prev_norm: str | None = None
    first_norm: str | None = None  # relative to the prefix (outside the layer list)
    norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (1 + weight)
    decoder: bool = True
    # Residual structure of one layer and the modules (relative to the layer) whose hooks give each site:
    #   "pre": x + attn(norm(x)), then + mlp(norm(.))              (Llama, Qwen, Mistral, MoE families, GPT-2)
    #   "sandwich": like "pre" but each branch output is normed before the add           (Gemma 2/3)
    #   "parallel": x + attn(norm1(x)) + mlp(norm2(x))                                    (GPT-NeoX)
    #   "post": norm(x + attn(x)), then norm(. + mlp(.))                                  (BERT)
    residual: str = "pre"
    attn_out: str = "self_attn"  # forward hook, output (or output[0]): what attention adds to the stream
    mlp_out: str = "mlp"  # forward hook, output: what the MLP adds to the stream
    mid_input: str | None = "post_attention_layernorm"  # forward pre-hook, first input: resid_mid
    final_norm: str | None = "norm"  # relative to the layer list's parent; forward hook, output
    parallel_flag: str | None = None  # config flag that turns the residual "parallel" (then no resid_mid)
    aliases: tuple[str, ...] = field(default=())


_LLAMA = dict(layers_path="layers", layout="separate")
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
    "olmoe": ArchSpec("OLMoE", **_LLAMA),
    "gemma": ArchSpec("Gemma", norm_offset=1.0, **_LLAMA),
    "gemma2": ArchSpec("Gemma 2", norm_offset=1.0, **_SANDWICH, **_LLAMA),
    "gemma3_text": ArchSpec("Gemma 3", norm_offset=1.0, **_SANDWICH, **_LLAMA),
    "phi3": ArchSpec(
        "Phi-3", layers_path="layers", layout="fused_concat", qkv="self_attn.qkv_proj.weight", v=""
    ),
    "gpt2": ArchSpec(
        "GPT-2",
        layers_path="h",
        layout="conv1d",
        qkv="attn.c_attn.weight",
        v="",
        o="attn.c_proj.weight",
        attn_module="attn",
        norm="ln_1.weight",
        attn_out="attn",
        mid_input="ln_2",
        final_norm="ln_f",
    ),
    "gpt_neox": ArchSpec(
        "GPT-NeoX/Pythia",
        layers_path="layers",
        layout="interleaved",
        qkv="attention.query_key_value.weight",
        v="",
        o="attention.dense.weight",
        attn_module="attention",
        residual="parallel",
        attn_out="attention",
        final_norm="final_layer_norm",
        parallel_flag="use_parallel_residual",
    ),
    "bert": ArchSpec(
        "BERT",
        layers_path="encoder.layer",
        layout="separate",
        q="attention.self.query.weight",
        k="attention.self.key.weight",
        v="attention.self.value.weight",
        o="attention.output.dense.weight",
        attn_module="attention.self",
        norm=None,
        prev_norm="output.LayerNorm.weight",
        first_norm="embeddings.LayerNorm.weight",
        decoder=False,
        residual="post",
        attn_out="attention.output.dense",
        mlp_out="output.dense",
        mid_input="intermediate",
        final_norm=None,
    ),
}
SPECS["roberta"] = SPECS["bert"]
SPECS["xlm-roberta"] = SPECS["bert"]
# Multimodal wrappers whose text model is one of the above.
SPECS["gemma3"] = SPECS["gemma3_text"]

GENERIC = ArchSpec("generic (self_attn.{q,k,v,o}_proj)", **_LLAMA)


def supported_types() -> list[str]:
    """The ``model_type`` values with an explicit spec, sorted."""
    return sorted(SPECS)


def spec_for_type(model_type: str | None, keys: Iterable[str] | None = None) -> ArchSpec:
    """Spec for ``model_type``; an unknown type that uses ``self_attn.{q,k,v,o}_proj`` gets :data:`GENERIC`.

    Raises HeadlensError listing the supported types otherwise.
    """
    if model_type in SPECS:
        return SPECS[model_type]
    if keys is not None and any(k.endswith("self_attn.v_proj.weight") for k in keys):
        return GENERIC
    raise HeadlensError(
        f"unsupported architecture {model_type!r}: supported model types are "
        f"{', '.join(supported_types())}, or any model whose layers use self_attn.{{q,k,v,o}}_proj"
    )


def detect_spec(keys: Iterable[str]) -> tuple[str, ArchSpec]:
    """Guess the family of a bare state dict (no config) from its tensor names."""
    keys = list(keys)
    probes = [
        ("qwen3", "self_attn.v_proj.weight"),  # any llama-like family: same layout
        ("phi3", "self_attn.qkv_proj.weight"),
        ("gpt2", "attn.c_attn.weight"),
        ("gpt_neox", "attention.query_key_value.weight"),
        ("bert", "attention.self.value.weight"),
    ]
    for model_type, suffix in probes:
        if any(k.endswith(suffix) for k in keys):
            spec = SPECS[model_type] if model_type != "qwen3" else GENERIC
            return (model_type if model_type != "qwen3" else "unknown"), spec
    raise HeadlensError(
        "cannot recognise the architecture from the tensor names (no self_attn.v_proj, qkv_proj, "
        "attn.c_attn, attention.query_key_value or attention.self.value weights); supported model types "
        f"are {', '.join(supported_types())}"
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


class KeyMap:
    """Finds the prefix and the layer count of a checkpoint for a spec."""

    def __init__(self, spec: ArchSpec, keys: Iterable[str]):
        self.spec = spec
        keys = list(keys)
        anchor = spec.v if spec.layout == "separate" else spec.qkv
        assert anchor
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
        s, p = self.spec, self.prefix
        base = f"{p}{s.layers_path}.{layer}."
        norm: str | None = None
        if s.norm:
            norm = base + s.norm
        elif s.prev_norm and layer > 0:
            norm = f"{p}{s.layers_path}.{layer - 1}.{s.prev_norm}"
        elif s.first_norm:
            norm = p + s.first_norm
        return LayerKeys(
            v=base + s.v if s.layout == "separate" else None,
            o=base + s.o,
            qkv=base + s.qkv if s.qkv else None,
            norm=norm if norm in self._keys else None,
            q=base + s.q if s.layout == "separate" else None,
            k=base + s.k if s.layout == "separate" else None,
        )
