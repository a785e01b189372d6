"""headlens.compress.measure against computations written out here: explicit log-softmax loops over two forward
passes, dense float64 operators, and deep copies of the model with the latents written in.

Every model runs in float64, as a deep copy of the session's tiny model; the copies compressed for the reference
numbers go through ``apply_plans`` (checked against dense W_V^g Q_g in test_compress_model.py).
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from reference import attention_module, value_output_blocks

from headlens.compress import measure as measure_mod
from headlens.compress import recorder as recorder_mod
from headlens.compress.apply import apply_plans
from headlens.compress.measure import kv_bytes, measure
from headlens.compress.plan import plan_layers
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

TEXTS = ["The cat sat on the mat and looked at the door.",
         "A dog ran in the park, barking at every bird it saw.",
         "Three and seven are prime numbers; nine is not.",
         "The sun rises in the east and sets in the west.",
         "She wrote the letter slowly, then read it twice."]


def _setup(ckpts, family, variant):
    model, tok = ckpts.model(family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    return ck, copy.deepcopy(model).double(), tok


def _with_biases(model, seed: int = 0):
    """Every bias of ``model`` set to seeded random values (the tiny models start with zero biases), in place: the
    plans read only the weights, so the saved checkpoint still fits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _plans(ck, ks, kind="plain", calibration=None) -> dict:
    return {p.layer: p for p in plan_layers(ck, ks, kind, calibration, load_dtype=torch.float64)}


def _ids(tok, text):
    return tok(text, return_tensors="pt")["input_ids"]


def _compressed_copy(model, ck, plans):
    comp = copy.deepcopy(model)
    apply_plans(comp, ck, list(plans))
    return comp


def _o_module(model, family, layer):
    if family == "bert":
        return model.encoder.layer[layer].attention.output.dense
    return attention_module(model, family, layer).o_proj


def _run(model, family, ids, layers=()):
    """(last hidden state (N, d), logits (N, V) or None, {layer: o_proj output (N, d)}) in float64 numpy."""
    seen = {}
    hs = [_o_module(model, family, layer).register_forward_hook(
        lambda _m, _a, out, layer=layer: seen.__setitem__(layer, out[0].double().numpy())) for layer in layers]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for h in hs:
        h.remove()
    logits = out.logits[0].numpy() if hasattr(out, "logits") else None
    return out.hidden_states[-1][0].numpy(), logits, seen


def _log_softmax_row(z: np.ndarray) -> np.ndarray:
    m = max(z)
    s = sum(np.exp(zi - m) for zi in z)
    return np.array([zi - m - np.log(s) for zi in z])


def _state(model) -> dict:
    return {n: t.clone() for n, t in model.state_dict().items()}


def _same(model, before: dict) -> bool:
    now = model.state_dict()
    return all(torch.equal(now[n], t) for n, t in before.items())


def _no_hooks(model) -> bool:
    """No hook of measure's left (transformers installs output-capturing hooks of its own on a first forward)."""
    return not any("Recorder." in getattr(h, "__qualname__", "") for m in model.modules()
                   for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()])


# ------------------------------------------------------------------------------------------------ k = head_dim


