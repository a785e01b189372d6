"""``headlens ov --circuit qk``: one head's QK circuit, its spectrum, and what a rank-k form changes in the logits.

Head h's bilinear form ``W_QK^h = (W_Q^h)^T W_K^g`` (d x d, rank <= hd; g the kv head h reads) gives the logit of a
query token x_s on a key token x_t as ``x_s^T W_QK x_t / sqrt(hd)``. It is factored like the OV circuit
(:func:`~headlens.circuits.spectrum.factored_svd` of ``A = (W_Q^h)^T`` (d, hd) and ``B = W_K^g`` (hd, d)), never
built. What the form is and is not (DOMAIN.md, "Keys under rotary position embeddings"):

- the form at relative position 0: rotary embeddings rotate q and k between the two factors at other offsets;
- norms on the projected q and k (Qwen3, Gemma 3, OLMo 2, Cohere, StableLM): their gains fold in,
  ``(diag(gamma_q) W_Q)^T (diag(gamma_k) W_K)`` (a LayerNorm's mean subtraction is linear and folds as well),
  their per-token scale cannot. A checkpoint with such norms that the spec does not place is refused;
- biases b_Q, b_K: the terms they add are not bilinear in the tokens, and are left out.

:func:`analyze_qk` returns a :class:`QKReport`; :func:`headlens.circuits.ov.analyze_ov` calls it for
``circuit="qk"`` or ``"both"``. The printed lines are :mod:`headlens.report.ov`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from headlens.circuits.heads import check_layer_head, norm_gain, read_qk_blocks
from headlens.circuits.spectrum import FactoredSVD, factored_svd, spectrum_block
from headlens.errors import HeadlensError
from headlens.io.checkpoint import Checkpoint

CIRCUITS = ("ov", "qk", "both")  # what `headlens ov` analyses: the OV circuit, the QK circuit, or both

# Tensor names (under one layer) of norms on the projected queries or keys, in any family's spelling.
_QK_NORM_NAME = re.compile(r"(^|[._])(q|k|query|key)_?(layer_?)?(norm|ln)([._]|$)")

_POSITION_NOTES = {
    "rotary": "rotary embeddings left out: this is the form at relative position 0 (q_s^T R_(t-s) k_t with t = s); "
              "at other offsets the rotation sits between the two factors",
    "alibi": "ALiBi's per-head bias on the distance, added to the logits, is left out",
    "relative_bias": "the learned relative-position bias added to the logits is left out",
    "absolute": "positions are absolute embeddings, already in the tokens the form reads: none left out",
}


@dataclass
class QKFactors:
    """``W_QK^h = W_Q^T W_K`` as its two thin factors, float64, the folded gains applied."""

    W_Q: torch.Tensor  # (hd, d): diag(gamma_q) [centred] W_Q^h [diag(gamma)]
    W_K: torch.Tensor  # (hd, d): diag(gamma_k) [centred] W_K^g [diag(gamma)]
    kv_head: int
    tensor_names: list[str]  # the q/k tensors read
    norm_key: str | None  # the pre-attention norm found (folded when ``fold_norm``)
    qk_norm_keys: list[str]  # the q/k norm gains folded in


@dataclass
class QKReport:
    """Every number ``headlens ov`` reports about one head's QK circuit (the ``qk`` block of its JSON). The spectral
    fields have the names of :class:`~headlens.circuits.ov.OVResult`'s."""

    kv_head: int  # g, the key head query head h reads
    shape: tuple[int, int]  # (d, d), the shape of W_QK (never built)
    tensors: list[str]  # the checkpoint tensors read (q, k)
    rank: int
    rank_tolerance: float
    rank_eps_dtype: str
    condition_number: float
    condition_number_definition: str
    singular_values: list[float]  # (hd,) descending
    cumulative_energy: list[float]  # (hd,)
    frobenius_norm: float
    latent_dim: int  # k
    rel_error: float  # ||W_QK - W_QK,k||_F / ||W_QK||_F
    norm_folded: bool  # the pre-attention norm's gain, folded into both factors
    norm_key: str | None
    qk_norm_keys: list[str]  # q/k norm gains folded in (always, where the checkpoint has them)
    biases: list[str]  # b_Q / b_K tensors of the checkpoint, left out of the form
    position: str  # how positions enter the logits: rotary, absolute, alibi, relative_bias
    logit_scale: float  # 1 / sqrt(hd), the scale of the prompt's logits below
    notes: list[str] = field(default_factory=list)  # what the form leaves out, in words
    prompt_tokens: int | None = None  # N tokens of the prompt (or traces) the logits are measured on
    prompt_positions: str | None = None  # "causal" (key <= query) or "all" (an encoder)
    prompt_logit_rel_error: float | None = None  # ||L - L_k||_F / ||L||_F over those positions
    prompt_attention_kl: float | None = None  # mean over queries of KL(softmax L || softmax L_k), nats


# ------------------------------------------------------------------------------------------ reading


def _declared(template: str | None) -> re.Pattern | None:
    """The spec's q/k norm name (``{h}``: a head index) as a pattern over relative names."""
    return None if template is None else re.compile(re.escape(template).replace(re.escape("{h}"), r"\d+") + "$")


