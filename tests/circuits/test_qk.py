"""`headlens ov --circuit qk`: W_QK^h = (W_Q^h)^T W_K^g against dense float64 forms built from the HuggingFace
modules, and the prompt's logit error and attention KL against a dense recomputation on hooked q/k inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from reference import _layers, dense_svals, dense_wqk, norm_gain, query_key_blocks
from tiny_models import PROMPT

from headlens.circuits.ov import OVConfig, analyze_ov
from headlens.circuits.qk import read_qk_head
from headlens.errors import HeadlensError
from headlens.io.checkpoint import open_model

# GQA with q/k norms (qwen3, gemma3's 1 + w), MQA, fused concat (phi3), interleaved (gpt_neox), Conv1D (gpt2),
# q/k norms over all heads (olmo2), per-head LayerNorms (cohere's (H, hd) weight, stablelm's module per head), BERT.
CASES = [("qwen3", "gqa"), ("llama", "mqa"), ("gemma3", "gqa"), ("phi3", "gqa"), ("gpt_neox", "mha"),
         ("gpt2", "mha"), ("olmo2", "gqa"), ("cohere", "gqa"), ("stablelm", "gqa"), ("bert", "mha")]


def _open(ckpts, family, variant, perturb_norms=True):
    path = ckpts.path(family, variant, "hf_dir", perturb_norms=perturb_norms)
    model, _ = ckpts.model(family, variant, perturb_norms=perturb_norms)
    return open_model(weights=path, auto_infer=True), model


def _closed_forms(r, ref: np.ndarray, rank: int, k: int) -> None:
    """The QK block's rank, condition number, energies and rel_error@k against the dense SVD's closed forms."""
    np.testing.assert_allclose(r.singular_values, ref, rtol=1e-6, atol=1e-10 * ref[0])
    assert r.rank == rank
    assert r.condition_number == pytest.approx(ref[0] / ref[rank - 1], rel=1e-6)
    E = np.cumsum(ref**2) / np.sum(ref**2)
    np.testing.assert_allclose(r.cumulative_energy, E, rtol=1e-9)
    assert r.latent_dim == k and r.rel_error == pytest.approx(np.sqrt(np.sum(ref[k:] ** 2) / np.sum(ref**2)), rel=1e-8)
    assert r.frobenius_norm == pytest.approx(np.linalg.norm(ref), rel=1e-9)


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("fold_norm", [False, True])
def test_qk_spectrum_matches_dense_float64(ckpts, family, variant, fold_norm):
    """Every head of every layer: the factored W_QK spectrum == the dense float64 SVD of the explicit form, with the
    q/k norm gains (and with fold_norm the input norm's gain) folded in as the test writes them from the modules."""
    if fold_norm and family == "olmo2":
        pytest.skip("OLMo 2 has no norm before attention (post-sublayer norms): nothing to fold")
    ck, model = _open(ckpts, family, variant)
    _, _, H, G, hd = query_key_blocks(model, family, 0)
    assert (ck.shape.num_heads, ck.shape.num_kv_heads, ck.shape.head_dim) == (H, G, hd)
    for layer in range(ck.shape.num_layers):
        for head in range(H):
            r = analyze_ov(ck, OVConfig(layer=layer, head=head, latent_dim=3, circuit="qk", fold_norm=fold_norm,
                                        dtype=torch.float64))
            W = dense_wqk(model, family, layer, head, fold_norm=fold_norm)
            # random weights: full head rank, or hd - 1 where a LayerNorm subtracts each head's mean (Cohere, StableLM)
            rank = np.linalg.matrix_rank(W)
            assert rank == hd - (family in ("cohere", "stablelm"))
            _closed_forms(r.qk, dense_svals(W, hd), rank, 3)
            assert r.qk.kv_head == head // (H // G) and r.qk.norm_folded == fold_norm


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "olmo2", "cohere", "stablelm"])
def test_qk_norm_gains_are_folded(ckpts, family):
    """Where the family has q/k norms their gains change the spectrum (perturbed away from 1 / 0) and are named."""
    ck, model = _open(ckpts, family, "gqa")
    r = analyze_ov(ck, OVConfig(layer=1, head=2, latent_dim=2, circuit="qk", dtype=torch.float64))
    assert len(r.qk.qk_norm_keys) == 2 and any("per-token scale" in n for n in r.qk.notes)
    qs, ks, H, G, hd = query_key_blocks(model, family, 1)
    unfolded = dense_svals(qs[2].T @ ks[2 // (H // G)], hd)
    assert not np.allclose(r.qk.singular_values, unfolded, rtol=1e-3)


def test_unplaced_qk_norm_is_refused(tmp_path):
    """Phi-1/2 with qk_layernorm: the spec does not place q_layernorm, so no unfolded number is printed."""
    import transformers
    from tiny_models import _llama_named

    model = _llama_named("phi", transformers.PhiConfig, transformers.PhiForCausalLM, False, resid_pdrop=0.0,
                         embd_pdrop=0.0, qk_layernorm=True)("gqa")
    model.save_pretrained(tmp_path)
    ck = open_model(weights=tmp_path, auto_infer=True)
    with pytest.raises(HeadlensError, match=r"^`circuit` qk: layer 0 holds the query/key norm weight "
                                            r"model\.layers\.0\.self_attn\.[qk]_layernorm\.weight, which"):
        analyze_ov(ck, OVConfig(layer=0, head=0, circuit="qk"))
    analyze_ov(ck, OVConfig(layer=0, head=0))  # the OV circuit does not read it


def _hooked_qk_input(model, family: str, layer: int, ids: torch.Tensor) -> np.ndarray:
    """(N, d) float64: what layer ``layer``'s query projection receives, from a hook on that module."""
    blk = _layers(model)[layer]
    proj = {"gpt2": lambda: blk.attn.c_attn, "bert": lambda: blk.attention.self.query,
            "phi3": lambda: blk.self_attn.qkv_proj}.get(family, lambda: blk.self_attn.q_proj)()
    seen = {}
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"][0].double().numpy()


def _dense_prompt_errors(W: np.ndarray, X: np.ndarray, k: int, hd: int, causal: bool) -> tuple[float, float]:
    """Logit rel error and mean attention KL(full || rank-k) of the dense form W on tokens X (N, d)."""
    U, s, Vt = np.linalg.svd(W)
    Wk = (U[:, :k] * s[:k]) @ Vt[:k]
    L, Lk = X @ W @ X.T / np.sqrt(hd), X @ Wk @ X.T / np.sqrt(hd)
    n = X.shape[0]
    mask = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    rel = np.linalg.norm((L - Lk)[mask]) / np.linalg.norm(L[mask])
    kls = []
    for i in range(n):
        a, b = L[i][mask[i]], Lk[i][mask[i]]
        p, q = np.exp(a - a.max()), np.exp(b - b.max())
        p, q = p / p.sum(), q / q.sum()
        kls.append(np.sum(p * np.log(p / q)))
    return rel, float(np.mean(kls))


@pytest.mark.parametrize("family,variant,fold_norm", [("qwen3", "gqa", False), ("qwen3", "gqa", True),
                                                      ("gpt2", "mha", False), ("phi3", "gqa", True),
                                                      ("bert", "mha", False)])
def test_prompt_logit_error_and_kl(ckpts, family, variant, fold_norm):
    """With a prompt: the rank-k form's logit error and attention KL == a dense recomputation on the q/k projection's
    hooked inputs; causal positions for decoders, every pair for BERT. With fold_norm the folded form is truncated."""
    from headlens.io.source import load_hf_model
    from headlens.residual.capture import capture_layer

    ck, model = _open(ckpts, family, variant)
    m, tok = load_hf_model(ck.directory, torch.float64)
    layer, head, k = 1, ck.shape.num_heads - 1, 3
    cap = capture_layer(m, tok, ck.spec, layer, PROMPT * 2, want_probs=False)
    r = analyze_ov(ck, OVConfig(layer=layer, head=head, latent_dim=k, prompt=PROMPT * 2, circuit="both",
                                fold_norm=fold_norm, dtype=torch.float64), lambda: cap)
    X = _hooked_qk_input(copy.deepcopy(model).double(), family, layer, torch.tensor([cap.input_ids]))
    assert X.shape[0] == len(cap.input_ids) > 8
    causal = family != "bert"
    W = dense_wqk(model, family, layer, head, fold_norm=fold_norm)
    if fold_norm:  # the folded form diag(g) W diag(g) reads x / g: the same full logits, another rank-k truncation
        X = X / norm_gain(model, family, layer)[None, :]
    rel, kl = _dense_prompt_errors(W, X, k, ck.shape.head_dim, causal)
    q = r.qk
    assert q.prompt_positions == ("causal" if causal else "all") and q.prompt_tokens == X.shape[0]
    assert q.prompt_logit_rel_error == pytest.approx(rel, rel=1e-6)
    assert q.prompt_attention_kl == pytest.approx(kl, rel=1e-5, abs=1e-12)
    assert q.prompt_attention_kl > 0
    if not causal:  # the causal mask would give another number: the test tells them apart
        assert _dense_prompt_errors(W, X, k, ck.shape.head_dim, True)[0] != pytest.approx(rel, rel=1e-3)
    assert r.cache_inputs == "prompt" and r.rank == ck.shape.head_dim  # the OV block is there too


def test_read_qk_head_factors_are_the_form(ckpts):
    """The two factors multiply to the dense form (no SVD involved): pins the GQA mapping and the folds."""
    ck, model = _open(ckpts, "qwen3", "gqa")
    for head in range(ck.shape.num_heads):
        f = read_qk_head(ck, 1, head, fold_norm=True, load_dtype=torch.float64)
        np.testing.assert_allclose((f.W_Q.T @ f.W_K).numpy(), dense_wqk(model, "qwen3", 1, head, fold_norm=True),
                                   rtol=1e-10, atol=1e-12)


def test_json_blocks_and_notes(ckpts):
    """ov: no qk key (the OV JSON as before); both: the OV fields unchanged plus qk with the OV field names; qk: the
    head's description and qk, without the OV numbers. Notes say what is left out, by family."""
    ck, _ = _open(ckpts, "qwen3", "gqa")
    kw = dict(layer=0, head=1, latent_dim=4, dtype=torch.float64)
    ov = analyze_ov(ck, OVConfig(**kw)).to_json()
    both = analyze_ov(ck, OVConfig(**kw, circuit="both")).to_json()
    qk = analyze_ov(ck, OVConfig(**kw, circuit="qk")).to_json()
    assert "qk" not in ov and "circuit" not in ov
    assert {k: v for k, v in both.items() if k not in ("qk", "circuit")} == ov
    spectral = ("shape", "tensors", "rank", "rank_tolerance", "rank_eps_dtype", "condition_number",
                "condition_number_definition", "singular_values", "cumulative_energy", "frobenius_norm", "latent_dim",
                "rel_error", "norm_folded", "norm_key")
    assert set(spectral) <= set(both["qk"]) and both["qk"] == qk["qk"]
    assert "singular_values" not in qk and "cache_error" not in qk and qk["circuit"] == "qk"
    assert qk["layer"] == 0 and qk["head"] == 1 and qk["kv_head"] == 0
    json.dumps(qk, allow_nan=False)
    notes = " ".join(qk["qk"]["notes"])
    assert "relative position 0" in notes and "q_norm" in notes and "b_Q" not in notes
    ck2, _ = _open(ckpts, "gpt2", "mha")
    notes2 = " ".join(analyze_ov(ck2, OVConfig(layer=0, head=0, circuit="qk")).qk.notes)
    assert "b_Q, b_K (transformer.h.0.attn.c_attn.bias)" in notes2 and "rotary" not in notes2


def test_circuit_is_validated():
    for bad in ("QK", "kq", 3, None):
        with pytest.raises(HeadlensError, match=r"^`circuit` .*: choose ov, qk, both$"):
            OVConfig(layer=0, head=0, circuit=bad)


def test_mla_refuses_the_qk_circuit(tmp_path):
    """DeepSeek-style latent attention: `circuit` qk (or both) is refused with one line naming why; ov still works."""
    from test_mla import _deepseek
    from tiny_models import save_checkpoint, tokenizer_for

    from headlens.circuits.ov import analyze_head
    from headlens.io.source import ModelSource

    save_checkpoint(_deepseek("deepseek_v3"), tokenizer_for("none"), tmp_path, "hf_dir")
    source = ModelSource(weights=tmp_path)
    for circuit in ("qk", "both"):
        with pytest.raises(HeadlensError, match=rf"^`circuit` {circuit}: multi-head latent attention has no single"):
            analyze_head(source, OVConfig(layer=0, head=0, latent_dim=2, circuit=circuit))
    assert analyze_head(source, OVConfig(layer=0, head=0, latent_dim=2)).rank > 0
