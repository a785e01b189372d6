"""The cross-head (TransMLA, per-frequency) key latent kept in a LatentCache, and the per-layer choice (issue 23).

References built here, not read from the library: the keys a cache should return, computed token by token with
explicit matrices from the rotated keys (``P x``) and from the pre-rotary keys (``R(p) P R(p)^-1 x``, R(p) the
family's rotation at position p as a matrix, inverted with torch.linalg.inv: the commutation the cache rests on);
transformers' DynamicCache; an independent count of the bytes reachable from the cache.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch

from headlens.compress.apply import FACTORS_FILE, LATENT_PLAN_FILE, save_latent_factors
from headlens.compress.cache import LatentCache
from headlens.compress.cross_keys import CrossKeyLatents, cross_latents
from headlens.compress.key_attention import key_attention
from headlens.compress.key_cache import KeyLatents, key_plan_entry
from headlens.compress.keys import KeyMoments, cut_keys, plan_keys, rotation_average
from headlens.compress.rotary_keys import attention_modules
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

PROMPT = torch.tensor([[5, 17, 33, 2, 41, 8, 99, 120, 64, 7, 250, 31]])
CALIB = (torch.arange(96) * 37 % 390 + 7).reshape(1, 96)  # 96 calibration tokens: every cross-head block well fitted
# Qwen3: G = 2, k_norm, every dimension rotated; GPT-NeoX: G = 4, 4 of 16 dims rotated; Phi: G = 2, 8 of 16
FAMILIES = [("qwen3", "gqa"), ("gpt_neox", "mha"), ("phi", "gqa")]


def _setup(ckpts, family, variant, dtype=torch.float64):
    model, _ = ckpts.model(family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    return copy.deepcopy(model).to(dtype).eval(), ck


def _plans(model, ck) -> dict:
    """Full-size data-aware key plans of every layer, from the calibration tokens."""
    layers = list(range(ck.shape.num_layers))
    with torch.no_grad(), key_attention(model, ck, layers) as st:
        st.start("capture")
        model(input_ids=CALIB, use_cache=False)
        return {layer: plan_keys(m, "data-aware") for layer, m in st.key_moments().items()}


def _cross(model, ck, k: int) -> dict[int, CrossKeyLatents]:
    """Every layer's cross-head key latent at G k numbers per token."""
    G = ck.shape.num_kv_heads
    return {layer: cross_latents(cut_keys(p, [k] * G)) for layer, p in _plans(model, ck).items()}


