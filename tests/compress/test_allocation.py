"""Spending a byte budget (issue 24): the allocations against brute force and closed forms, the Fisher scores against
finite differences, the greedy rule's predicted ordering against measured losses, and equal bytes really equal."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headlens.compress.allocation import (Slot, allocate, fisher_scores, numbers_for, probe_sensitivities,
                                          refined_greedy, sensitivities, slots_of, split)
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

TEXTS = ["The cat sat on the mat and looked at the door.",
         "A dog ran in the park, barking at every bird it saw.",
         "Three and seven are prime numbers; nine is not."]


def _slot(i: int, sv: list[float], part: str = "values") -> Slot:
    s = torch.tensor(sorted(sv, reverse=True), dtype=torch.float64)
    return Slot(i, 0, part, s, float(torch.linalg.norm(s)))


spectra = st.lists(st.lists(st.floats(0.0, 10.0), min_size=4, max_size=4), min_size=2, max_size=3)


@settings(max_examples=40, deadline=None)
@given(spectra, st.integers(0, 12))
def test_error_and_greedy_are_optimal_by_brute_force(svs, total):
    """Every split of ``total`` numbers over the slots (each 0..4): the error allocation reaches the smallest largest
    relative error, the greedy allocation the largest kept sum of lambda sigma^2 (lambda per slot, closed form)."""
    slots = [_slot(i, sv) for i, sv in enumerate(svs)]
    total = min(total, 4 * len(slots))
    lam = {(s.layer, s.part): 1.0 + s.layer for s in slots}
    splits = [c for c in itertools.product(range(5), repeat=len(slots)) if sum(c) == total]
    best_err = min(max(s.rel(k) for s, k in zip(slots, c)) for c in splits)
    best_kept = max(sum(lam[(s.layer, s.part)] * float((s.spectrum[:k] ** 2).sum()) for s, k in zip(slots, c))
                    for c in splits)
    err = allocate("error", slots, total, 4)
    greedy = allocate("greedy", slots, total, 4, sensitivity=lam)
    assert sum(err.values()) == sum(greedy.values()) == total
    assert max(s.rel(err[s.key]) for s in slots) == pytest.approx(best_err, abs=1e-12)
    kept = sum(lam[(s.layer, s.part)] * float((s.spectrum[:greedy[s.key]] ** 2).sum()) for s in slots)
    assert kept == pytest.approx(best_kept, rel=1e-12, abs=1e-12)
    assert allocate("energy", slots, total, 4) == err  # kept energy 1 - e^2: the same sizes


def test_uniform_and_fisher_closed_forms():
    slots = [_slot(i, [4.0, 3.0, 2.0, 1.0] * 4) for i in range(4)]
    assert list(allocate("uniform", slots, 30, 16).values()) == [8, 8, 7, 7]
    fisher = {s.key: w for s, w in zip(slots, (1.0, 1.0, 2.0, 100.0))}
    sizes = allocate("fisher", slots, 30, 16, fisher=fisher)
    assert sum(sizes.values()) == 30
    assert sizes[slots[3].key] == 16  # capped, the rest shared 1 : 1 : 2
    assert [sizes[s.key] for s in slots[:3]] == [4, 3, 7] or [sizes[s.key] for s in slots[:3]] == [3, 4, 7]
    with pytest.raises(HeadlensError, match="does not fit 4 latents of 0..16"):
        allocate("uniform", slots, 65, 16)
    with pytest.raises(HeadlensError, match="greedy needs each layer's measured sensitivity"):
        allocate("greedy", slots, 8, 16)
    mixed = [_slot(0, [5.0, 4.0, 3.0, 2.0]), _slot(1, [1e-3] * 4, "keys")]
    for method in ("uniform", "error", "fisher"):
        sizes = allocate(method, mixed, 5, 4, fisher={m.key: 1.0 for m in mixed})
        assert sizes[mixed[1].key] >= 1 and sum(sizes.values()) == 5, method
    with pytest.raises(HeadlensError, match="a key latent keeps at least 1"):
        allocate("uniform", mixed, 0, 4)
    vk, kk = split({(0, 0, "values"): 3, (0, 1, "values"): 5, (1, 0, "keys"): 2, (1, 1, "keys"): 7})
    assert vk == {0: [3, 5]} and kk == {1: [2, 7]}


def test_refined_greedy_reallocates_with_the_lambdas_measured_where_it_cut():
    """The second round: lambdas measured at the first allocation's sizes (a part left whole keeps its first lambda,
    and is not probed), then the greedy allocation with them."""
    slots = [_slot(0, [4.0, 3.0, 2.0, 1.0]), _slot(1, [4.0, 3.0, 2.0, 1.0])]
    lam0 = {(0, "values"): 1.0, (1, "values"): 1.0}
    seen = []

    def reprobe(at):
        seen.append(dict(at))
        return {(0, "values"): 10.0}
    sizes = refined_greedy(slots, 4, 4, lam0, reprobe)
    assert seen == [allocate("greedy", slots, 4, 4, sensitivity=lam0)]
    assert sizes == allocate("greedy", slots, 4, 4, sensitivity={(0, "values"): 10.0, (1, "values"): 1.0})
    assert sizes[(0, 0, "values")] > sizes[(1, 0, "values")]
    asked = []
    lam = sensitivities(slots, lambda layer, part, ks: asked.append((layer, dict(ks))) or 2.0, 4,
                        at={(0, 0, "values"): 1, (1, 0, "values"): 4})
    assert asked == [(0, {0: 1})] and lam == {(0, "values"): pytest.approx(2.0 / (9 + 4 + 1))}


def _setup(ckpts, family="gpt_bigcode", variant="mqa"):
    model, tok = ckpts.model(family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    return ck, copy.deepcopy(model).double().eval(), tok


def test_numbers_for_is_the_bytes_in_closed_form(ckpts):
    ck, _, _ = _setup(ckpts, "qwen3", "gqa")
    s = ck.shape
    full = s.num_kv_heads * s.head_dim
    before = 2 * s.num_layers * full * 2
    n = numbers_for(0.4 * before, ck, list(range(s.num_layers)), 2, True, s.num_layers, 4)
    assert n == math.floor((0.4 * before - 4 * s.num_layers) / 2)
    assert n * 2 + 4 * s.num_layers <= 0.4 * before < (n + 1) * 2 + 4 * s.num_layers
    values_only = numbers_for(0.6 * before, ck, list(range(s.num_layers)), 2, False, 0, 4)
    assert values_only == math.floor((0.6 * before - s.num_layers * full * 2) / 2)
    with pytest.raises(HeadlensError, match="below what stays whole"):
        numbers_for(0.3 * before, ck, list(range(s.num_layers)), 2, False, 0, 4)


def _loss(model, ids, leaf_hook=None):
    out = model(input_ids=ids, use_cache=False)
    return float(torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum"))


def test_fisher_scores_against_finite_differences(ckpts):
    """F for layer 1's values and keys (the one kv group of GPT-BigCode MQA) equals the squared gradient summed by
    central differences over every coordinate of the projected tensor, in float64."""
    ck, model, tok = _setup(ckpts)
    text = TEXTS[0]
    F = fisher_scores(model, ck, tok, [text], [1], ("values", "keys"))
    ids = tok(text, return_tensors="pt")["input_ids"]
    T, hd, d = ids.shape[1], ck.shape.head_dim, ck.shape.hidden_size
    attn = model.transformer.h[1].attn
    eps = 1e-5
    for part, start in (("keys", d), ("values", d + hd)):  # c_attn's output: q (d), k (hd), v (hd)
        total = 0.0
        for t in range(T):
            for j in range(hd):
                vals = []
                for sign in (1.0, -1.0):
                    def bump(_m, _a, out, t=t, j=j, sign=sign):
                        out = out.clone()
                        out[0, t, start + j] += sign * eps
                        return out
                    h = attn.c_attn.register_forward_hook(bump)
                    try:
                        with torch.no_grad():
                            vals.append(_loss(model, ids))
                    finally:
                        h.remove()
                total += ((vals[0] - vals[1]) / (2 * eps)) ** 2
        assert F[(1, 0, part)] == pytest.approx(total / T, rel=1e-5)


def _full_plans(model, ck, tok, layers):
    from headlens.compress.allocate import full_plans
    from headlens.compress.key_attention import key_attention
    from headlens.compress.run import _key_plans

    with torch.no_grad(), key_attention(model, ck, layers) as state:
        state.probe(model)
        state.start("capture")
        for text in TEXTS:
            model(input_ids=tok(text, return_tensors="pt")["input_ids"], use_cache=False)
        keys = _key_plans(model, ck, layers, "data-aware", state)
    return full_plans(ck, layers, "plain", None, torch.float64), keys


def test_greedy_prediction_orders_the_measured_losses(ckpts):
    """Two layers, one kv group each: every allocation of 16 numbers over the 4 latents in steps of 4 (35 of them)
    measured on the calibration texts. The sensitivities are measured at half size; the allocation the greedy model
    predicts best is within 2x of the best measured loss (here 1.5x: the second predicted is the best measured), the predicted and measured orders agree (Spearman >=
    0.8), and the greedy allocation's predicted loss is the least of all that keep a key number."""
    from headlens.compress.allocate import cut
    from headlens.compress.keys import cut_keys
    from headlens.compress.measure import measure_many

    ck, model, tok = _setup(ckpts)
    layers = [0, 1]
    values, keys = _full_plans(model, ck, tok, layers)
    slots = slots_of(values, keys)
    assert len(slots) == 4
    lam = probe_sensitivities(model, ck, tok, TEXTS, values, keys, 2, disable=True)
    grid = [c for c in itertools.product(range(0, 17, 4), repeat=4) if sum(c) == 16]
    plan_sets, key_sets, predicted = [], [], []
    for c in grid:
        sizes = {s.key: k for s, k in zip(slots, c)}
        vk, kk = split(sizes)
        plan_sets.append({layer: cut(values[layer], v) for layer, v in vk.items()})
        key_sets.append({layer: cut_keys(keys[layer], v) for layer, v in kk.items()})
        predicted.append(sum(lam[(s.layer, s.part)] * s.tail2(sizes[s.key]) for s in slots))
    measured = [m.kl_mean for m in measure_many(model, ck, tok, plan_sets, TEXTS, disable=True, key_plans=key_sets)]
    best = min(measured)
    assert measured[predicted.index(min(predicted))] <= 2 * best  # the model is separable; the layers are not
    rank = lambda xs: [sorted(xs).index(x) for x in xs]  # noqa: E731
    rp, rm = rank(predicted), rank(measured)
    n = len(grid)
    spearman = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rp, rm)) / (n * (n * n - 1))
    assert spearman >= 0.8, spearman
    greedy = allocate("greedy", slots, 16, ck.shape.head_dim, sensitivity=lam)
    own = sum(lam[(s.layer, s.part)] * s.tail2(greedy[s.key]) for s in slots)
    keyed = [p for c, p in zip(grid, predicted) if all(k >= 1 for s, k in zip(slots, c) if s.part == "keys")]
    assert all(greedy[s.key] >= 1 for s in slots if s.part == "keys")  # a key latent keeps at least 1 number
    assert own <= min(keyed) + 1e-15