@pytest.mark.parametrize("family,variant", [("qwen3", "gqa"), ("bert", "mha")])
def test_full_latent_loses_nothing(ckpts, family, variant):
    ck, model, tok = _setup(ckpts, family, variant)
    hd = ck.shape.head_dim
    before = _state(model)
    r = measure(model, ck, tok, _plans(ck, {0: hd, 1: hd}), TEXTS, disable=True)
    assert _same(model, before) and _no_hooks(model)
    assert [e.layer for e in r.layers] == [0, 1]
    for e in r.layers:
        for v in (e.predicted_error, e.value_path_error, e.isolated_error, e.accumulated_error):
            assert 0 <= v < 1e-10
    assert r.hidden_error < 1e-10
    assert r.n_texts == len(TEXTS) and r.n_tokens == sum(_ids(tok, t).shape[1] for t in TEXTS)
    assert r.kv.saving == 0.0
    if family == "qwen3":
        assert r.task == "causal-lm" and r.n_predicted == r.n_tokens - len(TEXTS)
        assert abs(r.kl_mean) < 1e-10 and abs(r.kl_p95) < 1e-10
        assert r.top1_agreement == 1.0
        assert r.ppl_after == pytest.approx(r.ppl_before, rel=1e-12)
        assert r.embedding_cosine_mean is None and r.neighbour_agreement is None
    else:
        assert r.task == "embedding" and r.kl_mean is None and r.ppl_before is None
        assert r.embedding_cosine_mean == pytest.approx(1.0, abs=1e-12)
        assert r.embedding_cosine_min == pytest.approx(1.0, abs=1e-12)
        assert r.neighbour_agreement == 1.0


# ------------------------------------------------------------------------------------------------ k < head_dim


def test_causal_numbers_against_explicit_loops(ckpts):
    ck, model, tok = _setup(ckpts, "qwen3", "gqa")
    plans = _plans(ck, {0: 4, 1: [6, 3]})
    r = measure(model, ck, tok, plans, TEXTS, disable=True)
    comp = _compressed_copy(model, ck, plans.values())
    only = {layer: _compressed_copy(model, ck, [plans[layer]]) for layer in plans}
    kls, agree, nll_o, nll_c = [], 0, 0.0, 0.0
    h_lost = h_total = 0.0
    o_total = {0: 0.0, 1: 0.0}
    o_iso = {0: 0.0, 1: 0.0}
    o_acc = {0: 0.0, 1: 0.0}
    for text in TEXTS:
        ids = _ids(tok, text)
        ho, lo, oo = _run(model, "qwen3", ids, (0, 1))
        hc, lc, oc = _run(comp, "qwen3", ids, (0, 1))
        for layer in (0, 1):
            oi = _run(only[layer], "qwen3", ids, (layer,))[2][layer]
            o_total[layer] += np.sum(oo[layer] ** 2)  # Qwen3 has no value or output bias
            o_iso[layer] += np.sum((oi - oo[layer]) ** 2)
            o_acc[layer] += np.sum((oc[layer] - oo[layer]) ** 2)
        h_lost += np.sum((hc - ho) ** 2)
        h_total += np.sum(ho ** 2)
        for i in range(ids.shape[1] - 1):
            p, q = _log_softmax_row(lo[i]), _log_softmax_row(lc[i])
            kls.append(float(np.sum(np.exp(p) * (p - q))))
            agree += int(np.argmax(lo[i]) == np.argmax(lc[i]))
            nxt = int(ids[0, i + 1])
            nll_o, nll_c = nll_o - p[nxt], nll_c - q[nxt]
    n = len(kls)
    assert r.n_predicted == n
    assert r.kl_mean == pytest.approx(np.mean(kls), rel=1e-9)
    assert r.kl_p95 == pytest.approx(np.percentile(kls, 95), rel=1e-9)
    assert r.top1_agreement == agree / n
    assert r.ppl_before == pytest.approx(np.exp(nll_o / n), rel=1e-10)
    assert r.ppl_after == pytest.approx(np.exp(nll_c / n), rel=1e-10)
    assert r.kl_mean > 1e-4 and r.ppl_after != r.ppl_before
    assert r.hidden_error == pytest.approx(np.sqrt(h_lost / h_total), rel=1e-9)
    by_layer = {e.layer: e for e in r.layers}
    for layer in (0, 1):
        assert by_layer[layer].isolated_error == pytest.approx(np.sqrt(o_iso[layer] / o_total[layer]), rel=1e-9)
        assert by_layer[layer].accumulated_error == pytest.approx(np.sqrt(o_acc[layer] / o_total[layer]), rel=1e-9)
        assert by_layer[layer].predicted_error == plans[layer].predicted_error
        assert by_layer[layer].ks == plans[layer].ks
    # nothing before layer 0 changed: accumulated is isolated; layer 1 reads layer 0's compressed output
    assert by_layer[0].accumulated_error == pytest.approx(by_layer[0].isolated_error, rel=1e-12)
    assert abs(by_layer[1].accumulated_error - by_layer[1].isolated_error) > 1e-2 * by_layer[1].isolated_error


