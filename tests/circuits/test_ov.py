"""`headlens ov` numbers against independent dense float64 computations and HuggingFace's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import capture_attention_io, dense_svals, dense_wov, norm_gain, value_output_blocks
from tiny_models import FAMILY_VARIANTS, MAX_PARAMS, PROMPT, build_tiny

from headlens.circuits.heads import read_head
from headlens.io.checkpoint import open_model
from headlens.circuits.ov import OVConfig, analyze_ov
from headlens.circuits.spectrum import (
    data_aware_latent,
    factored_svd,
    plain_cache_error,
)

FAMILIES_ALL = sorted({f for f, _ in FAMILY_VARIANTS})
BARE = {"safetensors", "pt", "bin"}


def _open(ckpts, family, variant, fmt, **kw):
    path = ckpts.path(family, variant, fmt, **kw)
    model, _ = ckpts.model(family, variant, **{k: v for k, v in kw.items() if k == "perturb_norms"})
    H = model.config.num_attention_heads
    if fmt in BARE:
        return open_model(weights=path, num_heads=H), model
    return open_model(weights=path, auto_infer=True), model


@pytest.mark.parametrize("family,variant", FAMILY_VARIANTS)
def test_spectrum_matches_dense_float64(ckpts, family, variant):
    """Every family and MHA/MQA/GQA variant: factored spectrum == dense float64 SVD of explicit W_OV."""
    ck, model = _open(ckpts, family, variant, "hf_dir")
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMS
    _, _, H, G, hd = value_output_blocks(model, family, 0)
    assert (ck.shape.num_heads, ck.shape.num_kv_heads, ck.shape.head_dim) == (H, G, hd)
    for layer in range(ck.shape.num_layers):
        for head in range(H):
            r = analyze_ov(ck, OVConfig(layer=layer, head=head, latent_dim=4, dtype=torch.float64))
            W = dense_wov(model, family, layer, head)
            ref = dense_svals(W, hd)
            np.testing.assert_allclose(r.singular_values, ref, rtol=1e-5, atol=1e-12 * ref[0])
            assert r.rank == hd == np.linalg.matrix_rank(W)  # random weights: full head rank
            assert r.kv_head == head // (H // G)
            E = np.cumsum(ref**2) / np.sum(ref**2)
            np.testing.assert_allclose(r.cumulative_energy, E, rtol=1e-9)
            assert r.rel_error == pytest.approx(np.sqrt(1 - E[3]), rel=1e-9)
            assert r.rel_error == pytest.approx(np.sqrt(1 - r.cumulative_energy[3]), rel=1e-9)
            assert r.condition_number == pytest.approx(ref[0] / ref[hd - 1], rel=1e-5)


@pytest.mark.parametrize("fmt", ["hf_dir", "hf_sharded", "safetensors", "pt", "bin"])
@pytest.mark.parametrize("family", FAMILIES_ALL)
def test_every_format_gives_the_same_spectrum(ckpts, family, fmt):
    variant = "mha" if family in ("gpt2", "gpt_neox", "bert") else "gqa"
    ck, model = _open(ckpts, family, variant, fmt)
    head = ck.shape.num_heads - 1
    r = analyze_ov(ck, OVConfig(layer=1, head=head, latent_dim=2, dtype=torch.float64))
    ref = dense_svals(dense_wov(model, family, 1, head), ck.shape.head_dim)
    np.testing.assert_allclose(r.singular_values, ref, rtol=1e-5)


@pytest.mark.parametrize("family,variant", [(f, v) for f, v in FAMILY_VARIANTS if v in ("gqa", "mha")])
def test_head_sum_reproduces_hf_attention_output(ckpts, family, variant):
    """Summing our W_OV^h over heads reproduces what HF's attention module does to a single token.

    With one token every head attends to it with probability 1, so the attention output is affine in its
    input: out(x) - out(0) = sum_h W_OV^h x. This pins the fused-qkv splits and the GQA head mapping to
    HuggingFace's own forward.
    """
    ck, model = _open(ckpts, family, variant, "hf_dir")
    ids = torch.tensor([[7]])
    layer = ck.shape.num_layers - 1
    x, y = capture_attention_io(model, family, layer, ids)
    _, y0 = capture_attention_io(model, family, layer, ids, zero_input=True)
    total = np.zeros_like(x[0])
    for head in range(ck.shape.num_heads):
        f = read_head(ck, layer, head, load_dtype=torch.float64)
        total += (f.W_O.numpy() @ (f.W_V.numpy() @ x[0]))
    np.testing.assert_allclose(total, y[0] - y0[0], rtol=1e-4, atol=1e-5 * np.abs(y[0]).max())


def test_cache_error_against_direct_computation():
    rng = np.random.default_rng(0)
    d, hd, n, k = 40, 12, 300, 5
    A, B = rng.normal(size=(d, hd)), rng.normal(size=(hd, d))
    X = rng.normal(size=(d, n)) * np.linspace(0.1, 3.0, d)[:, None]  # anisotropic tokens
    W = A @ B
    U, s, Vt = np.linalg.svd(W)
    Wk = (U[:, :k] * s[:k]) @ Vt[:k]
    direct = np.linalg.norm((W - Wk) @ X) / np.linalg.norm(W @ X)
    svd = factored_svd(torch.from_numpy(A), torch.from_numpy(B))
    assert plain_cache_error(svd, torch.from_numpy(X), k) == pytest.approx(direct, rel=1e-10)
    # Isotropic probes: cache_error close to rel_error (DOMAIN.md).
    Xiso = rng.normal(size=(d, 20000))
    iso = plain_cache_error(svd, torch.from_numpy(Xiso), k)
    rel = np.sqrt(np.sum(s[k:hd] ** 2) / np.sum(s[:hd] ** 2))
    assert iso == pytest.approx(rel, rel=0.03)


def test_whitened_error_equals_spectrum_prediction_and_beats_plain():
    """Data-aware latent: factored route == dense Cholesky route of DOMAIN.md == measured error."""
    rng = np.random.default_rng(1)
    d, hd, n, k = 30, 10, 400, 4
    A, B = rng.normal(size=(d, hd)), rng.normal(size=(hd, d))
    mix = rng.normal(size=(d, d)) * np.geomspace(3, 0.01, d)[None, :]
    X = mix @ rng.normal(size=(d, n))  # strongly anisotropic
    W = A @ B
    # Dense reference: S S^T = X X^T (Cholesky), SVD of W S, prediction from the tail.
    S = np.linalg.cholesky(X @ X.T + 1e-12 * np.eye(d))
    sv = np.linalg.svd(W @ S, compute_uv=False)
    predicted_dense = np.sqrt(np.sum(sv[k:] ** 2)) / np.linalg.norm(W @ X)
    # Best rank-k map for this X, built explicitly, and its measured error.
    Uy, _, _ = np.linalg.svd(W @ X, full_matrices=False)
    L = Uy[:, :k] @ Uy[:, :k].T @ W
    measured_dense = np.linalg.norm(W @ X - L @ X) / np.linalg.norm(W @ X)
    svd = factored_svd(torch.from_numpy(A), torch.from_numpy(B))
    fit = data_aware_latent(svd, torch.from_numpy(B), torch.from_numpy(X))
    np.testing.assert_allclose(fit.S.numpy(), sv[:hd], rtol=1e-8)
    assert fit.predicted_error(k) == pytest.approx(predicted_dense, rel=1e-8)
    assert fit.predicted_error(k) == pytest.approx(measured_dense, rel=1e-8)
    measured = fit.measured_error(torch.from_numpy(A), torch.from_numpy(B), torch.from_numpy(X), k)
    assert measured == pytest.approx(measured_dense, rel=1e-8)
    plain = plain_cache_error(svd, torch.from_numpy(X), k)
    assert fit.predicted_error(k) < plain


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "bert",
                                    "mixtral"])
def test_heatmap_on_sdpa_model_matches_eager(ckpts, family):
    """Heatmap values from the default (SDPA) model == HF eager attention's own probabilities."""
    from transformers import AutoModel

    from headlens.residual.capture import capture_layer
    from headlens.io.source import load_hf_model

    variant = "mha" if family in ("gpt2", "gpt_neox", "bert") else "gqa"
    ck, _ = _open(ckpts, family, variant, "hf_dir")
    model, tok = load_hf_model(ck.directory, torch.float32)
    # The default is SDPA (which returns no probabilities) wherever HF supports it (Gemma 2 does not).
    assert model.config._attn_implementation == ("sdpa" if model._supports_sdpa else "eager")
    layer = ck.shape.num_layers - 1
    before = model.config._attn_implementation
    cap = capture_layer(model, tok, ck.spec, layer, PROMPT + " " + PROMPT, want_probs=True)
    assert model.config._attn_implementation == before  # restored afterwards
    eager = AutoModel.from_pretrained(str(ck.directory), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([cap.input_ids]), output_attentions=True, output_hidden_states=True)
    ref = out.attentions[layer][0]
    assert cap.attn_probs.shape == ref.shape
    torch.testing.assert_close(cap.attn_probs, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cap.attn_probs.sum(-1).numpy(), 1.0, rtol=1e-5)
    # The captured attention input is the residual stream at the layer's input, after the pre-attention norm.
    hs = out.hidden_states[layer][0]
    blk_norm = {"gpt2": "ln_1", "bert": None}.get(family, "input_layernorm")
    if blk_norm is None:
        torch.testing.assert_close(cap.attn_input, hs, rtol=1e-5, atol=1e-5)
    else:
        from reference import _layers

        normed = getattr(_layers(eager)[layer], blk_norm)(hs)
        torch.testing.assert_close(cap.attn_input, normed.detach(), rtol=1e-5, atol=1e-5)