def _norm_row(ck: Checkpoint, layer: int, template: str, head: int, n_heads: int) -> tuple[torch.Tensor, str] | None:
    """(gain (hd,) of head ``head``, tensor name), or None when the checkpoint has no such tensor. The stored gain
    may be (hd,) shared by every head, (n_heads * hd,) over all heads, or (n_heads, hd)."""
    hd = ck.shape.head_dim
    name = f"{ck.keymap.prefix}{ck.spec.layers_path}.{layer}.{template.format(h=head)}"
    if name not in ck.tensors:
        return None
    w = ck.tensors.read(name).to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise HeadlensError(f"tensor {name} has non-finite values (NaN/inf)")
    shape = tuple(w.shape)
    if shape == (n_heads * hd,) and n_heads > 1:
        if ck.spec.qk_norm_centered:  # a mean over every head's components: not a per-head map
            raise HeadlensError(f"{name} {shape}: a LayerNorm over all heads at once cannot be folded into one "
                                "head's W_QK")
        w = w[head * hd:(head + 1) * hd]
    elif shape == (n_heads, hd):
        w = w[head]
    elif shape != (hd,):
        raise HeadlensError(f"{name} has shape {shape}, expected ({hd},), ({n_heads * hd},) or ({n_heads}, {hd})")
    return w + ck.spec.norm_offset, name