def test_byte_budgets_are_met_within_one_percent(ckpts):
    """`savings` with key latents: every configuration (greedy and its uniform twin) holds the budget's bytes within
    1% (and never above it), as kv_bytes counts them and as a LatentCache holds them after a generation."""
    import headlens as hl
    from headlens.compress.run import run_compress

    cfg = hl.CompressConfig(savings=[0.6, 0.75], latents="plain", keys="plain", allocate="greedy", generate=2)
    source = ModelSource(weights=ckpts.path("qwen3", "gqa", "hf_dir"))
    r = run_compress(source, cfg, TEXTS[:2], TEXTS[2:], disable=True)
    assert [c.allocation for c in r.configurations] == ["greedy", "uniform"] * 2
    for c, m, check in zip(r.configurations, r.measurements, r.cache_checks):
        budget = (1 - c.target) * m.kv.total_before
        assert budget * 0.99 <= m.kv.total_after <= budget, c.name
        assert check.agrees, c.name
    with pytest.raises(HeadlensError, match=r"`savings` 0.6: .*values alone save at most 50%"):
        run_compress(source, hl.CompressConfig(savings=0.6, latents="plain"), TEXTS[:2], TEXTS[2:], disable=True)


def test_cli_saving_and_allocate(ckpts, tmp_path):
    """`headlens compress --saving 0.6 --allocate error --keys plain`: the allocation and its uniform twin at the same
    bytes, side by side in compress_summary.json and its comparisons."""
    import json

    from headlens.cli import main

    ev, cal = tmp_path / "eval.txt", tmp_path / "calib.txt"
    ev.write_text("\n".join(TEXTS[:2]) + "\n")
    cal.write_text(TEXTS[2] + "\n")
    out = tmp_path / "out"
    assert main(["compress", "--weights", str(ckpts.path("qwen3", "gqa", "hf_dir")), "--eval", str(ev), "--calib",
                 str(cal), "--saving", "0.6", "--keys", "plain", "--latent", "plain", "--allocate", "error",
                 "--out-dir", str(out)]) == 0
    data = json.loads((out / "compress_summary.json").read_text())
    assert data["budget"] == "saving"
    a, u = data["configurations"]
    assert (a["allocation"], u["allocation"], u["matches"]) == ("error", "uniform", a["name"])
    assert a["kv_bytes_per_token_after"] == u["kv_bytes_per_token_after"]
    assert a["ks"] != u["ks"] or a["key_ks"] != u["key_ks"]
    (cmp,) = data["comparisons"]
    assert cmp["better"] in ("error", "uniform", "equal")


