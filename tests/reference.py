"""Independent dense float64 references, written from the HuggingFace modules directly.

Nothing here imports headlens: the per-family splits are written out again from the modeling code so
that a layout mistake in ``headlens.arch``/``headlens.circuits.heads`` cannot hide behind a shared helper.
"""

from __future__ import annotations

import numpy as np
import torch


def _layers(model):
    base = getattr(model, "base_model", model)
    for path in ("layers", "h", "encoder.layer", "decoder.layers", "transformer.layer", "encoder.block",
                 "model.layers"):  # model.layers: Llama4ForCausalLM, whose base_model is itself
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError(f"no layer list in {type(model).__name__}")


def attention_module(model, family: str, layer: int):
    blk = _layers(model)[layer]
    if family in ("gpt2", "gptj", "gpt_neo", "gpt_bigcode"):
        return blk.attn
    if family in ("gpt_neox", "distilbert"):
        return blk.attention
    if family == "bert":
        return blk.attention.self
    if family in ("falcon", "falcon_mq", "falcon_rw", "bloom"):
        return blk.self_attention
    if family == "t5":
        return blk.layer[0].SelfAttention
    return blk.self_attn


def _w(linear) -> np.ndarray:
    return linear.weight.detach().double().numpy()


def _fused_value_rows(model, family: str, blk, H: int, d: int, hd: int) -> tuple[np.ndarray, int]:
    """(every kv head's value rows (G*hd, d), G) of the fused q/k/v families, as each modeling file splits them."""
    cfg = model.config
    if family.startswith("falcon") or family == "bloom":
        W = _w(blk.self_attention.query_key_value)
        if family == "falcon":  # _split_heads, new decoder: view(-1, H/G + 2, hd), value = [..., -1, :]
            G = cfg.num_kv_heads
            return W.reshape(G, H // G + 2, hd, d)[:, -1].reshape(G * hd, d), G
        if family == "falcon_mq":  # multi_query: view(H + 2, hd), value = [..., -1, :]
            return W.reshape(H + 2, hd, d)[-1], 1
        return W.reshape(H, 3, hd, d)[:, 2].reshape(H * hd, d), H  # view(H, 3, hd)
    assert family == "gpt_bigcode"
    W = _w(blk.attn.c_attn)
    if cfg.multi_query:  # split((embed_dim, kv_dim, kv_dim))
        return W[d + hd:], 1
    return W.reshape(H, 3 * hd, d)[:, 2 * hd:].reshape(H * hd, d), H  # view(H, 3*hd).split(3 * [hd])


# family -> (attention module of a layer, value projection, output projection), separate projections
_SEPARATE = {
    "gptj": (lambda b: b.attn, "v_proj", "out_proj"),
    "gpt_neo": (lambda b: b.attn.attention, "v_proj", "out_proj"),
    "opt": (lambda b: b.self_attn, "v_proj", "out_proj"),
    "phi": (lambda b: b.self_attn, "v_proj", "dense"),
    "distilbert": (lambda b: b.attention, "v_lin", "out_lin"),
    "t5": (lambda b: b.layer[0].SelfAttention, "v", "o"),
}


def value_output_blocks(model, family: str, layer: int) -> tuple[list[np.ndarray], np.ndarray, int, int, int]:
    """Per kv head W_V^g (hd x d) list, full W_O (d x H*hd) in Linear layout, and (H, G, hd). float64."""
    cfg = model.config
    blk = _layers(model)[layer]
    H = cfg.num_attention_heads
    if family == "gpt2":
        d = cfg.n_embd
        hd = d // H
        W = blk.attn.c_attn.weight.detach().double().numpy()  # Conv1D: (in=d, out=3d)
        v_full = W[:, 2 * d:].T  # (d_out=H*hd, d_in)
        o_full = blk.attn.c_proj.weight.detach().double().numpy().T  # Conv1D (in=H*hd, out=d) -> (d, H*hd)
        G = H
    elif family == "gpt_neox":
        d = cfg.hidden_size
        hd = d // H
        W = blk.attention.query_key_value.weight.detach().double().numpy()  # (H*3*hd, d)
        v_full = W.reshape(H, 3, hd, d)[:, 2].reshape(H * hd, d)
        o_full = blk.attention.dense.weight.detach().double().numpy()
        G = H
    elif family == "bert":
        d = cfg.hidden_size
        hd = d // H
        v_full = blk.attention.self.value.weight.detach().double().numpy()
        o_full = blk.attention.output.dense.weight.detach().double().numpy()
        G = H
    elif family in ("falcon", "falcon_mq", "falcon_rw", "bloom", "gpt_bigcode"):
        d = cfg.hidden_size
        hd = d // H
        v_full, G = _fused_value_rows(model, family, blk, H, d, hd)
        o_full = _w(blk.attn.c_proj) if family == "gpt_bigcode" else _w(blk.self_attention.dense)
    elif family in _SEPARATE:
        get, v_name, o_name = _SEPARATE[family]
        a = get(blk)
        v_full, o_full = _w(getattr(a, v_name)), _w(getattr(a, o_name))
        hd = o_full.shape[1] // H  # T5: d_kv, which need not be d_model / H
        G = v_full.shape[0] // hd
    elif family == "phi3":
        d = cfg.hidden_size
        hd = d // H
        G = cfg.num_key_value_heads
        W = blk.self_attn.qkv_proj.weight.detach().double().numpy()
        _, _, v_full = np.split(W, [H * hd, H * hd + G * hd], axis=0)
        o_full = blk.self_attn.o_proj.weight.detach().double().numpy()
    else:
        attn = blk.self_attn
        v_full = attn.v_proj.weight.detach().double().numpy()
        o_full = attn.o_proj.weight.detach().double().numpy()
        hd = attn.head_dim
        G = v_full.shape[0] // hd
    v_blocks = [v_full[g * hd:(g + 1) * hd] for g in range(G)]
    return v_blocks, o_full, H, G, hd


def dense_wov(model, family: str, layer: int, head: int) -> np.ndarray:
    """The explicit d x d float64 matrix W_O^h W_V^{h // (H/G)}."""
    v_blocks, o_full, H, G, hd = value_output_blocks(model, family, layer)
    g = head // (H // G)
    return o_full[:, head * hd:(head + 1) * hd] @ v_blocks[g]


def attention_norm(model, family: str, layer: int):
    """The norm module whose output the layer's attention reads, or None where it reads the stream itself (OLMo 2,
    post-norm BERT/DistilBERT, whose attention reads the previous layer's output norm)."""
    blk = _layers(model)[layer]
    if family in ("gpt2", "gptj", "gpt_neo", "gpt_bigcode"):
        return blk.ln_1
    if family == "falcon":  # new decoder: ln_attn beside ln_mlp
        return blk.ln_attn
    if family == "opt":
        return blk.self_attn_layer_norm
    if family == "t5":
        return blk.layer[0].layer_norm
    if family in ("olmo2", "bert", "distilbert"):
        return None
    return blk.input_layernorm


def norm_gain(model, family: str, layer: int) -> np.ndarray | None:
    """Effective gain of the norm feeding the layer's attention (Gemma: 1 + weight); None where it has none."""
    if family in ("bert", "distilbert"):
        if layer == 0:
            return model.embeddings.LayerNorm.weight.detach().double().numpy()
        prev = _layers(model)[layer - 1]
        return (prev.output.LayerNorm if family == "bert" else prev.output_layer_norm).weight.detach().double().numpy()
    norm = attention_norm(model, family, layer)
    if norm is None or getattr(norm, "weight", None) is None:  # OLMo's LayerNorm has no parameters
        return None
    w = norm.weight.detach().double().numpy()
    return 1.0 + w if family.startswith("gemma") else w


def dense_svals(W: np.ndarray, k: int | None = None) -> np.ndarray:
    s = np.linalg.svd(W, compute_uv=False)
    return s if k is None else s[:k]


def capture_attention_io(model, family: str, layer: int, input_ids: torch.Tensor, zero_input: bool = False):
    """(input, output) of the attention module for ``input_ids``; optionally with its input replaced by 0."""
    attn = attention_module(model, family, layer)
    seen = {}

    def pre(_m, args, kwargs):
        if "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
            if zero_input:
                kwargs = dict(kwargs, hidden_states=torch.zeros_like(x))
                seen["x"] = x.detach().clone()
                return args, kwargs
        else:
            x = args[0]
            if zero_input:
                seen["x"] = x.detach().clone()
                return (torch.zeros_like(x),) + tuple(args[1:]), kwargs
        seen["x"] = x.detach().clone()
        return None

    def post(_m, _a, _k, out):
        seen["y"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    h1 = attn.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = attn.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        h1.remove()
        h2.remove()
    y = seen["y"][0].double()
    if family == "bert":  # BertSelfAttention returns the per-head context; its output map is a separate module
        y = y @ _layers(model)[layer].attention.output.dense.weight.detach().double().T
    return seen["x"][0].double().numpy(), y.numpy()


def query_key_blocks(model, family: str, layer: int) -> tuple[list[np.ndarray], list[np.ndarray], int, int, int]:
    """Per query head W_Q^h (hd x d) list, per kv head W_K^g (hd x d) list, and (H, G, hd), float64, split as each
    modeling file splits its projections (no q/k norm applied)."""
    cfg = model.config
    blk = _layers(model)[layer]
    H = cfg.num_attention_heads
    if family == "gpt2":
        d = cfg.n_embd
        hd, G = d // H, H
        W = _w(blk.attn.c_attn)  # Conv1D: (in=d, out=3d), columns q | k | v
        q_full, k_full = W[:, :d].T, W[:, d:2 * d].T
    elif family == "gpt_neox":
        d = cfg.hidden_size
        hd, G = d // H, H
        W = _w(blk.attention.query_key_value).reshape(H, 3, hd, d)  # view(H, 3 * hd) then split
        q_full, k_full = W[:, 0].reshape(H * hd, d), W[:, 1].reshape(H * hd, d)
    elif family == "phi3":
        d = cfg.hidden_size
        hd, G = d // H, cfg.num_key_value_heads
        W = _w(blk.self_attn.qkv_proj)
        q_full, k_full = W[: H * hd], W[H * hd: H * hd + G * hd]
    elif family == "bert":
        d = cfg.hidden_size
        hd, G = d // H, H
        q_full, k_full = _w(blk.attention.self.query), _w(blk.attention.self.key)
    else:
        attn = blk.self_attn
        q_full, k_full = _w(attn.q_proj), _w(attn.k_proj)
        hd = attn.head_dim
        G = k_full.shape[0] // hd
    return ([q_full[h * hd:(h + 1) * hd] for h in range(H)], [k_full[g * hd:(g + 1) * hd] for g in range(G)], H, G, hd)


def qk_norm_maps(model, family: str, layer: int, head: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(M_q, M_k), each hd x hd or None: the linear part of the norm the family applies to head ``head``'s projected
    query and to its kv head's key (gain, and centring for LayerNorms), written from the modeling code."""
    attn = getattr(_layers(model)[layer], "self_attn", None)
    if attn is None or not (hasattr(attn, "q_norm") or hasattr(attn, "q_layernorm")):
        return None, None
    H, hd = model.config.num_attention_heads, attn.head_dim
    g = head // (H // (attn.k_proj.weight.shape[0] // hd))
    center = np.eye(hd) - np.ones((hd, hd)) / hd
    if family == "stablelm" and hasattr(attn, "q_layernorm"):  # one nn.LayerNorm per head
        return (np.diag(attn.q_layernorm.norms[head].weight.detach().double().numpy()) @ center,
                np.diag(attn.k_layernorm.norms[g].weight.detach().double().numpy()) @ center)
    wq, wk = attn.q_norm.weight.detach().double().numpy(), attn.k_norm.weight.detach().double().numpy()
    if family == "cohere":  # CohereLayerNorm over (heads, hd): per head, mean subtracted
        return np.diag(wq[head]) @ center, np.diag(wk[g]) @ center
    if family in ("olmo2", "olmoe"):  # RMSNorm over the whole projection (H*hd, G*hd)
        return np.diag(wq[head * hd:(head + 1) * hd]), np.diag(wk[g * hd:(g + 1) * hd])
    off = 1.0 if family.startswith("gemma") else 0.0  # Gemma3RMSNorm: (1 + w)
    return np.diag(wq + off), np.diag(wk + off)


def dense_wqk(model, family: str, layer: int, head: int, fold_norm: bool = False) -> np.ndarray:
    """The explicit d x d float64 form (M_q W_Q^h)^T (M_k W_K^g), the q/k norms' linear parts M folded in, and
    diag(gamma) of the pre-attention norm on both sides when ``fold_norm``."""
    qs, ks, H, G, _ = query_key_blocks(model, family, layer)
    Wq, Wk = qs[head], ks[head // (H // G)]
    Mq, Mk = qk_norm_maps(model, family, layer, head)
    Wq = Wq if Mq is None else Mq @ Wq
    Wk = Wk if Mk is None else Mk @ Wk
    W = Wq.T @ Wk
    if fold_norm:
        gamma = norm_gain(model, family, layer)
        W = gamma[:, None] * W * gamma[None, :]
    return W