def _rotation(model, position: int, hd: int) -> torch.Tensor:
    """R(p) (hd, hd) float64 from the family's own rotate function on the basis vectors (cos/sin from the rotary
    module): the first cos.shape[-1] dims rotated, the rest passed."""
    attn = next(iter(attention_modules(model).values()))
    fn = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    rotary = next(m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb")
    cos, sin = rotary(torch.zeros(1, dtype=torch.float64), torch.tensor([[position]]))
    rot = cos.shape[-1]
    basis = torch.eye(rot, dtype=torch.float64)[None, None]
    cols = fn(basis, basis, cos.expand(1, rot, rot), sin.expand(1, rot, rot))[1][0, 0]  # row i = R e_i
    R = torch.eye(hd, dtype=torch.float64)
    R[:rot, :rot] = cols.T
    return R


def _hand_cache(model, rebuild):
    """A DynamicCache whose update replaces the new keys [1, G, T, hd] of layer l at position p, token by token, by
    ``rebuild(l, x, p)`` (x: the token's keys of every kv head side by side, G hd)."""
    from transformers import DynamicCache

    class Hand(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            past = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
            out = key_states.clone()
            G, T, hd = key_states.shape[1:]
            for t in range(T):
                x = key_states[0, :, t].reshape(G * hd)
                out[0, :, t] = rebuild(layer_idx, x, past + t).reshape(G, hd)
            return super().update(out, value_states, layer_idx, *args, **kwargs)

    return Hand(config=model.config)


def _generate(model, cache, n=12, ids=PROMPT):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# ------------------------------------------------------------------------------------------ (a) the cache, by hand


@pytest.mark.parametrize("family,variant", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_cross_head_cache_is_the_projection_of_rotated_keys_and_commutes(family, variant, ckpts):
    """float64, G k numbers per token with k = head_dim / 4: the keys the cache returns at every position (prefill
    and 5 decoding steps, every layer) equal P x by hand on the rotated keys, and equal R(p) P R(p)^-1 x (P applied
    to the pre-rotary keys and turned back), to 1e-6, and so do the logits; the cache keeps no positions and its
    keys slot holds [1, 1, tokens, G k]."""
    model, ck = _setup(ckpts, family, variant)
    G, hd = ck.shape.num_kv_heads, ck.shape.head_dim
    assert G > 1
    keys = _cross(model, ck, hd // 4)
    P = {layer: lat.up[0] @ lat.encode[0] for layer, lat in keys.items()}
    rot = {}

    def turned(layer, x, p):  # R(p) P R(p)^-1 x, every kv head turned alike
        if p not in rot:
            R = _rotation(model, p, hd)
            rot[p] = (torch.block_diag(*[R] * G), torch.block_diag(*[torch.linalg.inv(R)] * G))
        big, inv = rot[p]
        return big @ (P[layer] @ (inv @ x))

    cache = LatentCache({}, model.config, key_latents=keys, model=model)
    direct, commuted = _hand_cache(model, lambda layer, x, p: P[layer] @ x), _hand_cache(model, turned)
    seen = {layer: [] for layer in keys}
    for i, layer in enumerate(cache.layers):
        update = layer.update
        layer.update = (lambda upd, i: lambda k, v, *a, **kw: seen[i].append(upd(k, v, *a, **kw)) or seen[i][-1])(
            update, i)
    ids = PROMPT
    with torch.no_grad():
        for step in range(6):
            out = model(ids, past_key_values=cache).logits
            a, b = model(ids, past_key_values=direct).logits, model(ids, past_key_values=commuted).logits
            assert float((out - a).abs().max()) < 1e-6 and float((out - b).abs().max()) < 1e-6
            for i in keys:
                got = seen[i][-1][0]
                assert float((got - direct.layers[i].keys).abs().max()) < 1e-6
                assert float((got - commuted.layers[i].keys).abs().max()) < 1e-6
            if step == 0:  # the latent changes the model: the comparison has something to see
                assert float((out - model(ids, past_key_values=_dynamic(model)).logits).abs().max()) > 1e-3
            ids = out[:, -1:].argmax(-1)
    T = PROMPT.shape[1] + 5
    for layer in cache.layers:
        assert layer.positions is None and layer.keys.shape == (1, 1, T, G * hd // 4)


@pytest.mark.parametrize("family,variant", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_full_size_cross_head_latent_equals_dynamic_cache(family, variant, ckpts):
    """Every direction kept (G hd numbers): 12 greedy tokens and their logits as DynamicCache's, to 1e-5."""
    model, ck = _setup(ckpts, family, variant, torch.float32)
    keys = _cross(model, ck, ck.shape.head_dim)
    assert all(lat.ks == [ck.shape.num_kv_heads * ck.shape.head_dim] for lat in keys.values())
    seq, logits = _generate(model, LatentCache({}, model.config, key_latents=keys, model=model))
    seq_ref, logits_ref = _generate(model, _dynamic(model))
    assert torch.equal(seq, seq_ref) and float((logits - logits_ref).abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------ (b) bytes


def _reachable_bytes(obj) -> int:
    """Bytes of the distinct tensors reachable from ``obj``, less the factors (``latents``, ``key_latents``,
    ``_ready``: parameters of the cache, not cached tokens)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(v for key, v in x.items() if key not in ("latents", "key_latents", "_ready"))
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            stack.append(vars(x))
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def test_nbytes_counts_K_numbers_and_no_positions(ckpts):
    """Qwen3 float32, layer 0 cross-head (K = G 3 numbers), layer 1 per-group rotary (3 per group) with value
    latents (5 per group) on both: after T tokens nbytes is T (K + G 5) 4 for layer 0 and T (G 3 + G 5) 4 + T 4
    (int32 positions) for layer 1, and an independent count of the tensors reachable from the cache agrees."""
    from headlens.compress.plan import plan_layers

    model, ck = _setup(ckpts, "qwen3", "gqa", torch.float32)
    G = ck.shape.num_kv_heads
    plans = _plans(model, ck)
    keys = {0: cross_latents(cut_keys(plans[0], [3] * G)), 1: cut_keys(plans[1], [3] * G)}
    keys[1].form = "per_group"
    keys[1] = keys[1].cache_latents()
    assert keys[0].form == "across" and keys[1].form == "per_group" and keys[0].ks == [G * 3]
    values = plan_layers(ck, {0: 5, 1: 5}, "plain")
    cache = LatentCache.from_plans(model, ck, values, key_latents=keys)
    _generate(model, cache, n=9)
    T = PROMPT.shape[1] + 8
    assert cache.layers[0].positions is None and cache.layers[1].positions.shape == (1, T)
    assert cache.nbytes() == T * (G * 3 + G * 5) * 4 + T * ((G * 3 + G * 5) * 4 + 4)
    assert _reachable_bytes(cache) == cache.nbytes()


# ------------------------------------------------------------------------------------------ (c) saved and read


def test_cross_head_factors_saved_and_read_back(ckpts, tmp_path):
    """save_latent_factors + key_plan_entry (key_form across, key_kv_heads): from_pretrained gives the same logits
    as the factors in memory; a cache of cross-head latents alone needs no model (nothing to turn)."""
    model, ck = _setup(ckpts, "gpt_neox", "mha", torch.float32)
    keys = _cross(model, ck, 5)
    model.config.save_pretrained(tmp_path)
    save_latent_factors([], tmp_path / FACTORS_FILE, key_latents=keys)
    entries = [{"layer": layer, **key_plan_entry(lat)} for layer, lat in keys.items()]
    assert entries[0]["key_form"] == "across" and entries[0]["key_kv_heads"] == 4 and entries[0]["key_k"] == [20]
    (tmp_path / LATENT_PLAN_FILE).write_text(json.dumps({"layers": entries}))
    memory = LatentCache({}, model.config, key_latents=keys, model=model)
    for read in (LatentCache.from_pretrained(tmp_path, model=model), LatentCache.from_pretrained(tmp_path)):
        assert all(isinstance(lat, CrossKeyLatents) and lat.rotary for lat in read.key_latents.values())
        with torch.no_grad():
            a = model(PROMPT, past_key_values=read).logits
            b = model(PROMPT, past_key_values=LatentCache({}, model.config, key_latents=keys, model=model)).logits
        assert float((a - b).abs().max()) < 1e-6
    del memory
    entries[0]["key_form"] = "sideways"
    (tmp_path / LATENT_PLAN_FILE).write_text(json.dumps({"layers": entries}))
    with pytest.raises(HeadlensError, match="layer 0 has key_form 'sideways': per_group or across$"):
        LatentCache.from_pretrained(tmp_path)


def test_bad_cross_head_factors_are_one_line(ckpts):
    model, ck = _setup(ckpts, "qwen3", "gqa", torch.float32)
    lat = _cross(model, ck, 4)[0]
    bad = CrossKeyLatents(0, [lat.encode[0] * 2], lat.up, None, True, kv_heads=2)
    with pytest.raises(HeadlensError, match="^layer 0: the cross-head key encoder does not invert its up-projection"):
        LatentCache({}, model.config, key_latents={0: bad}, model=model)
    wrong = CrossKeyLatents(0, lat.encode, lat.up, None, True, kv_heads=4)
    with pytest.raises(HeadlensError, match="have 4 kv groups in layer 0, but the model has 2 kv heads"):
        LatentCache({}, model.config, key_latents={0: wrong}, model=model)


# ------------------------------------------------------------------------------------------ (d) the choice


def _moments(Kg: torch.Tensor, pairs) -> KeyMoments:
    """Moments of G groups' keys Kg (G, hd, N) under isotropic queries."""
    G, hd, N = Kg.shape
    Cq = rotation_average(torch.eye(hd, dtype=torch.float64).expand(G, hd, hd).clone(), pairs)
    flat = Kg.reshape(G * hd, N)
    return KeyMoments(layer=0, Cq=Cq, Ck=torch.einsum("gin,gjn->gij", Kg, Kg), rotary=True, bias=None,
                      Ck_cross=flat @ flat.T, pairs=list(pairs))


def test_the_form_with_the_lower_prediction_is_kept():
    """Rotary pairs on 12 of 16 dims (4 unrotated): identical keys in both kv heads share everything across heads, so
    the cross-head latent predicts less loss and is kept (`across`); independent heads whose keys lie in a
    3-dimensional subspace each, mixing frequencies, are kept whole by 3 numbers per group, so `per_group` is
    kept; at full size (a tie) the per-group latent stays. The kept form's bytes and prediction follow it."""
    hd, G, N = 16, 2, 200
    pairs = [(i, i + 6) for i in range(6)]
    gen = torch.Generator().manual_seed(0)
    K0 = torch.randn(hd, N, generator=gen, dtype=torch.float64)
    shared = plan_keys(_moments(torch.stack([K0, K0]), pairs), "data-aware")
    plan = cut_keys(shared, [8, 8])
    assert plan.frequency_latent().predicted_error < 1e-4 < 0.5 < plan.predicted_error  # (a ridge: K_f is singular)
    assert plan.form == "across" and plan.numbers == 16 and not plan.stores_positions
    assert plan.kept_predicted_error == plan.frequency_latent().predicted_error
    Kg = torch.stack([torch.randn(hd, 3, generator=gen, dtype=torch.float64)
                      @ torch.randn(3, N, generator=gen, dtype=torch.float64) for _ in range(G)])
    own = cut_keys(plan_keys(_moments(Kg, pairs), "data-aware"), [3, 3])
    assert own.predicted_error < 1e-4 < 0.1 < own.frequency_latent().predicted_error
    assert own.form == "per_group" and own.numbers == 6 and own.stores_positions
    assert own.cache_latents().form == "per_group" and plan.cache_latents().form == "across"
    for full in (shared, plan_keys(_moments(Kg, pairs), "data-aware")):
        assert full.form == "per_group"  # everything kept by both: a tie
    # the rule, over sizes: across exactly where its prediction is lower
    for k in range(1, hd):
        for p in (cut_keys(shared, [k, k]), cut_keys(plan_keys(_moments(Kg, pairs), "data-aware"), [k, k])):
            f, g = p.frequency_latent().predicted_error, p.predicted_error
            assert p.form == ("across" if f < g - 1e-9 else "per_group")
            assert p.frequency_latent().numbers <= 2 * k


# ------------------------------------------------------------------------------------------ (e) a compress run


def _shared_keys_checkpoint(tmp_path):
    """A tiny Qwen3 (G = 2) whose layer 1 gives both kv heads the same key weights (and k_norm is shared): its keys
    are the same in both heads, which the cross-head latent stores once."""
    from tiny_models import build_model, save_checkpoint, tokenizer_for

    model = build_model("qwen3", "gqa")
    k = model.model.layers[1].self_attn.k_proj.weight
    hd = k.shape[0] // 2
    with torch.no_grad():
        k[hd:] = k[:hd]
    out = tmp_path / "shared"
    out.mkdir()
    return save_checkpoint(model, tokenizer_for("qwen3"), out, "hf_dir")


def test_compress_keeps_the_predicted_form_and_caches_it(tmp_path):
    """run_compress with data-aware keys on a model whose layer 1 shares its keys across kv heads: every key_layers
    entry of compress_summary.json says which form was kept, the one with the lower prediction (layer 1: across);
    the planned bytes count no positions for an across layer, and --generate's LatentCache holds exactly them; the
    saved model's plan entries say key_form, and its cache generates as the result's."""
    import headlens as hl

    path = _shared_keys_checkpoint(tmp_path)
    texts = ["The quick brown fox jumps over the lazy dog and runs into the forest to find its friends. " * 2,
             "A small language model reads texts, predicts the next token, and keeps a cache of keys and values."]
    calib = ["Key latents store fewer numbers per token than the keys themselves, rebuilt on read. " * 2,
             "Rotary keys turn by their position; a map across heads commutes with that turn."]
    cfg = hl.CompressConfig(ks=[8], latents="data-aware", keys="data-aware", generate=4)
    r = hl.run_compress(hl.ModelSource(weights=path), cfg, texts, calib, disable=True, keep_model=True)
    summary = r.to_json()
    for rec in summary["configurations"]:
        for e in rec["key_layers"]:
            if e["key_ks"] is None:
                continue
            f, g = e["key_frequency_predicted_error"], e["key_predicted_error"]
            assert e["key_form"] == ("across" if f is not None and f < g - 1e-9 else "per_group")
    alone = next(i for i, c in enumerate(r.configurations) if c.part == "keys")
    forms = {e.layer: e.key_form for e in r.measurements[alone].key_layers}
    assert forms[1] == "across"
    key_plans = r.kept[4][alone]
    G, hd = 2, 16
    for layer, p in key_plans.items():
        numbers = G * 8 + G * hd  # keys alone (G 8 numbers in either form), values full
        position = 0 if p.form == "across" else 4
        assert r.measurements[alone].kv.after[layer] == numbers * cfg.kv_bytes + position
    for check in r.cache_checks:
        assert check.agrees, (check.numbers_per_token, check.planned_numbers_per_token)
    assert any(n.startswith(r.configurations[alone].name + ": the cache keeps the cross-head") for n in r.notes)
    out = tmp_path / "saved"
    r.save_model(r.configurations[alone].name, out)
    entries = {e["layer"]: e for e in json.loads((out / LATENT_PLAN_FILE).read_text())["layers"]}
    assert entries[1]["key_form"] == "across" and entries[1]["key_kv_heads"] == G
    model, tok = hl.load_compressed(out)
    ids = tok(texts[0], return_tensors="pt")["input_ids"][:, :10]
    with torch.no_grad():
        a = model.generate(ids, past_key_values=hl.LatentCache.from_pretrained(out, model=model), max_new_tokens=6,
                           do_sample=False)
        b = r.kept[0].generate(ids, past_key_values=r.latent_cache(r.configurations[alone].name), max_new_tokens=6,
                               do_sample=False)
    assert a.tolist() == b.tolist()
    assert math.isfinite(summary["configurations"][alone]["kl_mean"])


def test_per_group_key_latents_still_store_positions():
    """A per-group KeyLatents keeps its form and un-rotates where rotary; a cross-head one never does."""
    E = torch.eye(4, dtype=torch.float64)
    assert KeyLatents(0, [E], [E], None, True).unrotates
    assert not CrossKeyLatents(0, [torch.eye(8, dtype=torch.float64)], [torch.eye(8, dtype=torch.float64)], None,
                               True, kv_heads=2).unrotates


def test_cross_head_layers_slide_crop_and_beam(ckpts):
    """Gemma 3 (G = 2; sliding-window layers of window 4 beside global ones, local and global RoPE), every direction
    kept: a left-padded batch of two, beam search, and a crop then a manual loop give DynamicCache's tokens and
    logits (1e-5); a sliding layer keeps only its window of latents; reordering rows moves the latents with them."""
    model, ck = _setup(ckpts, "gemma3", "gqa", torch.float32)
    keys = _cross(model, ck, ck.shape.head_dim)
    assert all(isinstance(lat, CrossKeyLatents) for lat in keys.values())

    def fresh():
        return LatentCache({}, model.config, key_latents=keys, model=model)

    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 2], [9, 8, 7, 6, 5, 4, 3]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    cache = fresh()
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
        b = model.generate(ids, attention_mask=mask, past_key_values=_dynamic(model), **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert float((torch.stack(a.logits) - torch.stack(b.logits)).abs().max()) < 1e-5
    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    assert len(lengths) == 2 and all(layer.positions is None for layer in cache.layers)  # a window, and the rest
    before = [layer.keys.clone() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert all(torch.equal(layer.keys, k.flip(0)) for layer, k in zip(cache.layers, before))
    with torch.no_grad():
        a = model.generate(PROMPT, past_key_values=fresh(), num_beams=3, **kw)
        b = model.generate(PROMPT, past_key_values=_dynamic(model), num_beams=3, **kw)
    assert torch.equal(a.sequences, b.sequences)
    cache, ref = fresh(), _dynamic(model)
    with torch.no_grad():
        model(PROMPT[:, :3], past_key_values=cache), model(PROMPT[:, :3], past_key_values=ref)
        cache.crop(-1)  # (within the window: transformers refuses a crop past it without past recording)
        ref.crop(-1)
        nxt = PROMPT[:, 2:3]
        for _ in range(6):
            out, out_ref = model(nxt, past_key_values=cache), model(nxt, past_key_values=ref)
            assert float((out.logits - out_ref.logits).abs().max()) < 1e-5
            nxt = out.logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == ref.get_seq_length() == 8


def test_plain_key_latents_have_the_cross_head_form_too(ckpts):
    """Plain (weight-only) moments carry the kv heads' joint key moment: a rotary layer with G > 1 gets a frequency
    latent, exact at full size; where both kv heads have the same key weights, it is kept at half size."""
    from headlens.compress.keys import plain_moments

    model, ck = _setup(ckpts, "qwen3", "gqa")
    with torch.no_grad():
        k = model.model.layers[1].self_attn.k_proj.weight
        k[16:] = k[:16]
    st_pairs = [(i, i + 8) for i in range(8)]  # Qwen3's rotate-half pairs (head_dim 16)
    for layer in (0, 1):
        full = plan_keys(plain_moments(model, ck, layer, True, st_pairs, bias_subtracted=False), "plain")
        assert full.frequency is not None and full.frequency.at(32).predicted_error < 1e-6
        half = cut_keys(full, [8, 8])
        assert half.form == ("across" if layer == 1 else half.form)
    assert cut_keys(full, [8, 8]).frequency_latent().predicted_error < 1e-4  # layer 1: shared heads, nothing lost
