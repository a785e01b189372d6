"""Architecture table: where each family keeps its attention weights, keyed by ``model_type``.

Every difference between families that headlens cares about lives in :data:`SPECS`; the rest of the
code reads tensors through a spec and never branches on the family name.

Tensor names are relative to one layer: the full key is ``<prefix><layers_path>.<l>.<name>``, where the
prefix (``model.``, ``transformer.``, ``bert.``, or nothing) is discovered from the checkpoint itself.
Each spec's :class:`Layout` says which tensors hold q/k/v/o and how their rows are ordered (HuggingFace,
``nn.Linear.weight`` is ``[out, in]``), and it is the one splitter every reader goes through:

- separate (Llama, Qwen, Mistral, Gemma, MoE families, BERT): ``v`` is ``[G*hd, d]``, ``o`` is ``[d, H*hd]``.
- fused concat (Phi-3): ``qkv`` is ``[(H + 2G)*hd, d]`` laid out q | k | v.
- fused concat, transposed (GPT-2 ``Conv1D`` stores ``[in, out]``): ``c_attn`` is ``[d, 3*H*hd]`` (q | k | v
  columns), ``c_proj`` is ``[H*hd, d]``.
- fused interleaved (GPT-NeoX): ``query_key_value`` is ``[H*3*hd, d]``, per head ``[q_h; k_h; v_h]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from headlens.errors import HeadlensError

if TYPE_CHECKING:
    import torch

QKV = ("q", "k", "v")
Index = tuple[slice, slice]


@dataclass(frozen=True)
class Block:
    """Where one head's block of a projection lies in the tensor that stores it."""

    tensor: str  # role of the stored tensor: "q", "k", "v", "o" or "qkv"
    index: Index  # (rows, columns) of the stored tensor to read
    transposed: bool  # stored [in, out]: transpose what is read to get the Linear-layout block


@dataclass(frozen=True)
class LayerSplit:
    """One layer's projections split per head, Linear layout, as views of the stored tensors where possible."""

    W_Q: "torch.Tensor | None"  # (H, hd, d); None when q was not read
    W_K: "torch.Tensor | None"  # (G, hd, d); None when k was not read
    W_V: "torch.Tensor"  # (G, hd, d)
    W_O: "torch.Tensor"  # (H, d, hd)