def qk_norm_gains(ck: Checkpoint, layer: int, head: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """(gamma_q (hd,) of query head ``head``, gamma_k (hd,) of its kv head, the tensors read), each None where the
    checkpoint has no such norm. Refuses a checkpoint whose layer holds q/k norm weights the spec does not place:
    the form without their gains would be printed as if it were the model's."""
    spec, s = ck.spec, ck.shape
    base = f"{ck.keymap.prefix}{spec.layers_path}.{layer}."
    declared = [p for p in (_declared(spec.q_norm), _declared(spec.k_norm)) if p is not None]
    for name in ck.tensors.keys():
        rel = name[len(base):] if name.startswith(base) else None
        if rel is None or not rel.endswith("weight") or not _QK_NORM_NAME.search(rel):
            continue
        if not any(p.match(rel) for p in declared):
            raise HeadlensError(f"`circuit` qk: layer {layer} holds the query/key norm weight {name}, which the "
                                f"{spec.family} spec does not place, so its gain cannot be folded into W_QK; refusing "
                                "rather than reporting the unfolded form")
    q = _norm_row(ck, layer, spec.q_norm, head, s.num_heads) if spec.q_norm else None
    k = _norm_row(ck, layer, spec.k_norm, s.kv_head(head), s.num_kv_heads) if spec.k_norm else None
    return (q[0] if q else None, k[0] if k else None, [t[1] for t in (q, k) if t is not None])


def read_qk_head(ck: Checkpoint, layer: int, head: int, fold_norm: bool = False,
                 load_dtype: torch.dtype = torch.float32) -> QKFactors:
    """W_Q^h and W_K^g of query head ``head`` (each (hd, d), float64) with the q/k norm gains folded in, and the
    pre-attention norm's gain too when ``fold_norm`` (as :func:`~headlens.circuits.heads.read_head` folds it)."""
    check_layer_head(ck, layer, head)
    q, k, names = read_qk_blocks(ck, layer, head, load_dtype=load_dtype)
    gamma_q, gamma_k, qk_keys = qk_norm_gains(ck, layer, head)
    if ck.spec.qk_norm_centered:  # LayerNorm: x - mean(x) over the head's hd components, (I - 11^T / hd) W
        q = q - q.mean(0, keepdim=True) if gamma_q is not None else q
        k = k - k.mean(0, keepdim=True) if gamma_k is not None else k
    if gamma_q is not None:
        q = gamma_q.to(load_dtype).to(q.dtype)[:, None] * q  # diag(gamma_q) W_Q
    if gamma_k is not None:
        k = gamma_k.to(load_dtype).to(k.dtype)[:, None] * k
    gain, norm_key = norm_gain(ck, layer, q.dtype)
    if fold_norm:
        if gain is None:
            raise HeadlensError(f"`fold_norm`: no norm weight feeding layer {layer}'s attention was found in {ck.name}")
        g = gain.to(load_dtype).to(q.dtype)[None, :]
        q, k = q * g, k * g  # W_Q diag(gamma), W_K diag(gamma)
    return QKFactors(W_Q=q.contiguous(), W_K=k.contiguous(), kv_head=ck.shape.kv_head(head), tensor_names=names,
                     norm_key=norm_key, qk_norm_keys=qk_keys)


def qk_biases(ck: Checkpoint, layer: int) -> list[str]:
    """The query/key bias tensors ``layer`` has (a fused qkv bias holds both): what the form leaves out."""
    keys, lay = ck.layer_keys(layer), ck.spec.layout
    roles = ("qkv",) if lay.fused else ("q", "k")
    names = [keys.name(r)[: -len("weight")] + "bias" for r in roles if keys.name(r).endswith("weight")]
    return [n for n in names if n in ck.tensors]


# ------------------------------------------------------------------------------------------ computation


def prompt_logit_errors(svd: FactoredSVD, f: QKFactors, X: torch.Tensor, k: int, causal: bool,
                        scale: float) -> tuple[float, float]:
    """(relative Frobenius error of the rank-k logits, mean KL(full || rank-k) of the attention patterns) on tokens
    X (d, N): logits ``L = (W_Q X)^T (W_K X) * scale`` (N, N) query x key, against ``L_k`` from the top k singular
    triplets of W_QK, over the causal entries (key <= query) or, for an encoder, all of them."""
    X = X.to(torch.float64)
    n = X.shape[1]
    L = (f.W_Q @ X).T @ (f.W_K @ X) * scale  # (N, N)
    Lk = ((svd.U[:, :k].T @ X).T * svd.S[:k]) @ (svd.Vh[:k] @ X) * scale  # (N, k) diag(S_k) (k, N) -> (N, N)
    mask = torch.ones(n, n, dtype=torch.bool, device=X.device)
    mask = mask.tril() if causal else mask
    total = torch.linalg.norm(L[mask])
    rel = 0.0 if total == 0 else float(torch.linalg.norm((L - Lk)[mask]) / total)
    low = torch.tensor(-math.inf, dtype=L.dtype, device=L.device)
    logp = torch.log_softmax(torch.where(mask, L, low), -1)  # (N, N), -inf off the mask
    logq = torch.log_softmax(torch.where(mask, Lk, low), -1)
    kl = torch.where(mask, logp.exp() * (logp - logq), torch.zeros_like(L)).sum(-1)  # (N,) per query
    return rel, float(kl.mean())


def _notes(ck: Checkpoint, f: QKFactors, biases: list[str], position: str, fold_norm: bool) -> list[str]:
    """What the form leaves out (and folds in), one sentence each."""
    notes = [_POSITION_NOTES.get(position, f"positions ({position}) left out")]
    if f.qk_norm_keys:
        centred = "; their mean subtraction (LayerNorm) is linear and folded too" if ck.spec.qk_norm_centered else ""
        notes.append(f"q/k norm gains folded into W_Q / W_K ({', '.join(f.qk_norm_keys)}){centred}; their per-token "
                     "scale (1 / rms of each projected query and key) is left out")
    if fold_norm:
        notes.append(f"the pre-attention norm's gain ({f.norm_key}) is folded into both W_Q and W_K")
    elif f.norm_key:
        notes.append(f"the pre-attention norm's gain ({f.norm_key}) is not folded in (`fold_norm` folds it)")
    if biases:
        notes.append(f"biases b_Q, b_K ({', '.join(biases)}) left out: the logit terms they add are not bilinear "
                     "in the two tokens")
    config = ck.config or {}
    notes += [note for key, note in ck.spec.qk_notes if key == "" or config.get(key)]
    return [n for n in notes if n]


def analyze_qk(ck: Checkpoint, layer: int, head: int, latent_dim: int | None, default_latent: int,
               fold_norm: bool, dtype: torch.dtype, X: torch.Tensor | None = None,
               device: torch.device | None = None) -> QKReport:
    """Query head ``head``'s QK circuit in ``layer`` of the open checkpoint ``ck``, its weights rounded to ``dtype``.

    ``X`` (d, N): the tokens at the input of the layer's q/k projections (divided by the pre-attention norm's
    gain when ``fold_norm``, as :func:`headlens.circuits.ov.analyze_ov` hands them over); with them the rank-k
    form's logit error and attention KL are measured. Float64 on ``device`` (default the CPU).
    """
    f = read_qk_head(ck, layer, head, fold_norm=fold_norm, load_dtype=dtype)
    dev = device or torch.device("cpu")
    f.W_Q, f.W_K = f.W_Q.to(dev), f.W_K.to(dev)
    svd = factored_svd(f.W_Q.T, f.W_K)  # W_QK = U diag(S) Vh, (d, hd) (hd,) (hd, d)
    d, hd = ck.shape.hidden_size, ck.shape.head_dim
    block = spectrum_block(svd.S, d, dtype, latent_dim, default_latent, "W_QK", f"of layer {layer} head {head}")
    biases = qk_biases(ck, layer)
    position = ck.spec.position_kind(ck.config)
    scale = 1.0 / math.sqrt(hd)
    r = QKReport(kv_head=f.kv_head, shape=(d, d), tensors=f.tensor_names, **block, norm_folded=fold_norm,
                 norm_key=f.norm_key, qk_norm_keys=f.qk_norm_keys, biases=biases, position=position,
                 logit_scale=scale, notes=_notes(ck, f, biases, position, fold_norm))
    if X is not None:
        causal = ck.spec.decoder
        r.prompt_tokens = int(X.shape[1])
        r.prompt_positions = "causal" if causal else "all"
        r.prompt_logit_rel_error, r.prompt_attention_kl = prompt_logit_errors(svd, f, X.to(dev), r.latent_dim,
                                                                             causal, scale)
    return r