def _value_inputs(model, family, layer, tok, texts) -> np.ndarray:
    """The layer's attention input over all texts, (d, N) float64, hooked on the attention module."""
    xs = []

    def pre(_m, args, kwargs):
        xs.append(kwargs.get("hidden_states", args[0] if args else None)[0].double().numpy())

    h = attention_module(model, family, layer).register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        for text in texts:
            model(input_ids=_ids(tok, text))
    h.remove()
    return np.concatenate(xs).T


def test_value_path_error_is_the_dense_operator_error(ckpts):
    """Qwen2 (value bias), only layer 1 compressed: ||M(I-Q)X|| / ||MX|| over the kv groups and eval tokens."""
    ck, model, tok = _setup(ckpts, "qwen2", "gqa")
    _with_biases(model)
    layer, k = 1, 5
    plans = _plans(ck, {layer: k})
    r = measure(model, ck, tok, plans, TEXTS, disable=True)
    (e,) = r.layers
    X = _value_inputs(model, "qwen2", layer, tok, TEXTS)
    vo, o_full, H, G, hd = value_output_blocks(model, "qwen2", layer)
    n = H // G
    lost = total = 0.0
    for g in range(G):
        M = np.vstack([o_full[:, h * hd:(h + 1) * hd] @ vo[g] for h in range(g * n, (g + 1) * n)])
        V = np.linalg.svd(M)[2][:k].T
        a = np.linalg.norm(M @ (np.eye(M.shape[1]) - V @ V.T) @ X)
        b = np.linalg.norm(M @ X)
        assert e.group_value_path_errors[g] == pytest.approx(a / b, rel=1e-8)
        lost, total = lost + a ** 2, total + b ** 2
    assert e.value_path_error == pytest.approx(np.sqrt(lost / total), rel=1e-8)
    assert e.accumulated_error == pytest.approx(e.isolated_error, rel=1e-12)  # the only compressed layer
    assert e.isolated_error > 0.05
    # a data-aware latent fitted on the eval tokens themselves: the spectrum's prediction is exact there
    da = _plans(ck, {layer: k}, "data-aware", {layer: torch.from_numpy(X)})
    assert da[layer].groups[0].ridge == 0.0
    (d,) = measure(model, ck, tok, da, TEXTS, disable=True).layers
    assert d.value_path_error == pytest.approx(d.predicted_error, rel=1e-8)
    assert d.value_path_error < e.value_path_error