def test_allocate_with_a_target_spends_the_targets_bytes(ckpts):
    """`allocate` with a target: the configuration holds exactly the numbers of the target's own configuration
    (values and keys, as compress sizes them without `allocate`), spent by the method, its uniform twin beside it."""
    import headlens as hl
    from headlens.compress.run import run_compress

    source = ModelSource(weights=ckpts.path("qwen3", "gqa", "hf_dir"))
    base = dict(target_errors=[0.3], latents="plain", keys="plain")
    own = run_compress(source, hl.CompressConfig(**base), TEXTS[:2], TEXTS[2:], disable=True)
    ref = next(c for c in own.configurations if c.part == "both" and c.allocation == "budget")
    got = run_compress(source, hl.CompressConfig(**base, allocate="error"), TEXTS[:2], TEXTS[2:], disable=True)
    assert [c.allocation for c in got.configurations] == ["error", "uniform"]
    for c in got.configurations:
        assert c.latent_dims + c.key_dims == ref.latent_dims + ref.key_dims


def test_predicted_effects_against_finite_differences(ckpts):
    """The greedy model's per-number effects, ``lambda sigma_i^2`` summed over the numbers a cut drops, against the
    measured change of the end metric (finite differences: that part of that layer alone cut) at a second size, a
    quarter of head_dim dropped instead of the probe's half: within 2x for every (layer, part), and the values of the
    two layers in the same order."""
    from headlens.compress.allocate import cut
    from headlens.compress.keys import cut_keys
    from headlens.compress.measure import measure_many

    ck, model, tok = _setup(ckpts)
    values, keys = _full_plans(model, ck, tok, [0, 1])
    slots = slots_of(values, keys)
    lam = probe_sensitivities(model, ck, tok, TEXTS, values, keys, 2, disable=True)
    hd = ck.shape.head_dim
    k1 = 3 * hd // 4
    parts = sorted(lam)
    plan_sets, key_sets = [], []
    for layer, part in parts:
        plans = values if part == "values" else keys
        sized = (cut if part == "values" else cut_keys)(plans[layer], [k1] * len(plans[layer].groups))
        plan_sets.append({layer: sized} if part == "values" else {})
        key_sets.append({layer: sized} if part == "keys" else {})
    measured = [m.kl_mean for m in measure_many(model, ck, tok, plan_sets, TEXTS, disable=True, key_plans=key_sets)]
    predicted = [lam[p] * sum(s.tail2(k1) for s in slots if (s.layer, s.part) == p) for p in parts]
    for i in range(len(parts)):  # here 0.77-1.45x: the values' and the keys' (six decades lower on this model)
        assert predicted[i] / 2 <= measured[i] <= 2 * predicted[i], (parts[i], predicted[i], measured[i])
    big = [i for i, p in enumerate(predicted) if p > 1e-6]
    assert len(big) == 2  # the values of both layers
    order = sorted(big, key=lambda i: predicted[i])
    assert [measured[i] for i in order] == sorted(measured[i] for i in order)
