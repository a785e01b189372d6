"""headlens.compress: the latent put into real tiny models, against dense float64 written out here.

Every model runs in float64; the original and the compressed model are deep copies of the session's tiny model,
so nothing shared is modified. Dense references (W_V^g blocks, W_O) come from ``tests/reference.py``, which
splits each family's fused projections from the modeling code, not through headlens' layouts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import attention_module, value_output_blocks

from headlens.circuits.heads import read_layer
from headlens.compress.apply import (apply_plans, compressed, load_latent_factors, save_latent_factors,
                                     value_tensor)
from headlens.compress.plan import plan_layer, plan_layers
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

FAMILIES = [("qwen3", "gqa"), ("gpt2", "mha"), ("gpt_neox", "mha"), ("phi3", "gqa"), ("qwen2", "gqa"),
            ("bert", "mha")]
N_TOKENS = 96  # more than d (48 or 64): X X^T has full rank where the norm allows it


def _ids(seed: int, n: int = N_TOKENS) -> torch.Tensor:
    return torch.randint(8, 400, (1, n), generator=torch.Generator().manual_seed(seed))


def _setup(ckpts, family, variant):
    model, _ = ckpts.model(family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    return ck, copy.deepcopy(model).double(), copy.deepcopy(model).double()


def _attn_inputs(model, family, ids) -> dict[int, np.ndarray]:
    """Each layer's attention input (d, N) float64, from a forward pre-hook on the attention module."""
    seen: dict[int, np.ndarray] = {}

    def hook(layer):
        def pre(_m, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            seen[layer] = x[0].detach().double().numpy().T.copy()
        return pre

    L = model.config.num_hidden_layers
    hs = [attention_module(model, family, i).register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(L)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    return seen


def _plans(ck, X, k, kind, layers=None):
    out = []
    for layer in layers if layers is not None else range(ck.shape.num_layers):
        f = read_layer(ck, layer, with_qk=False)
        out.append(plan_layer(layer, f.W_O, f.W_V, k, kind, torch.from_numpy(X[layer])))
    return out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _run(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logits = out.logits[0].numpy() if hasattr(out, "logits") else None
    return [h[0].numpy() for h in out.hidden_states], logits


def _kl(lo: np.ndarray, lc: np.ndarray) -> np.ndarray:
    """KL(original || compressed) per position, nats, from explicit log-softmaxes."""
    p, q = _log_softmax(lo), _log_softmax(lc)
    return (np.exp(p) * (p - q)).sum(-1)


def _dense_Q(M: np.ndarray, k: int, X: np.ndarray | None, ridge: float = 0.0) -> np.ndarray:
    """Q written out densely: plain V_k V_k^T of M, or S V_k V_k^T S^{-1} with S = chol(X X^T + ridge I), V_k of
    M S (LayerNorm outputs without bias lie in a hyperplane: there the plan reports the ridge it added)."""
    if X is None:
        V = np.linalg.svd(M)[2][:k].T
        return V @ V.T
    S = np.linalg.cholesky(X @ X.T + ridge * np.eye(X.shape[0]))
    V = np.linalg.svd(M @ S)[2][:k].T
    return S @ V @ V.T @ np.linalg.inv(S)


def _stack(o_full, v_g, g, H, G, hd) -> np.ndarray:
    n = H // G
    return np.vstack([o_full[:, h * hd:(h + 1) * hd] @ v_g for h in range(g * n, (g + 1) * n)])


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
@pytest.mark.parametrize("family,variant", FAMILIES)
def test_full_latent_is_the_original_model(ckpts, family, variant, kind):
    ck, orig, comp = _setup(ckpts, family, variant)
    ids = _ids(0)
    X = _attn_inputs(orig, family, ids)
    applied = apply_plans(comp, ck, _plans(ck, X, ck.shape.head_dim, kind))
    assert len(applied.names) == ck.shape.num_layers
    ho, lo = _run(orig, ids)
    hc, lc = _run(comp, ids)
    for a, b in zip(ho, hc):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    if lo is not None:
        assert _kl(lo, lc).max() < 1e-10
    for layer in range(ck.shape.num_layers):  # and the stored weights are the original ones
        vo, *_ = value_output_blocks(orig, family, layer)
        vc, *_ = value_output_blocks(comp, family, layer)
        for a, b in zip(vo, vc):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
@pytest.mark.parametrize("family,variant", FAMILIES)
def test_small_latent_writes_W_V_Q_and_nothing_else(ckpts, family, variant, kind):
    ck, orig, comp = _setup(ckpts, family, variant)
    ids = _ids(0)
    X = _attn_inputs(orig, family, ids)
    k = ck.shape.head_dim // 4
    plans = _plans(ck, X, k, kind)
    applied = apply_plans(comp, ck, plans)
    so, sc = orig.state_dict(), comp.state_dict()
    for name in so:  # every other tensor untouched, bit for bit
        if name not in applied.names:
            assert torch.equal(so[name], sc[name]), name
    for layer in range(ck.shape.num_layers):
        vo, o_full, H, G, hd = value_output_blocks(orig, family, layer)
        vc, *_ = value_output_blocks(comp, family, layer)
        changed = 0.0
        for g in range(G):
            Q = _dense_Q(_stack(o_full, vo[g], g, H, G, hd), k, X[layer] if kind == "data-aware" else None,
                         plans[layer].groups[g].ridge)
            want = vo[g] @ Q
            np.testing.assert_allclose(vc[g], want, rtol=0, atol=1e-9 * np.abs(want).max())
            changed += np.sum((vc[g] - vo[g]) ** 2)
        # the stored tensor changed by exactly the value blocks' change: no q/k row (fused layouts) was written
        name = applied.names[layer]
        assert np.sum((sc[name].numpy() - so[name].numpy()) ** 2) == pytest.approx(changed, rel=1e-9)
        assert changed > 1e-3
    ho, lo = _run(orig, ids)
    hc, lc = _run(comp, ids)
    assert np.abs(hc[-1] - ho[-1]).max() > 1e-4
    if lo is not None:
        assert _kl(lo, lc).mean() > 1e-6
    applied.restore()
    assert all(torch.equal(v, comp.state_dict()[n]) for n, v in so.items())


def _values(family, out: torch.Tensor, H: int, G: int, hd: int) -> np.ndarray:
    """(N, G, hd) values from the value (or fused qkv) projection's output, split as each modeling file does."""
    y = out[0].detach().double().numpy()
    N = y.shape[0]
    if family == "gpt2":
        return y[:, 2 * H * hd:].reshape(N, G, hd)
    if family == "gpt_neox":
        return y.reshape(N, H, 3, hd)[:, :, 2]
    if family == "phi3":
        return y[:, (H + G) * hd:].reshape(N, G, hd)
    return y.reshape(N, G, hd)


@pytest.mark.parametrize("family,variant", [("qwen3", "gqa"), ("qwen2", "gqa"), ("gpt2", "mha"), ("phi3", "gqa")])
def test_value_path_error_in_the_running_model_is_the_prediction(ckpts, family, variant):
    ck, orig, comp = _setup(ckpts, family, variant)
    layer, k = 1, 5
    calib, held = _ids(0), _ids(1, 64)
    X = _attn_inputs(orig, family, calib)
    Xh = _attn_inputs(orig, family, held)
    vo, o_full, H, G, hd = value_output_blocks(orig, family, layer)
    for kind in ("plain", "data-aware"):
        plan = _plans(ck, X, k, kind, [layer])[0]
        for ids, Xl, on_calib in ((calib, X[layer], True), (held, Xh[layer], False)):
            seen = {}
            for tag, model in (("o", orig), ("c", comp)):
                vt = value_tensor(model, ck, layer)
                h = vt.module.register_forward_hook(lambda _m, _a, out, tag=tag: seen.__setitem__(tag, out))
                with compressed(model, ck, [plan]) if tag == "c" else _nothing():
                    with torch.no_grad():
                        model(input_ids=ids)
                h.remove()
            v, v2 = (_values(family, seen[t], H, G, hd) for t in ("o", "c"))
            bias = v - np.einsum("gjd,dn->ngj", np.stack(vo), Xl)  # the value bias (0 where there is none)
            lost = total = 0.0
            for g in range(G):
                M = _stack(o_full, vo[g], g, H, G, hd)
                W_Os = np.vstack([o_full[:, h * hd:(h + 1) * hd] for h in range(g * (H // G), (g + 1) * (H // G))])
                e = np.linalg.norm(W_Os @ (v[:, g] - v2[:, g]).T)
                t = np.linalg.norm(W_Os @ (v[:, g] - bias[:, g]).T)
                ridge = plan.groups[g].ridge  # 0.0 unless X X^T is singular (GPT-2's bias-free LayerNorm at init)
                Q = _dense_Q(M, k, X[layer] if kind == "data-aware" else None, ridge)
                dense = np.linalg.norm(M @ (np.eye(M.shape[1]) - Q) @ Xl) / np.linalg.norm(M @ Xl)
                assert e / t == pytest.approx(dense, rel=1e-8)
                if kind == "plain":  # the spectrum's sqrt(1 - E_k) of M_g
                    s = np.linalg.svd(M, compute_uv=False)
                    assert plan.groups[g].predicted_error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)),
                                                                           rel=1e-9)
                if on_calib:
                    assert plan.groups[g].calib_error == pytest.approx(e / t, rel=1e-8)
                    if kind == "data-aware":  # exact on the calibration tokens
                        S = np.linalg.cholesky(Xl @ Xl.T + ridge * np.eye(Xl.shape[0]))
                        s = np.linalg.svd(M @ S, compute_uv=False)
                        assert plan.groups[g].predicted_error == pytest.approx(e / t, rel=1e-8)
                        assert e / t == pytest.approx(np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(M @ Xl), rel=1e-8)
                lost, total = lost + e ** 2, total + t ** 2
            per, whole = plan.cache_errors(read_layer(ck, layer, with_qk=False).W_V, torch.from_numpy(Xl))
            assert whole == pytest.approx(np.sqrt(lost / total), rel=1e-8)
            if on_calib and kind == "data-aware":
                assert plan.predicted_error == pytest.approx(whole, rel=1e-8)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_weight_replacement_is_an_explicit_latent_cache(ckpts, tmp_path):
    """Qwen3 layer 1, every layer compressed: cache c_j = P_g x_j, rebuild v_j = U_g c_j, mix with the layer's own
    attention probabilities, apply o_proj: what the compressed model's o_proj writes."""
    ck, orig, comp = _setup(ckpts, "qwen3", "gqa")
    ids = _ids(0)
    X = _attn_inputs(orig, "qwen3", ids)
    plans = _plans(ck, X, 6, "data-aware")
    apply_plans(comp, ck, plans)
    comp.set_attn_implementation("eager")
    layer = 1
    attn = attention_module(comp, "qwen3", layer)
    seen = {}
    h1 = attn.v_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0][0].double().numpy()))
    h2 = attn.o_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("o", out[0].double().numpy()))
    with torch.no_grad():
        probs = comp(input_ids=ids, output_attentions=True).attentions[layer][0].numpy()  # (H, N, N)
    h1.remove()
    h2.remove()
    H, G, hd = ck.shape.num_heads, ck.shape.num_kv_heads, ck.shape.head_dim
    _, o_full, *_ = value_output_blocks(orig, "qwen3", layer)
    x = seen["x"]  # (N, d)
    heads = []
    for h in range(H):
        g = plans[layer].groups[h // (H // G)]
        c = x @ g.down.numpy().T  # (N, k): the cache, k numbers per token
        v = c @ g.up.numpy().T  # (N, hd)
        heads.append(probs[h] @ v)
    by_hand = np.concatenate(heads, axis=1) @ o_full.T  # (N, d)
    np.testing.assert_allclose(seen["o"], by_hand, rtol=0, atol=1e-10 * np.abs(by_hand).max())
    # the exported factors are the same matrices, in float32
    path = save_latent_factors(plans, tmp_path / "latent_factors.safetensors")
    meta, factors = load_latent_factors(path)
    assert meta["kind"] == "data-aware" and meta["k"] == {0: [6, 6], 1: [6, 6]}
    for p in plans:
        for g in p.groups:
            down, up = factors[(p.layer, g.kv_head)]
            assert down.dtype == torch.float32 and tuple(down.shape) == (6, ck.shape.hidden_size)
            assert tuple(up.shape) == (hd, 6)
            torch.testing.assert_close(down.double(), g.down, rtol=1e-6, atol=1e-6 * float(g.down.abs().max()))
            torch.testing.assert_close(up.double(), g.up, rtol=1e-6, atol=1e-6 * float(g.up.abs().max()))


def test_base_model_without_prefix_and_refusals(ckpts):
    ck, orig, _ = _setup(ckpts, "qwen3", "gqa")
    path = ckpts.path("qwen3", "gqa", "hf_dir")
    base = ModelSource(weights=path).model(path, torch.float64)  # Qwen3Model: "layers.0...", no "model." prefix
    X = _attn_inputs(orig, "qwen3", _ids(0))
    plans = _plans(ck, X, 4, "plain")
    again = plan_layers(ck, {0: 4, 1: [4, 4]}, "data-aware", {i: torch.from_numpy(x) for i, x in X.items()})
    assert [p.layer for p in again] == [0, 1] and again[1].ks == [4, 4] and again[0].kind == "data-aware"
    with pytest.raises(HeadlensError, match="`calibration` tokens for layer 1"):
        plan_layers(ck, {1: 4}, "data-aware", {0: torch.from_numpy(X[0])})
    applied = apply_plans(base, ck, plans)
    assert applied.names[0] == "layers.0.self_attn.v_proj.weight"
    assert value_tensor(orig, ck, 0).name == "model.layers.0.self_attn.v_proj.weight"
    gpt2, _ = ckpts.model("gpt2", "mha")
    with pytest.raises(HeadlensError, match="not found"):
        apply_plans(copy.deepcopy(gpt2), ck, plans)
    mha, _ = ckpts.model("qwen3", "mha")
    with pytest.raises(HeadlensError, match="shape"):
        apply_plans(copy.deepcopy(mha).double(), ck, plans)
    import tiny_models

    other = tiny_models.build_model("qwen3", "gqa", seed=1).double()
    before = other.state_dict()["model.layers.1.self_attn.v_proj.weight"].clone()
    with pytest.raises(HeadlensError, match="not those the latent was fitted on"):
        apply_plans(other, ck, plans)
    assert torch.equal(other.state_dict()["model.layers.1.self_attn.v_proj.weight"], before)  # nothing half-done


@pytest.mark.parametrize("family,variant", [("qwen3", "gqa"), ("gpt2", "mha")])
def test_saved_compressed_model_reloads_and_reproduces_the_compressed_outputs(ckpts, tmp_path, family, variant):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from headlens.compress.apply import save_compressed_model

    ck, original, work = _setup(ckpts, family, variant)
    ids = _ids(3)
    X = _attn_inputs(original, family, ids)
    hd = ck.shape.head_dim
    plans = _plans(ck, X, hd // 4, "data-aware")
    before = {n: p.detach().clone() for n, p in work.state_dict().items()}
    out = save_compressed_model(work, ck, plans, tmp_path / "compressed", info={"target": "k"})
    assert all(torch.equal(before[n], p) for n, p in work.state_dict().items())  # the model is left as it was
    with compressed(work, ck, plans):
        _, in_memory = _run(work, ids)
        stored = copy.deepcopy(work).float().double()  # what the float32 checkpoint holds of the float64 model
    _, expected = _run(stored, ids)
    # saved in the checkpoint's storage type (float32), not in the float64 the model computed in
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64).eval()
    _, got = _run(reloaded, ids)
    _, orig = _run(original, ids)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got, in_memory, rtol=1e-5, atol=1e-5)  # float32's rounding of the new blocks only
    kl_saved, kl_stored = _kl(orig, got).mean(), _kl(orig, expected).mean()
    assert kl_saved > 1e-6 and abs(kl_saved - kl_stored) < 1e-10
    record = json.loads((out / "headlens_latent.json").read_text())
    assert record["storage_dtype"] == "float32" and record["compute_dtype"] == "float64"
    assert [r["layer"] for r in record["layers"]] == list(range(ck.shape.num_layers))
    assert all(r["kind"] == "data-aware" and set(r["k"]) == {hd // 4} for r in record["layers"])
    meta, factors = load_latent_factors(out / "latent_factors.safetensors")
    assert meta["kind"] == "data-aware" and len(factors) == ck.shape.num_layers * ck.shape.num_kv_heads
    # the factors rebuild the saved value weights, read back by the dense reference: W_V^g Q_g = (W_V^g B_g) P_g
    for p in plans:
        saved_v, _, _, _, _ = value_output_blocks(reloaded.base_model, family, p.layer)
        for g in p.groups:
            down, up = factors[(p.layer, g.kv_head)]
            assert down.shape == (hd // 4, ck.shape.hidden_size) and up.shape == (hd, hd // 4)
            rebuilt = up.double().numpy() @ down.double().numpy()
            np.testing.assert_allclose(rebuilt, saved_v[g.kv_head], rtol=1e-5, atol=1e-5 * np.abs(saved_v[g.kv_head]).max())
    with pytest.raises(HeadlensError, match="not an empty directory"):
        save_compressed_model(work, ck, plans, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed"]  # no temporary directory left behind