@dataclass(frozen=True)
class Layout:
    """How a family stores one layer's q/k/v/o projections (names relative to the layer).

    Either ``q``, ``k`` and ``v`` are separate tensors, or ``qkv`` fuses them; the methods turn that into the
    slice of one head's block (:meth:`head_block`), the split of a whole layer (:meth:`split`), the expected
    stored shapes (:meth:`shapes`) and the kv-head count the stored shapes imply (:meth:`kv_heads`).
    """

    name: str  # a label: "separate", "fused_concat", "conv1d", "interleaved"
    o: str  # output projection: [d, H*hd] ([H*hd, d] when ``transposed``)
    q: str | None = None  # separate query projection [H*hd, d]
    k: str | None = None  # separate key projection [G*hd, d]
    v: str | None = None  # separate value projection [G*hd, d]
    qkv: str | None = None  # fused projection: [(H + 2G)*hd, d] rows ([d, (H + 2G)*hd] when ``transposed``)
    interleaved: bool = False  # fused rows per head [q_h; k_h; v_h] (GPT-NeoX) instead of blocks q | k | v
    transposed: bool = False  # every tensor stored [in, out], as GPT-2's Conv1D does
    grouped: bool = True  # a fused qkv may hold G < H kv heads (Phi-3); False: it always holds H (G = H)

    def __post_init__(self) -> None:
        separate = self.q is not None and self.k is not None and self.v is not None
        if separate == (self.qkv is not None) or (self.qkv is None and self.interleaved):
            raise ValueError(f"layout {self.name}: give q, k and v, or one fused qkv")
        if self.interleaved and self.grouped:
            raise ValueError(f"layout {self.name}: interleaved q/k/v rows hold one kv head per query head")

    @property
    def fused(self) -> bool:
        """True when one tensor ``qkv`` holds q, k and v."""
        return self.qkv is not None

    @property
    def anchor_role(self) -> str:
        """The role of the tensor every layer has and shape inference reads with ``o``: ``v``, or ``qkv``."""
        return "qkv" if self.fused else "v"

    @property
    def anchor(self) -> str:
        """The relative name of the :attr:`anchor_role` tensor."""
        name = getattr(self, self.anchor_role)
        assert name is not None
        return name

    def stored(self, with_qk: bool = True) -> tuple[str, ...]:
        """Roles of the stored tensors a whole-layer read needs, in reading order."""
        if self.fused:
            return ("qkv", "o")
        return ("v", "o", "q", "k") if with_qk else ("v", "o")

    def shapes(self, H: int, G: int, hd: int, d: int) -> dict[str, tuple[int, int]]:
        """The stored shape of every tensor of the layout (role -> shape) for H query and G kv heads."""
        def stored(rows: int, cols: int) -> tuple[int, int]:  # Linear layout [rows, cols] as stored
            return (cols, rows) if self.transposed else (rows, cols)

        out = stored(d, H * hd)
        if not self.fused:
            return {"q": stored(H * hd, d), "k": stored(G * hd, d), "v": stored(G * hd, d), "o": out}
        return {"qkv": stored((H + 2 * G) * hd, d), "o": out}

    def _rows(self, role: str, head: int, H: int, G: int, hd: int) -> slice:
        """Linear-layout rows of query head (q) or kv head (k, v) ``head`` in the tensor that stores ``role``."""
        if not self.fused:
            start = head * hd
        elif self.interleaved:  # per head [q_h; k_h; v_h]
            start = (3 * head + QKV.index(role)) * hd
        else:  # q (H heads) | k (G heads) | v (G heads)
            start = ({"q": 0, "k": H, "v": H + G}[role] + head) * hd
        return slice(start, start + hd)

    def head_block(self, role: str, head: int, H: int, G: int, hd: int) -> Block:
        """Where ``role``'s block of one head is stored: query head ``head`` for q and o, kv head ``head``
        for k and v. Reading ``index`` (then ``.T`` when ``transposed``) gives ``(hd, d)`` for q/k/v and
        ``(d, hd)`` for o."""
        whole = slice(None)
        if role == "o":
            cols = slice(head * hd, (head + 1) * hd)
            return Block("o", (cols, whole) if self.transposed else (whole, cols), self.transposed)
        rows = self._rows(role, head, H, G, hd)
        tensor = "qkv" if self.fused else role
        return Block(tensor, (whole, rows) if self.transposed else (rows, whole), self.transposed)

    def split(self, stored: Mapping[str, "torch.Tensor"], H: int, G: int, hd: int, d: int) -> LayerSplit:
        """Per-head W_Q (H, hd, d), W_K (G, hd, d), W_V (G, hd, d), W_O (H, d, hd) from the stored tensors
        (role -> tensor, shapes as :meth:`shapes` says). W_Q/W_K are None when a separate q/k was not read."""
        def linear(role: str) -> "torch.Tensor | None":  # the stored tensor in Linear layout [out, in]
            t = stored.get(role)
            return t.T if t is not None and self.transposed else t

        W_O = linear("o").reshape(d, H, hd).permute(1, 0, 2)  # (d, H*hd) -> (H, d, hd)
        if not self.fused:
            q, k = linear("q"), linear("k")
            return LayerSplit(W_Q=q.reshape(H, hd, d) if q is not None else None,  # (H, hd, d)
                              W_K=k.reshape(G, hd, d) if k is not None else None,  # (G, hd, d)
                              W_V=linear("v").reshape(G, hd, d), W_O=W_O)  # (G, hd, d)
        qkv = linear("qkv")  # ((H + 2G)*hd, d)
        if self.interleaved:
            per = qkv.reshape(H, 3, hd, d)  # (H, [q, k, v], hd, d)
            q, k, v = (per[:, i].contiguous() for i in range(3))  # each (H, hd, d): rows are strided, copy
            return LayerSplit(W_Q=q, W_K=k, W_V=v, W_O=W_O)
        q, k, v = qkv[: H * hd], qkv[H * hd: (H + G) * hd], qkv[(H + G) * hd:]
        return LayerSplit(W_Q=q.reshape(H, hd, d), W_K=k.reshape(G, hd, d), W_V=v.reshape(G, hd, d),  # (., hd, d)
                          W_O=W_O)

    def widths(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int]:
        """(hidden size d, total head width H*hd, Linear-layout rows of the value or fused block) from the
        stored 2-D shapes of ``o`` and ``v``/``qkv`` (role -> shape)."""
        o, rows_of = shapes["o"], shapes[self.anchor_role]
        width, d = o if self.transposed else o[::-1]
        return d, width, rows_of[1] if self.transposed else rows_of[0]

    def kv_heads(self, rows: int, H: int, hd: int) -> int:
        """G from the Linear-layout rows of the value (or fused) block, for H query heads of dim ``hd``.

        Raises HeadlensError, pointing at ``num_heads``, when the rows do not fit the layout."""
        if not self.fused:
            if rows % hd:
                raise HeadlensError(f"value projection has {rows} rows, not a multiple of head_dim {hd}: "
                                    f"check `num_heads`")
            return rows // hd
        if not self.grouped:  # q, k, v fused for every head: no GQA
            if rows != 3 * H * hd:
                raise HeadlensError(f"fused qkv has {rows} outputs, expected 3 * {H} * {hd}: check `num_heads`")
            return H
        extra = rows - H * hd
        if rows % hd or extra <= 0 or extra % (2 * hd):
            raise HeadlensError(f"fused qkv projection has {rows} rows, which is not (H + 2G) * head_dim for "
                                f"H={H}, head_dim={hd}: check `num_heads`")
        return extra // (2 * hd)


