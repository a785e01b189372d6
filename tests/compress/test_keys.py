"""Key latents (issue 23): fitted from query/key moments, measured where attention receives the keys.

Independent references: the queries and keys read in the test from the projection's own output (split by hand),
a dense float64 SVD of the stacked QK operator built from the raw weights, an exact average over rotations built
with the family's own rotary function, and HuggingFace's own forward pass (k = head_dim changes nothing).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import FAMILIES, variants_of

from headlens.compress.keys import (cut_keys, plain_moments, plan_keys, rotation_average)
from headlens.compress.key_attention import key_attention
from headlens.compress.qk_capture import turn
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

ENCODERS = {"bert", "distilbert", "t5"}
OWN_ATTENTION = {"gptj", "falcon", "falcon_mq", "falcon_rw", "bloom", "gpt_neo"}
COMPLEX_ROTARY = {"llama4"}  # rotary as complex products (freqs_cis), not apply_rotary_pos_emb: refused  # attention computed outside transformers' interface
INTERFACE_DECODERS = [(f, "gqa" if "gqa" in variants_of(f) else variants_of(f)[0]) for f in FAMILIES
                      if f not in ENCODERS | OWN_ATTENTION]
IDS = torch.tensor([[5, 17, 33, 2, 41, 8, 99, 120, 64, 7, 250, 31, 3, 77, 12, 9]])


MOE = {"qwen3_moe", "mixtral", "olmoe", "llama4"}  # grouped expert products: float32 only


def _setup(ckpts, family, variant="gqa", perturb=False):
    model, _ = ckpts.model(family, variant, perturb_norms=perturb)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir", perturb_norms=perturb)).checkpoint()
    model = copy.deepcopy(model)
    return ck, (model.float() if family in MOE else model.double()).eval()


def _capture(model, ck, ids=IDS):
    layers = list(range(ck.shape.num_layers))
    with torch.no_grad(), key_attention(model, ck, layers) as st:
        if st.via_cache:
            st.probe(model)
        st.start("capture")
        model(input_ids=ids, use_cache=False)
    return st


@pytest.mark.parametrize("family,variant", INTERFACE_DECODERS)
def test_full_size_key_latents_change_nothing(family, variant, ckpts):
    """k = head_dim: keys un-rotated, projected, rotated back give the model's own logits (float64), on every
    decoder family whose attention runs through transformers' interface (plain, partial and interleaved rotary,
    ALiBi-free absolute positions, NoPE layers)."""
    ck, model = _setup(ckpts, family, variant)
    layers = list(range(ck.shape.num_layers))
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
        with key_attention(model, ck, layers) as st:
            st.start("capture")
            model(input_ids=IDS, use_cache=False)
            plans = {layer: plan_keys(m, "data-aware") for layer, m in st.key_moments().items()}
            st.configs = [{layer: (p, None) for layer, p in plans.items()}]
            st.start("acc", 0)
            out = model(input_ids=IDS, use_cache=False).logits
            cut = {layer: cut_keys(p, [1] * len(p.groups)) for layer, p in plans.items()}
            st.configs = [{layer: (p, None) for layer, p in cut.items()}]
            st.start("acc", 0)
            small = model(input_ids=IDS, use_cache=False).logits
    tol = 1e-5 if family in MOE else 1e-8
    assert torch.allclose(out, ref, atol=tol, rtol=0), float((out - ref).abs().max())
    assert float((small - ref).abs().max()) > 1e-6  # a 1-number key latent does change the model


def _gpt2_qk(model, ck, ids):
    """Queries (H, N, hd) and keys less their bias (1 group per head: H, N, hd), read from c_attn's output."""
    s = ck.shape
    d, H, hd = s.hidden_size, s.num_heads, s.head_dim
    out = {}
    attn = model.transformer.h[0].attn
    h = attn.c_attn.register_forward_hook(lambda m, a, o: out.__setitem__("qkv", o.detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    qkv = out["qkv"][0]  # (N, 3d)
    b = attn.c_attn.bias.detach()
    q = qkv[:, :d].reshape(-1, H, hd).transpose(0, 1)
    k = (qkv[:, d:2 * d] - b[d:2 * d]).reshape(-1, H, hd).transpose(0, 1)
    return q, k


def test_data_aware_prediction_is_exact_on_the_calibration_tokens(ckpts):
    """No rotary (GPT-2): the predicted relative logit error equals the one computed by hand over every
    query-key pair of the calibration tokens, with the queries and keys read from the projection's output."""
    ck, model = _setup(ckpts, "gpt2", variants_of("gpt2")[0])
    st = _capture(model, ck)
    assert st.info[0].rotary is False
    plan = cut_keys(plan_keys(st.key_moments()[0], "data-aware"), [3] * ck.shape.num_kv_heads)
    q, k = _gpt2_qk(model, ck, IDS)
    lost = total = 0.0
    for g, lat in enumerate(plan.groups):
        k2 = k[g] @ (lat.up @ lat.encode).T  # bias subtracted, as the cache stores it
        L, L2 = q[g] @ k[g].T, q[g] @ k2.T
        lost += float(((L - L2) ** 2).sum())
        total += float((L ** 2).sum())
    assert plan.predicted_error == pytest.approx(math.sqrt(lost / total), rel=1e-9)
    assert 0.01 < plan.predicted_error < 1


def _state_qk(family, ck, model, layer):
    """Dense W_Q (H, hd, d) and W_K (G, hd, d) from the raw state dict, float64."""
    s = ck.shape
    H, G, hd, d = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size
    sd = {k: v.double() for k, v in model.state_dict().items()}
    if family == "gpt2":
        W = sd[f"transformer.h.{layer}.attn.c_attn.weight"].T  # Conv1D [in, out] -> Linear [out, in]
        return W[:d].reshape(H, hd, d), W[d:2 * d].reshape(G, hd, d)
    if family == "gpt_bigcode":
        W = sd[f"transformer.h.{layer}.attn.c_attn.weight"]  # Linear [(H + 2G) hd, d]
        return W[:H * hd].reshape(H, hd, d), W[H * hd:(H + G) * hd].reshape(G, hd, d)
    if family == "opt":
        p = f"model.decoder.layers.{layer}.self_attn"
        return sd[f"{p}.q_proj.weight"].reshape(H, hd, d), sd[f"{p}.k_proj.weight"].reshape(G, hd, d)
    raise AssertionError(family)


@pytest.mark.parametrize("family,variant", [("gpt2", "mha"), ("gpt_bigcode", "mqa"), ("opt", "mha")])
def test_plain_spectrum_is_the_stacked_qk_operator(family, variant, ckpts):
    """No rotary, no q/k norms: the plain key spectrum is the singular values of the stacked QK operator
    ``[(W_Q^h)^T W_K^g]_{h in g}`` ((H/G) d x d), formed densely from the raw weights (MHA, MQA, Conv1D)."""
    ck, model = _setup(ckpts, family, variant)
    st = _capture(model, ck)
    s = ck.shape
    n = s.num_heads // s.num_kv_heads
    for layer in range(s.num_layers):
        info = st.info[layer]
        assert not info.rotary
        plan = plan_keys(plain_moments(model, ck, layer, False, [], bias_subtracted=st.bias[layer] is not None),
                         "plain")
        Wq, Wk = _state_qk(family, ck, model, layer)
        for g, lat in enumerate(plan.groups):
            M = torch.cat([Wq[g * n + j].T @ Wk[g] for j in range(n)])  # ((H/G) d, d)
            dense = torch.linalg.svdvals(M)[: s.head_dim]
            assert torch.allclose(lat.spectrum, dense, rtol=1e-9, atol=1e-9 * float(dense[0]))


@pytest.mark.parametrize("family", ["qwen3", "gpt_neox", "cohere", "llama4"])
def test_rotation_average_is_exact_over_rotations(family, ckpts):
    """``rotation_average(C)`` equals ``mean_theta R^T C R`` over an exact design of angles (each frequency pair
    its own multiple of 2 pi n / M, so that every cross term averages to exactly 0), the rotations R built with the
    family's own function (rotate-half, partial, interleaved; Llama 4's complex freqs_cis)."""
    ck, model = _setup(ckpts, family, variants_of(family)[0])
    st = _capture(model, ck)
    info = st.info[0]
    assert info.rotary and info.pairs
    hd = ck.shape.head_dim
    rot = 2 * len(info.pairs)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(hd, 3 * hd, generator=gen, dtype=torch.float64)
    C = X @ X.T
    M = 8 * rot + 8
    mult = torch.arange(1, rot // 2 + 1, dtype=torch.float64)
    eye = torch.eye(hd, dtype=torch.float64).reshape(1, 1, hd, hd)
    acc = torch.zeros(hd, hd, dtype=torch.float64)
    for n in range(M):
        theta = 2 * math.pi * n * mult / M  # one angle per frequency
        if info.complex:  # one complex frequency per pair
            pe = torch.polar(torch.ones_like(theta), theta).to(torch.complex128).reshape(1, 1, -1).expand(1, hd, -1)
        else:
            ang = _layout(family, theta, rot)
            pe = (torch.cos(ang).reshape(1, 1, -1).expand(1, hd, -1), torch.sin(ang).reshape(1, 1, -1).expand(1, hd, -1))
        Rt = turn(info, eye, pe).reshape(hd, hd)  # row i: R e_i, so Rt = R^T
        acc += Rt @ C @ Rt.T
    tol = 1e-6 if info.complex else 1e-10  # apply_rotary_emb computes in complex64
    assert torch.allclose(rotation_average(C, info.pairs), acc / M, atol=tol * float(C.abs().max()))


def _layout(family: str, theta: torch.Tensor, rot: int) -> torch.Tensor:
    """Per-dimension angles in the family's cos/sin layout: rotate-half repeats the frequencies ``cat(f, f)``,
    interleaved (Cohere) repeats each ``f_i`` twice."""
    if family == "cohere":
        return theta.repeat_interleave(2)
    return torch.cat([theta, theta])


def test_rotary_pairs_of_partial_and_interleaved_rotary(ckpts):
    """The pairs come from the family's function: rotate-half pairs (i, i + rot/2), interleaved pairs (2i, 2i+1),
    partial rotary leaves the dimensions past rot alone."""
    for family, expect in (("qwen3", "half"), ("cohere", "interleaved"), ("gpt_neox", "partial")):
        ck, model = _setup(ckpts, family, variants_of(family)[0])
        st = _capture(model, ck)
        pairs, hd = st.info[0].pairs, ck.shape.head_dim
        if expect == "half":
            assert pairs == [(i, i + hd // 2) for i in range(hd // 2)]
        elif expect == "interleaved":
            assert pairs == [(2 * i, 2 * i + 1) for i in range(hd // 2)]
        else:
            rot = 2 * len(pairs)
            assert 0 < rot < hd and pairs == [(i, i + rot // 2) for i in range(rot // 2)]


def test_plain_folds_the_key_norm_gains(ckpts):
    """Qwen3 with perturbed norm gains: the plain moments use diag(gain) W_K, read from the k_norm module."""
    ck, model = _setup(ckpts, "qwen3", variants_of("qwen3")[0], perturb=True)
    st = _capture(model, ck)
    m = plain_moments(model, ck, 0, True, st.info[0].pairs, bias_subtracted=False)
    attn = model.model.layers[0].self_attn
    s = ck.shape
    Wk = attn.k_proj.weight.detach().double().reshape(s.num_kv_heads, s.head_dim, s.hidden_size)
    gain = attn.k_norm.weight.detach().double()
    assert not torch.allclose(gain, torch.ones_like(gain))  # the norms were perturbed
    Wg = gain[:, None] * Wk[0]
    assert torch.allclose(m.Ck[0], Wg @ Wg.T, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(OWN_ATTENTION))
def test_families_computing_attention_themselves_go_through_the_cache(family, ckpts):
    """BLOOM, GPT-Neo and Falcon compute attention themselves: their keys are read from the q/k projections and
    replaced in the cache they update (ProbeCache). k = head_dim gives the model's own logits; a 1-number latent
    changes them."""
    ck, model = _setup(ckpts, family, variants_of(family)[0])
    layers = list(range(ck.shape.num_layers))
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
        with key_attention(model, ck, layers) as st:
            assert st.via_cache
            st.probe(model)
            st.start("capture")
            model(input_ids=IDS, use_cache=False)
            plans = {layer: plan_keys(m, "data-aware") for layer, m in st.key_moments().items()}
            outs = []
            for ks in (None, 1):
                cut = {layer: (cut_keys(p, [ks] * len(p.groups)) if ks else p) for layer, p in plans.items()}
                st.configs = [{layer: (p, None) for layer, p in cut.items()}]
                st.start("acc", 0)
                outs.append(model(input_ids=IDS, **st.forward_kwargs(model)).logits)
    assert torch.allclose(outs[0], ref, atol=1e-8, rtol=0), float((outs[0] - ref).abs().max())
    assert float((outs[1] - ref).abs().max()) > 1e-9


def test_cache_route_prediction_is_exact_on_the_calibration_tokens(ckpts):
    """GPT-Neo (no rotary, attention computed by the family): the predicted logit error equals the one computed by
    hand from q_proj / k_proj outputs over every query-key pair of the calibration tokens."""
    ck, model = _setup(ckpts, "gpt_neo", variants_of("gpt_neo")[0])
    s = ck.shape
    out = {}
    attn = model.transformer.h[0].attn.attention
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: out.__setitem__("q", o.detach())),  # the last call:
             attn.k_proj.register_forward_hook(lambda m, a, o: out.__setitem__("k", o.detach()))]  # the capture's
    try:
        st = _capture(model, ck)
    finally:
        for h in hooks:
            h.remove()
    plan = cut_keys(plan_keys(st.key_moments()[0], "data-aware"), [3] * s.num_kv_heads)
    q = out["q"][0].reshape(-1, s.num_heads, s.head_dim).transpose(0, 1)
    k = out["k"][0].reshape(-1, s.num_kv_heads, s.head_dim).transpose(0, 1)
    lost = total = 0.0
    for g, lat in enumerate(plan.groups):
        L, L2 = q[g] @ k[g].T, q[g] @ (k[g] @ (lat.up @ lat.encode).T).T
        lost += float(((L - L2) ** 2).sum())
        total += float((L ** 2).sum())
    assert plan.predicted_error == pytest.approx(math.sqrt(lost / total), rel=1e-9)


def _hand_keys_cache(model, layer, P):
    """A DynamicCache whose update replaces ``layer``'s new keys [B, G, T, hd] by ``P_g k`` (P (G, hd, hd)), by hand."""
    from transformers import DynamicCache

    class Hand(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx == layer:
                key_states = torch.einsum("gij,bgtj->bgti", P, key_states.double()).to(key_states.dtype)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return Hand(config=model.config)


@pytest.mark.parametrize("family", ["bloom", "gpt_neo"])
def test_cache_route_attention_kl_and_output_errors_are_the_familys_own(family, ckpts):
    """BLOOM (ALiBi added inside its own softmax) and GPT-Neo (no 1/sqrt(hd) scaling): on the cache route the
    isolated attention KL and keys-alone output error equal those of HuggingFace's own forward pass with
    output_attentions=True, where a DynamicCache replaces only that layer's keys by keys projected by hand; the
    attention output is read at the output projection's input, by a hook in the test."""
    ck, model = _setup(ckpts, family, variants_of(family)[0])
    layers = list(range(ck.shape.num_layers))
    st = _capture(model, ck)
    plans = {layer: cut_keys(plan_keys(m, "data-aware"), [2] * ck.shape.num_kv_heads)
             for layer, m in st.key_moments().items()}
    with torch.no_grad(), key_attention(model, ck, layers) as st:
        st.probe(model)
        st.configs = [{layer: (p, None) for layer, p in plans.items()}]
        st.start("orig")
        model(input_ids=IDS, **st.forward_kwargs(model))
    sums = st.sums[0]
    from headlens.compress.cache_route import OUT_PROJECTIONS
    from headlens.compress.keys import attention_module

    for layer, plan in plans.items():
        attn = attention_module(model, layer)
        out = next(getattr(attn, n) for n in OUT_PROJECTIONS if hasattr(attn, n))
        ctx = []
        hook = out.register_forward_pre_hook(lambda m, a: ctx.append(a[0].double()))
        try:
            with torch.no_grad():
                ref = model(input_ids=IDS, use_cache=True, output_attentions=True,
                            past_key_values=_hand_keys_cache(model, -1, None))
                got = model(input_ids=IDS, use_cache=True, output_attentions=True,
                            past_key_values=_hand_keys_cache(model, layer, plan.projectors()))
        finally:
            hook.remove()
        p, p2 = ref.attentions[layer].double(), got.attentions[layer].double()
        kl = float(torch.where(p > 0, p * (p.log() - p2.log()), 0.0).sum()) / (p.shape[0] * p.shape[1] * p.shape[2])
        o, o2 = ctx  # this layer's output projection, once per pass
        s = sums[layer]
        assert s.rows and s.kl / s.rows == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert kl > 1e-6
        lost, total = s.out["keys"]
        assert math.sqrt(lost / total) == pytest.approx(float(torch.linalg.norm(o2 - o) / torch.linalg.norm(o)),
                                                        rel=1e-6)


@pytest.mark.parametrize("family", ["gptj", "bloom"])
def test_compress_measures_keys_on_the_cache_route(family, ckpts, tmp_path):
    """`headlens compress --keys plain` on GPT-J (rotary gathered inside attention) and BLOOM (ALiBi): every layer's
    key numbers are measured (logit error, attention KL, the isolated and accumulated output errors), and the bytes
    measured after --generate agree with the plan's (keys, values and GPT-J's positions)."""
    import json

    from headlens.cli import main

    text = tmp_path / "eval.txt"
    text.write_text("one two three four five six seven eight nine ten\nthe cat sat on the mat and looked around\n")
    out = tmp_path / "out"
    assert main(["compress", "--weights", str(ckpts.path(family, "mha", "hf_dir")), "--eval", str(text), "--k", "4",
                 "--latent", "plain", "--keys", "plain", "--generate", "3", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "compress_summary.json").read_text())
    conf = next(c for c in summary["configurations"] if "+ keys" in c["name"])  # values and keys compressed
    for e in conf["key_layers"]:
        assert e["rotary"] == (family == "gptj")
        for name in ("key_logit_error", "key_attention_kl", "isolated_keys_error", "isolated_values_error",
                     "isolated_both_error", "attention_accumulated_error"):
            assert e[name] is not None and e[name] > 0, (e["layer"], name)
    assert all(c["kv_measured_matches_plan"] for c in summary["configurations"])


def test_gptj_rotary_is_found(ckpts):
    """GPT-J turns keys inside attention with sin/cos gathered from its own table at position_ids: the first call finds
    that form, pairs of neighbouring dimensions over the config's rotary_dim (the rest passed)."""
    ck, model = _setup(ckpts, "gptj", variants_of("gptj")[0])
    st = _capture(model, ck)
    rot = model.config.rotary_dim or ck.shape.head_dim
    assert st.via_cache and all(info.rotary for info in st.info.values())
    assert all(info.pairs == [(2 * i, 2 * i + 1) for i in range(rot // 2)] for info in st.info.values())


def test_llama4_complex_rotary_is_found(ckpts):
    """Llama 4 turns queries and keys as complex numbers (apply_rotary_emb with freqs_cis, pairs of neighbouring
    dimensions), then L2-normalises them: the first call finds that form; its NoPE layers are found unrotated."""
    ck, model = _setup(ckpts, "llama4", variants_of("llama4")[0])
    st = _capture(model, ck)
    hd = ck.shape.head_dim
    rotary = {layer: i.rotary for layer, i in st.info.items()}
    assert any(rotary.values())
    for layer, info in st.info.items():
        if info.rotary:
            assert info.complex and info.pairs == [(2 * i, 2 * i + 1) for i in range(hd // 2)]
    nope = [layer for layer in range(ck.shape.num_layers)
            if not getattr(model.model.layers[layer].self_attn, "use_rope", True)]
    assert all(not rotary[layer] for layer in nope)


def test_unknown_rotation_is_refused(ckpts):
    """A layer whose keys are neither the family's rotary of its key projection (by the position_embeddings the
    attention module was handed) nor the projection itself gets no key latent: here a later pre-hook hands
    attention twice the angles."""
    ck, model = _setup(ckpts, "llama", "gqa")
    attn = model.model.layers[0].self_attn

    def double(_m, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (cos * cos - sin * sin, 2 * sin * cos)}

    with torch.no_grad(), key_attention(model, ck, [0, 1]) as st:
        h = attn.register_forward_pre_hook(double, with_kwargs=True)
        try:
            st.start("capture")
            with pytest.raises(HeadlensError, match="cannot un-rotate"):
                model(input_ids=IDS, use_cache=False)
        finally:
            h.remove()


@pytest.mark.parametrize("model_name", ["tiny-lm", "minilm"])
def test_loss_grows_with_the_key_target(model_name):
    """On the trained embedded models, the keys-alone configurations lose more as the key target loosens (KL for
    the decoder, embedding cosine for the encoder), and their key errors are measured beside the prediction."""
    import headlens as hl
    from headlens.io.embedded import default_texts

    texts = default_texts(model_name)
    cfg = hl.CompressConfig(layers="0:2", target_errors=[0.05, 0.3, 0.7], latents="plain", keys="data-aware",
                            max_calib_tokens=256)
    r = hl.run_compress(hl.ModelSource(embedded=model_name), cfg, texts.eval[:4], texts.calib[:4], disable=True)
    alone = [(c, m) for c, m in r.pairs() if c.part == "keys"]
    assert [c.target for c, _ in alone] == [0.05, 0.3, 0.7]
    dims = [c.key_dims for c, _ in alone]
    assert dims[0] > dims[1] > dims[2]
    if model_name == "tiny-lm":
        loss = [m.kl_mean for _, m in alone]
        assert loss[0] < loss[1] < loss[2]
    else:
        loss = [-m.embedding_cosine_mean for _, m in alone]
        assert loss[0] < loss[1] < loss[2]
    for _, m in alone:
        assert [e.layer for e in m.key_layers] == [0, 1]
        for e in m.key_layers:
            assert e.key_logit_error is not None and e.key_attention_kl is not None and e.isolated_keys_error >= 0


def test_saved_keys_generate_as_the_result_in_memory(tmp_path):
    """compress with keys, saved (key factors, key_k/key_rotary in the plan), read back with load_compressed and
    LatentCache.from_pretrained(DIR, model): the same greedy tokens and bytes as the in-memory result's cache; the
    generate command's pair carries the keys (its cache holds fewer bytes than values-only)."""
    import json

    import headlens as hl
    from headlens.compress.generate import GenerateConfig
    from headlens.compress.pair import from_directory
    from headlens.io.embedded import default_texts

    texts = default_texts("tiny-lm")
    cfg = hl.CompressConfig(ks=[16], latents="data-aware", keys="data-aware", max_calib_tokens=256)
    r = hl.run_compress(hl.ModelSource(embedded="tiny-lm"), cfg, texts.eval[:2], texts.calib[:4], disable=True,
                        keep_model=True)
    name = next(c.name for c in r.configurations if c.part == "both")
    out = tmp_path / "saved"
    r.save_model(name, out)
    entry = json.loads((out / "headlens_latent.json").read_text())["layers"][0]
    assert entry["key_k"] == [16, 16] and entry["key_rotary"] is True and entry["k"] == [16, 16]
    model, tok = hl.load_compressed(out)
    ids = tok(texts.eval[0], return_tensors="pt")["input_ids"][:, :10]
    with torch.no_grad():
        c1, c2 = hl.LatentCache.from_pretrained(out, model=model), r.latent_cache(name)
        a = model.generate(ids, past_key_values=c1, max_new_tokens=8, do_sample=False)
        b = r.kept[0].generate(ids, past_key_values=c2, max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()
    from headlens.compress.decode import position_bytes

    def numbers(cache, model):  # the saved model runs in its stored dtype (bfloat16 here), the result's in float32
        return (cache.nbytes() - position_bytes(cache)) / next(model.parameters()).element_size()

    assert numbers(c1, model) == numbers(c2, r.kept[0]) and position_bytes(c1) == position_bytes(c2) > 0
    pair = from_directory(None, GenerateConfig(compressed=str(out)))
    cache = pair.latent_cache()
    assert set(cache.key_latents) == set(range(6))


def _design_rotations(info, hd: int, family: str):
    """The exact design of rotations (each frequency its own multiple of 2 pi n / M) as matrices R_n (hd, hd)."""
    rot = 2 * len(info.pairs)
    M = 8 * rot + 8
    mult = torch.arange(1, rot // 2 + 1, dtype=torch.float64)
    eye = torch.eye(hd, dtype=torch.float64).reshape(1, 1, hd, hd)
    out = []
    for n in range(M):
        ang = _layout(family, 2 * math.pi * n * mult / M, rot)
        cos, sin = torch.cos(ang).reshape(1, 1, -1).expand(1, hd, -1), torch.sin(ang).reshape(1, 1, -1).expand(1, hd, -1)
        out.append(turn(info, eye, (cos, sin)).reshape(hd, hd).T)  # R e_i as column i (partial rotary: as Phi's)
    return out


@pytest.mark.parametrize("family", ["qwen3", "gpt_neox", "phi", "cohere"])
def test_predictions_are_the_logit_error_averaged_over_rotations(family, ckpts):
    """Random queries and keys of 2 kv groups with the family's rotary (Qwen3: every dimension; GPT-NeoX 4 of 16 and
    Phi 8 of 16: partial, the rest unrotated; Cohere: interleaved): the per-group and the per-frequency cross-head
    latents' predicted errors equal the relative logit error sum_{q, k} (q^T R (k - k'))^2 averaged over an exact
    design of rotations R (the unrotated dimensions' query moment keeps its off-diagonal entries, which the
    cross-head fit must weigh); the cross-head projector commutes with every rotation and keeps the unrotated
    dimensions too; it keeps everything at G hd numbers and nothing at 0."""
    from headlens.compress.keys import KeyMoments

    ck, model = _setup(ckpts, family, variants_of(family)[0])
    info = _capture(model, ck).info[0]
    hd, G = ck.shape.head_dim, 2
    gen = torch.Generator().manual_seed(3)
    Q = torch.randn(G, hd, 40, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, hd, dtype=torch.float64)[:, None]
    K = torch.randn(G * hd, 30, generator=gen, dtype=torch.float64)
    K = (torch.eye(G * hd, dtype=torch.float64) + 0.3 * torch.randn(G * hd, G * hd, generator=gen,
                                                                     dtype=torch.float64)) @ K  # correlated heads
    Kg = K.reshape(G, hd, -1)
    Cq = rotation_average(torch.einsum("gin,gjn->gij", Q, Q), info.pairs)
    m = KeyMoments(layer=0, Cq=Cq, Ck=torch.einsum("gin,gjn->gij", Kg, Kg), rotary=True, bias=None,
                   Ck_cross=K @ K.T, pairs=info.pairs)
    full = plan_keys(m, "data-aware")
    Rs = _design_rotations(info, hd, family)
    partial = 2 * len(info.pairs) < hd
    assert partial == (family in ("gpt_neox", "phi"))

    def averaged(P_group):  # P_group(g) -> keys of group g rebuilt (hd, N)
        lost = total = 0.0
        for R in Rs:
            for g in range(G):
                L = Q[g].T @ R @ Kg[g]
                lost += float(((L - Q[g].T @ R @ P_group(g)) ** 2).sum())
                total += float((L ** 2).sum())
        return math.sqrt(lost / total)

    for k in (5, 12):
        plan = cut_keys(full, [k, k])
        projs = plan.projectors()
        assert plan.predicted_error == pytest.approx(averaged(lambda g: projs[g] @ Kg[g]), rel=1e-8)
        freq = plan.frequency_latent()
        rebuilt = (freq.projector @ K).reshape(G, hd, -1)
        assert freq.predicted_error == pytest.approx(averaged(lambda g: rebuilt[g]), rel=1e-8)
        if partial:  # a pair's direction costs 2 numbers, an unrotated one 1: every number used
            assert freq.numbers == G * k and freq.ranks[-1] > 0
        else:
            assert sum(freq.ranks) == k and freq.numbers == G * k  # 2 numbers a direction: G k numbers in all
        assert torch.allclose(freq.encode @ freq.up, torch.eye(freq.numbers, dtype=torch.float64), atol=1e-9)
        for R in Rs[:5]:
            big = torch.block_diag(*[R] * G)
            assert torch.allclose(freq.projector @ big, big @ freq.projector, atol=1e-9)
    assert full.frequency.at(G * hd).predicted_error == pytest.approx(0.0, abs=1e-7)
    assert full.frequency.at(0).predicted_error == pytest.approx(1.0)


def test_a_sweep_budget_sizes_the_keys(tmp_path):
    """`headlens sweep` writes key_k_plain next to k_plain; compress with that budget and plain keys gives every kv
    group the sweep's key size (and the values theirs); an old budget without key columns asks for key_ks."""
    import headlens as hl
    from headlens.cli import main
    from headlens.io.embedded import default_texts
    from headlens.io.tables import read_table, write_csv

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "tiny-lm", "--target-error", "0.3", "--out-dir", str(out)]) == 0
    budget = out / "sweep_budget.csv"
    rows = read_table(budget)
    want = {}
    for r in rows:
        want.setdefault(r["layer"], {})[r["kv_head"]] = r["key_k_plain"]
    texts = default_texts("tiny-lm")
    cfg = hl.CompressConfig(budget=budget, latents="plain", keys="plain")
    res = hl.run_compress(hl.ModelSource(embedded="tiny-lm"), cfg, texts.eval[:2], disable=True)
    both = next(c for c in res.configurations if c.part == "both" and c.allocation == "budget")
    assert both.key_ks == {layer: [per[g] for g in sorted(per)] for layer, per in sorted(want.items())}
    assert len({k for v in both.key_ks.values() for k in v}) > 1  # the budget differs between groups
    old = tmp_path / "old_budget.csv"
    write_csv(old, [{k: v for k, v in r.items() if not k.startswith("key_")} for r in rows])
    with pytest.raises(HeadlensError, match="has no key sizes"):
        hl.run_compress(hl.ModelSource(embedded="tiny-lm"), hl.CompressConfig(budget=old, latents="plain",
                                                                             keys="plain"), texts.eval[:2],
                        disable=True)