def test_encoder_numbers_against_explicit_computation(ckpts):
    """BERT (value and output biases): embedding cosine, neighbours, and the isolated error's denominator, the
    part of the output projection's output that the value weights produce (measured with W_V zeroed)."""
    ck, model, tok = _setup(ckpts, "bert", "mha")
    _with_biases(model)
    plans = _plans(ck, {0: 3, 1: 5})
    r = measure(model, ck, tok, plans, TEXTS, disable=True)
    comp = _compressed_copy(model, ck, plans.values())
    zeroed, only = {}, {}
    for layer in plans:
        zeroed[layer] = copy.deepcopy(model)
        with torch.no_grad():
            zeroed[layer].encoder.layer[layer].attention.self.value.weight.zero_()  # bias kept
        only[layer] = _compressed_copy(model, ck, [plans[layer]])
    pooled_o, pooled_c = [], []
    num = {0: 0.0, 1: 0.0}
    den = {0: 0.0, 1: 0.0}
    for text in TEXTS:
        ids = _ids(tok, text)
        ho, _, oo = _run(model, "bert", ids, (0, 1))
        hc, _, _ = _run(comp, "bert", ids)
        pooled_o.append(ho.mean(0))
        pooled_c.append(hc.mean(0))
        for layer in (0, 1):
            o0 = _run(zeroed[layer], "bert", ids, (layer,))[2][layer]
            oi = _run(only[layer], "bert", ids, (layer,))[2][layer]
            num[layer] += np.sum((oi - oo[layer]) ** 2)
            den[layer] += np.sum((oo[layer] - o0) ** 2)
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(pooled_o, pooled_c)]
    assert r.embedding_cosine_mean == pytest.approx(np.mean(cos), rel=1e-12)
    assert r.embedding_cosine_min == pytest.approx(np.min(cos), rel=1e-12)
    assert r.embedding_cosine_min < 1 - 1e-6

    def nearest(P):
        out = []
        for i, a in enumerate(P):
            sims = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) if j != i else -np.inf for j, b in enumerate(P)]
            out.append(int(np.argmax(sims)))
        return out

    agree = np.mean([a == b for a, b in zip(nearest(pooled_o), nearest(pooled_c))])
    assert r.neighbour_agreement == pytest.approx(agree)
    for e in r.layers:
        assert e.isolated_error == pytest.approx(np.sqrt(num[e.layer] / den[e.layer]), rel=1e-9)
    assert r.layers[0].accumulated_error == pytest.approx(r.layers[0].isolated_error, rel=1e-12)
    assert abs(r.layers[1].accumulated_error - r.layers[1].isolated_error) > 1e-6


@pytest.mark.parametrize("family,variant", [("qwen3", "gqa"), ("bert", "mha")])
def test_errors_grow_as_the_latent_shrinks(ckpts, family, variant):
    ck, model, tok = _setup(ckpts, family, variant)
    runs = [measure(model, ck, tok, _plans(ck, {0: k, 1: k}), TEXTS, disable=True) for k in (12, 8, 4)]
    for layer in (0, 1):
        for name in ("predicted_error", "value_path_error", "isolated_error", "accumulated_error"):
            vals = [getattr(r.layers[layer], name) for r in runs]
            assert vals[0] < vals[1] < vals[2], (layer, name, vals)
    assert runs[0].hidden_error < runs[1].hidden_error < runs[2].hidden_error
    if family == "qwen3":
        assert runs[0].kl_mean < runs[1].kl_mean < runs[2].kl_mean
        assert runs[0].kl_p95 < runs[1].kl_p95 < runs[2].kl_p95
    else:
        assert runs[0].embedding_cosine_mean > runs[1].embedding_cosine_mean > runs[2].embedding_cosine_mean
    assert runs[0].kv.saving < runs[1].kv.saving < runs[2].kv.saving


# ------------------------------------------------------------------------------------------------ restore


@pytest.mark.parametrize("where", ["isolated re-run", "accumulated pass"])
def test_model_restored_exactly_after_an_error(ckpts, monkeypatch, where):
    ck, model, tok = _setup(ckpts, "qwen3", "gqa")
    plans = _plans(ck, {0: 4, 1: 4})
    model.train()
    before = _state(model)
    if where == "isolated re-run":  # raised inside the forward hook, with the layer's latent written in
        real = recorder_mod.applied  # the prepared blocks written in place (compressed() when none are kept)

        @contextmanager
        def boom(*args):
            with real(*args):
                raise RuntimeError("boom")
            yield  # pragma: no cover

        monkeypatch.setattr(recorder_mod, "applied", boom)
    else:  # raised on the second text's compressed pass, with every latent written in
        real_final, calls = measure_mod._final, []

        def final(out, causal, head):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("boom")
            return real_final(out, causal, head)

        monkeypatch.setattr(measure_mod, "_final", final)
    with pytest.raises(RuntimeError, match="boom"):
        measure(model, ck, tok, plans, TEXTS, disable=True)
    assert _same(model, before)
    assert _no_hooks(model)
    assert model.training


# ------------------------------------------------------------------------------------------------ KV bytes