def test_sliding_window_shows_in_the_heatmap(ckpts):
    """Gemma 2's sliding layers mask keys further back than the window; the heatmap must show zeros there."""
    from headlens.residual.capture import capture_layer
    from headlens.io.source import load_hf_model

    ck, model = _open(ckpts, "gemma2", "gqa", "hf_dir")
    window = model.config.sliding_window
    layer = next(i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention")
    m, tok = load_hf_model(ck.directory, torch.float32)
    cap = capture_layer(m, tok, ck.spec, layer, PROMPT, want_probs=True)
    P = cap.attn_probs[0].numpy()
    n = P.shape[0]
    assert n > window + 1
    far = np.tril(np.ones((n, n)), -window)
    assert np.all(P[far.astype(bool)] == 0)
    assert np.all(P[np.triu(np.ones((n, n)), 1).astype(bool)] == 0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert", "qwen3_moe"])
def test_fold_norm(ckpts, family):
    variant = "mha" if family in ("gpt2", "bert") else "gqa"
    ck, model = _open(ckpts, family, variant, "hf_dir", perturb_norms=True)
    for layer in range(ck.shape.num_layers):
        gamma = norm_gain(model, family, layer)
        assert not np.allclose(gamma, 1.0)
        W = dense_wov(model, family, layer, 1) * gamma[None, :]
        r = analyze_ov(ck, OVConfig(layer=layer, head=1, latent_dim=3, fold_norm=True, dtype=torch.float64))
        np.testing.assert_allclose(r.singular_values, dense_svals(W, ck.shape.head_dim), rtol=1e-5)
        assert r.norm_folded and r.norm_key


def test_fold_norm_keeps_the_product_with_a_prompt(ckpts):
    """With a prompt, folding rescales the inputs by 1/gamma, so W X and the data-aware error are unchanged."""
    from headlens.residual.capture import capture_layer
    from headlens.io.source import load_hf_model

    ck, _ = _open(ckpts, "llama", "gqa", "hf_dir", perturb_norms=True)
    m, tok = load_hf_model(ck.directory, torch.float64)

    def cap():
        return capture_layer(m, tok, ck.spec, 1, PROMPT, want_probs=False)

    a = analyze_ov(ck, OVConfig(layer=1, head=2, latent_dim=3, prompt=PROMPT, dtype=torch.float64), cap)
    b = analyze_ov(ck, OVConfig(layer=1, head=2, latent_dim=3, prompt=PROMPT, fold_norm=True,
                                dtype=torch.float64), cap)
    assert a.data_aware.whitened_singular_values == pytest.approx(b.data_aware.whitened_singular_values, rel=1e-8)
    assert a.singular_values != pytest.approx(b.singular_values, rel=1e-3)


def test_prompt_cache_error_uses_the_layer_inputs(ckpts):
    """cache_error with a prompt == direct dense computation on the hooked attention inputs."""
    from headlens.residual.capture import capture_layer
    from headlens.io.source import load_hf_model

    ck, model = _open(ckpts, "qwen3", "gqa", "hf_dir")
    m, tok = load_hf_model(ck.directory, torch.float64)
    cap = capture_layer(m, tok, ck.spec, 0, PROMPT * 3, want_probs=False)
    r = analyze_ov(ck, OVConfig(layer=0, head=3, latent_dim=5, prompt=PROMPT * 3, dtype=torch.float64),
                   lambda: cap)
    X = cap.attn_input.double().numpy().T
    W = dense_wov(model, "qwen3", 0, 3)
    U, s, Vt = np.linalg.svd(W)
    Wk = (U[:, :5] * s[:5]) @ Vt[:5]
    assert r.cache_inputs == "prompt" and r.cache_tokens == X.shape[1]
    assert r.cache_error == pytest.approx(np.linalg.norm((W - Wk) @ X) / np.linalg.norm(W @ X), rel=1e-6)
    sv = np.linalg.svd(W @ X, compute_uv=False)
    assert r.data_aware.whitened_error == pytest.approx(np.sqrt(np.sum(sv[5:] ** 2) / np.sum(sv**2)), rel=1e-6)
    assert r.data_aware.heldout_fit_tokens + r.data_aware.heldout_test_tokens == X.shape[1]


def test_gaussian_probe_cache_error_is_seeded(ckpts):
    ck, _ = _open(ckpts, "llama", "gqa", "hf_dir")
    a = analyze_ov(ck, OVConfig(layer=0, head=0, latent_dim=4, seed=3))
    b = analyze_ov(ck, OVConfig(layer=0, head=0, latent_dim=4, seed=3))
    c = analyze_ov(ck, OVConfig(layer=0, head=0, latent_dim=4, seed=4))
    assert a.cache_inputs == "gaussian" and a.cache_error == b.cache_error != c.cache_error
    assert a.cache_error == pytest.approx(a.rel_error, rel=0.1)


def test_planted_low_rank_head_reports_its_rank(tmp_path):
    """A head whose W_V has rank 5 (stored in float32) reports rank 5 and a condition number over 5 values."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d, hd, H = 32, 8, 2
    Wv = torch.randn(hd, 5) @ torch.randn(5, d)
    v = torch.cat([Wv, torch.randn(hd, d)])
    sd = {"model.layers.0.self_attn.v_proj.weight": v.float(),
          "model.layers.0.self_attn.o_proj.weight": torch.randn(d, H * hd),
          "model.layers.0.self_attn.q_proj.weight": torch.randn(H * hd, d),
          "model.layers.0.self_attn.k_proj.weight": torch.randn(H * hd, d)}
    save_file(sd, str(tmp_path / "planted.safetensors"))
    ck = open_model(weights=tmp_path / "planted.safetensors", num_heads=H)
    r = analyze_ov(ck, OVConfig(layer=0, head=0, latent_dim=5))
    assert r.rank == 5
    W = sd["model.layers.0.self_attn.o_proj.weight"][:, :hd].double() @ Wv.float().double()
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    assert r.condition_number == pytest.approx(s[0] / s[4], rel=1e-5)
    assert r.rel_error < 1e-6


def _extra_family(name: str):
    """Families in the spec table that share another family's layout: Gemma (v1), Qwen2-MoE, RoBERTa (built
    through the config guard of tiny_models)."""
    import transformers

    common = dict(vocab_size=512, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    if name == "gemma":
        model = build_tiny(transformers.GemmaConfig, transformers.GemmaForCausalLM, num_key_value_heads=2,
                           head_dim=16, **common)
        ref_family = "gemma"
    elif name == "qwen2_moe":
        model = build_tiny(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, num_key_value_heads=2,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, **common)
        ref_family = "qwen2_moe"
    else:
        model = build_tiny(transformers.RobertaConfig, transformers.RobertaModel, pad_token_id=1, **common)
        ref_family = "bert"
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMS
    with torch.no_grad():  # non-trivial norm gains so that folding is visible
        for n, p in model.named_parameters():
            if "norm" in n.lower() and n.endswith("weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval(), ref_family


@pytest.mark.parametrize("name", ["gemma", "qwen2_moe", "roberta"])
def test_other_table_families(tmp_path, name):
    model, ref_family = _extra_family(name)
    model.save_pretrained(tmp_path)
    ck = open_model(weights=tmp_path, auto_infer=True)
    assert ck.shape.model_type == name
    for head in range(4):
        r = analyze_ov(ck, OVConfig(layer=1, head=head, latent_dim=2, fold_norm=True, dtype=torch.float64))
        W = dense_wov(model, ref_family, 1, head) * norm_gain(model, ref_family, 1)[None, :]
        hd = ck.shape.head_dim
        np.testing.assert_allclose(r.singular_values, dense_svals(W, hd), rtol=1e-5)


def test_analyze_head_from_python(ckpts):
    """The notebook entry point: a ModelSource and an OVConfig with a prompt give the same numbers as the
    capture written by hand; errors name parameters, not flags."""
    from headlens.circuits.ov import analyze_head
    from headlens.errors import HeadlensError
    from headlens.io.source import ModelSource, load_hf_model
    from headlens.residual.capture import capture_layer

    ck, _ = _open(ckpts, "qwen3", "gqa", "hf_dir")
    source = ModelSource(weights=ck.directory)
    cfg = OVConfig(layer=1, head=2, latent_dim=4, prompt=PROMPT, heatmap=True, dtype=torch.float64)
    r = analyze_head(source, cfg)
    m, tok = load_hf_model(ck.directory, torch.float64)
    cap = capture_layer(m, tok, ck.spec, 1, PROMPT, want_probs=True)
    ref = analyze_ov(ck, cfg, lambda: cap)
    assert r.cache_inputs == "prompt" and r.tokens == cap.tokens
    assert r.singular_values == ref.singular_values and r.cache_error == pytest.approx(ref.cache_error, rel=1e-12)
    assert r.data_aware.whitened_error == pytest.approx(ref.data_aware.whitened_error, rel=1e-12)
    np.testing.assert_allclose(r.attention, ref.attention, rtol=1e-12)
    plain = analyze_head(source, OVConfig(layer=1, head=2, latent_dim=4, seed=3))
    assert plain.cache_inputs == "gaussian" and plain.singular_values == pytest.approx(r.singular_values, rel=1e-6)
    for kwargs, message in ((dict(heatmap=True), "`heatmap` needs `prompt`"), (dict(prompt=" "), "`prompt` is empty"),
                            (dict(latent_dim=0), "`latent_dim` must be positive")):
        with pytest.raises(HeadlensError, match=message):
            OVConfig(layer=0, head=0, **kwargs)
    with pytest.raises(HeadlensError, match="`latent_dim` 17 is above the rank"):
        analyze_head(source, OVConfig(layer=0, head=0, latent_dim=17))
    bare = ModelSource(weights=ckpts.path("qwen3", "gqa", "pt"), num_heads=4)
    with pytest.raises(HeadlensError, match="^`prompt` needs config.json and tokenizer files: pass `weights`"):
        analyze_head(bare, OVConfig(layer=0, head=0, prompt=PROMPT))