_ATTN = "self_attn."
SEPARATE = Layout("separate", q=_ATTN + "q_proj.weight", k=_ATTN + "k_proj.weight", v=_ATTN + "v_proj.weight",
                  o=_ATTN + "o_proj.weight")
FUSED_CONCAT = Layout("fused_concat", qkv=_ATTN + "qkv_proj.weight", o=_ATTN + "o_proj.weight")
CONV1D = Layout("conv1d", qkv="attn.c_attn.weight", o="attn.c_proj.weight", transposed=True, grouped=False)
INTERLEAVED = Layout("interleaved", qkv="attention.query_key_value.weight", o="attention.dense.weight",
                     interleaved=True, grouped=False)
BERT_SEPARATE = Layout("separate", q="attention.self.query.weight", k="attention.self.key.weight",
                       v="attention.self.value.weight", o="attention.output.dense.weight")


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
    #   "sandwich": like "pre" but each branch output is normed before the add           (Gemma 2/3)
    #   "parallel": x + attn(norm1(x)) + mlp(norm2(x))                                    (GPT-NeoX)
    #   "post": norm(x + attn(x)), then norm(. + mlp(.))                                  (BERT)
    residual: str = "pre"  # one of the four residual structures above
    attn_out: str = "self_attn"  # forward hook, output (or output[0]): what attention adds to the stream
    mlp_out: str = "mlp"  # forward hook, output: what the MLP adds to the stream
    mid_input: str | None = "post_attention_layernorm"  # forward pre-hook, first input: resid_mid
    final_norm: str | None = "norm"  # relative to the layer list's parent; forward hook, output
    parallel_flag: str | None = None  # config flag that turns the residual "parallel" (then no resid_mid)


_LLAMA = dict(layers_path="layers", layout=SEPARATE)
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
    "phi3": ArchSpec("Phi-3", layers_path="layers", layout=FUSED_CONCAT),
    # Each entry below: where the weights are, then the norm feeding attention, then the residual sites.
    "gpt2": ArchSpec("GPT-2", layers_path="h", layout=CONV1D, attn_module="attn",
                     norm="ln_1.weight",
                     attn_out="attn", mid_input="ln_2", final_norm="ln_f"),
    "gpt_neox": ArchSpec("GPT-NeoX/Pythia", layers_path="layers", layout=INTERLEAVED, attn_module="attention",
                         residual="parallel", parallel_flag="use_parallel_residual",
                         attn_out="attention", final_norm="final_layer_norm"),
    "bert": ArchSpec("BERT", layers_path="encoder.layer", layout=BERT_SEPARATE, attn_module="attention.self",
                     norm=None, prev_norm="output.LayerNorm.weight", first_norm="embeddings.LayerNorm.weight",
                     decoder=False, residual="post",
                     attn_out="attention.output.dense", mlp_out="output.dense", mid_input="intermediate",
                     final_norm=None),
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
    if keys is not None and any(k.endswith(GENERIC.layout.anchor) for k in keys):
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
        elif s.prev_norm and layer > 0:
            norm = f"{p}{s.layers_path}.{layer - 1}.{s.prev_norm}"
        elif s.first_norm:
            norm = p + s.first_norm
        def full(rel: str | None) -> str | None:
            return base + rel if rel else None

        return LayerKeys(v=full(lay.v), o=base + lay.o, qkv=full(lay.qkv), norm=norm if norm in self._keys else None,
                         q=full(lay.q), k=full(lay.k))