def test_kv_bytes_closed_form(ckpts):
    ck, model, tok = _setup(ckpts, "qwen3", "gqa")  # G = 2, hd = 16, 2 layers, float64
    plans = _plans(ck, {0: [3, 5]})
    kv = kv_bytes(ck, plans, 8)
    assert kv.before == [2 * 2 * 16 * 8] * 2
    assert kv.after == [(2 * 16 + 3 + 5) * 8, 2 * 2 * 16 * 8]
    assert kv.total_before == 1024 and kv.total_after == 320 + 512
    assert kv.saving == pytest.approx(1 - 832 / 1024)
    r = measure(model, ck, tok, plans, TEXTS[:2], disable=True)
    assert r.kv == kv  # bytes per value from the model's dtype
    half = measure(model, ck, tok, plans, TEXTS[:2], bytes_per_value=2, disable=True).kv
    assert half.before == [128.0, 128.0] and half.after == [80.0, 128.0]
    s = r.summary()
    assert s["kv_bytes_per_token_before"] == 1024 and s["saving"] == kv.saving
    assert [e["layer"] for e in s["layers"]] == [0]
    ck_b, _, _ = _setup(ckpts, "bert", "mha")  # G = H = 4
    kv_b = kv_bytes(ck_b, _plans(ck_b, {1: 2}), 4)
    assert kv_b.before == [512.0, 512.0] and kv_b.after == [512.0, (64 + 8) * 4]


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input(ckpts):
    ck, model, tok = _setup(ckpts, "qwen3", "gqa")
    plans = _plans(ck, {1: 4})
    before = _state(model)
    with pytest.raises(HeadlensError, match="`texts` is empty"):
        measure(model, ck, tok, plans, [], disable=True)
    with pytest.raises(HeadlensError, match="`texts` is one string"):
        measure(model, ck, tok, plans, TEXTS[0], disable=True)
    with pytest.raises(HeadlensError, match=r"`texts` item 2 \('a'\) has 1 token\(s\)"):
        measure(model, ck, tok, plans, [TEXTS[0], "a"], disable=True)
    with pytest.raises(HeadlensError, match="`texts` item 1 .* has 0 token"):
        measure(model, ck, tok, plans, [""], disable=True)
    with pytest.raises(HeadlensError, match=r"`plans` has a plan for layer 5, out of range: .* \(valid 0..1\)"):
        measure(model, ck, tok, {5: dataclasses.replace(plans[1], layer=5)}, TEXTS, disable=True)
    with pytest.raises(HeadlensError, match="`plans` has a plan for layer -1"):
        measure(model, ck, tok, {-1: dataclasses.replace(plans[1], layer=-1)}, TEXTS, disable=True)
    with pytest.raises(HeadlensError, match="`plans` holds layer 1's plan under layer 0"):
        measure(model, ck, tok, {0: plans[1]}, TEXTS, disable=True)
    with pytest.raises(HeadlensError, match="`bytes_per_value`"):
        measure(model, ck, tok, plans, TEXTS, bytes_per_value=0, disable=True)
    long = " ".join(TEXTS * 4)  # past the tiny model's 128 positions
    with pytest.raises(HeadlensError, match="`texts` item 1 .* at most 128: shorten it or pass `truncate`"):
        measure(model, ck, tok, plans, [long], disable=True)
    assert measure(model, ck, tok, plans, [long], truncate=True, disable=True).n_tokens == 128
    # a family spec whose output projection the loaded model lacks
    layout = dataclasses.replace(ck.spec.layout, o="self_attn.out.weight")
    odd = dataclasses.replace(ck, spec=dataclasses.replace(ck.spec, layout=layout))
    with pytest.raises(HeadlensError, match="self_attn.out' not found"):
        measure(model, odd, tok, plans, TEXTS, disable=True)
    base = measure(model, ck, tok, {}, TEXTS[:2], disable=True)  # no plans: the original model, measured
    assert base.layers == [] and base.kl_mean == 0.0 and base.hidden_error == 0.0 and base.kv.saving == 0.0
    assert _same(model, before) and _no_hooks(model)


# ------------------------------------------------------------------------------------------------ fused layouts


def _zero_values(model, family, layer):
    """A copy of ``model`` with layer ``layer``'s value weights zeroed (biases kept), split as the modeling file
    does: what its output projection writes is then the value bias alone, ``W_O b_v + b_o``."""
    z = copy.deepcopy(model)
    H = z.config.num_attention_heads
    with torch.no_grad():
        if family == "gpt2":
            W = z.transformer.h[layer].attn.c_attn.weight  # Conv1D (d, 3d): columns q | k | v
            W[:, 2 * W.shape[0]:] = 0
        elif family == "gpt_neox":
            W = z.gpt_neox.layers[layer].attention.query_key_value.weight  # rows H x [q; k; v]
            W.view(H, 3, -1, W.shape[1])[:, 2] = 0
        else:  # phi3: rows q (H) | k (G) | v (G)
            W = z.model.layers[layer].self_attn.qkv_proj.weight
            G, hd = z.config.num_key_value_heads, z.config.hidden_size // H
            W[(H + G) * hd:] = 0
    return z


def _out_proj(model, family, layer):
    if family == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    if family == "gpt_neox":
        return model.gpt_neox.layers[layer].attention.dense
    return model.model.layers[layer].self_attn.o_proj


@pytest.mark.parametrize("family,variant", [("gpt2", "mha"), ("gpt_neox", "mha"), ("phi3", "gqa")])
def test_fused_layouts(ckpts, family, variant):
    """Conv1D (GPT-2), interleaved (GPT-NeoX) and concatenated (Phi-3) value rows, with biases: value-path error
    against the dense operator, isolated error against a copy with only that layer compressed."""
    ck, model, tok = _setup(ckpts, family, variant)
    _with_biases(model)
    layer, k = 1, 5
    texts = TEXTS[:3]
    plans = _plans(ck, {layer: k})
    (e,) = measure(model, ck, tok, plans, texts, disable=True).layers
    X = _value_inputs(model, family, layer, tok, texts)
    vo, o_full, H, G, hd = value_output_blocks(model, family, layer)
    n = H // G
    lost = total = 0.0
    for g in range(G):
        M = np.vstack([o_full[:, h * hd:(h + 1) * hd] @ vo[g] for h in range(g * n, (g + 1) * n)])
        V = np.linalg.svd(M)[2][:k].T
        lost += np.linalg.norm(M @ (np.eye(M.shape[1]) - V @ V.T) @ X) ** 2
        total += np.linalg.norm(M @ X) ** 2
    assert e.value_path_error == pytest.approx(np.sqrt(lost / total), rel=1e-8)
    only, zeroed = _compressed_copy(model, ck, [plans[layer]]), _zero_values(model, family, layer)
    num = den = 0.0
    for text in texts:
        ids = _ids(tok, text)
        seen = {}
        for tag, m in (("o", model), ("c", only), ("z", zeroed)):
            h = _out_proj(m, family, layer).register_forward_hook(
                lambda _m, _a, out, tag=tag: seen.__setitem__(tag, out[0].double().numpy()))
            with torch.no_grad():
                m(input_ids=ids)
            h.remove()
        num += np.sum((seen["c"] - seen["o"]) ** 2)
        den += np.sum((seen["o"] - seen["z"]) ** 2)
    assert e.isolated_error == pytest.approx(np.sqrt(num / den), rel=1e-9)
    assert e.accumulated_error == pytest.approx(e.isolated_error, rel=1e-12)
    hd_plans = _plans(ck, {0: hd, 1: hd})
    full = measure(model, ck, tok, hd_plans, texts[:1], disable=True)
    assert max(max(x.value_path_error, x.isolated_error, x.accumulated_error) for x in full.layers) < 1e-10
    assert full.kl_mean < 1e-10
