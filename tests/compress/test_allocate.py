"""headlens.compress.allocate and measure_many: budgets cut from the full-size plans equal plans fitted at those
sizes, target budgets equal the smallest k a dense float64 SVD gives, the uniform allocation has the same bytes,
and measuring several configurations at once gives what measuring each alone gives."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from reference import value_output_blocks

from headlens.circuits.budget import BudgetTarget
from headlens.compress.allocate import cut, cut_all, full_plans, read_budget, target_ks, uniform_ks
from headlens.compress.measure import measure, measure_many
from headlens.compress.plan import plan_layer, plan_layers
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

TEXTS = ["The cat sat on the mat and looked at the door.", "A dog ran in the park, barking at every bird it saw.",
         "Three and seven are prime numbers; nine is not."]


def _ck(ckpts, family="qwen3", variant="gqa"):
    return ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()


def _X(ck, seed=0, n=200):
    return torch.randn(ck.shape.hidden_size, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
def test_cut_equals_a_plan_fitted_at_that_size(ckpts, kind):
    ck = _ck(ckpts)
    X = _X(ck)
    full = full_plans(ck, [0, 1], kind, {0: X, 1: X}, load_dtype=torch.float64)
    for layer in (0, 1):
        ks = [3, 11]
        direct = plan_layers(ck, {layer: ks}, kind, {layer: X}, load_dtype=torch.float64)[0]
        got = cut(full[layer], ks)
        assert got.ks == ks and got.kind == kind
        assert got.predicted_error == pytest.approx(direct.predicted_error, rel=1e-10)
        for a, b in zip(got.groups, direct.groups):
            # the factors are unique up to the signs of singular vectors: compare W_V^g Q_g = up @ down
            assert torch.allclose(a.up @ a.down, b.up @ b.down, atol=1e-9)
            assert a.tail == pytest.approx(b.tail, rel=1e-10, abs=1e-14)
    with pytest.raises(HeadlensError, match="outside"):
        cut(full[0], [3, 17])


def test_target_ks_is_the_smallest_k_of_the_dense_spectrum(ckpts):
    ck = _ck(ckpts)
    model, _ = ckpts.model("qwen3", "gqa")
    full = full_plans(ck, [0, 1], "plain", load_dtype=torch.float64)
    for target in (0.05, 0.3, 0.6):
        ks = target_ks(full, BudgetTarget("error", target))
        for layer in (0, 1):
            vo, o_full, H, G, hd = value_output_blocks(copy.deepcopy(model).double(), "qwen3", layer)
            n = H // G
            for g in range(G):
                M = np.vstack([o_full[:, h * hd:(h + 1) * hd] @ vo[g] for h in range(g * n, (g + 1) * n)])
                s = np.linalg.svd(M, compute_uv=False)
                errs = [np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)) for k in range(len(s) + 1)]
                want = next(k for k, e in enumerate(errs) if e <= target + 1e-12)
                assert ks[layer][g] == want, (target, layer, g)
                assert cut(full[layer], ks[layer]).groups[g].predicted_error <= target + 1e-12


def test_uniform_ks_has_the_same_total_and_is_even():
    ks = {0: [3, 17], 2: [9, 0], 5: [16, 16]}
    u = uniform_ks(ks, 16)
    assert sorted(u) == [0, 2, 5]
    flat = [k for layer in sorted(u) for k in u[layer]]
    assert sum(flat) == sum(sum(v) for v in ks.values()) and max(flat) - min(flat) <= 1 and max(flat) <= 16


def test_measure_many_equals_measure_one_by_one(ckpts):
    model, tok = ckpts.model("qwen3", "gqa")
    model = copy.deepcopy(model).double()
    ck = _ck(ckpts)
    X = _X(ck, 1)
    full_p = full_plans(ck, [0, 1], "plain", load_dtype=torch.float64)
    full_d = full_plans(ck, [0, 1], "data-aware", {0: X, 1: X}, load_dtype=torch.float64)
    configs = [cut_all(full_p, {0: [4, 4], 1: [2, 9]}), cut_all(full_d, {1: [5, 5]}), cut_all(full_p, {0: [16, 1]})]
    together = measure_many(model, ck, tok, configs, TEXTS, disable=True)
    for plans, got in zip(configs, together):
        alone = measure(model, ck, tok, plans, TEXTS, disable=True)
        a, b = dataclasses.asdict(got), dataclasses.asdict(alone)
        for key in ("kl_mean", "kl_p95", "top1_agreement", "ppl_before", "ppl_after", "hidden_error"):
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), key
        for la, lb in zip(got.layers, alone.layers):
            for key in ("predicted_error", "value_path_error", "isolated_error", "accumulated_error"):
                assert getattr(la, key) == pytest.approx(getattr(lb, key), rel=1e-12, abs=1e-15), key
    assert together[0].kl_mean > together[2].kl_mean > 0  # the configurations really differ


def test_read_budget_refuses_other_weights(ckpts, tmp_path):
    from headlens.io.tables import write_csv

    ck = _ck(ckpts)
    rows = [{"layer": layer, "kv_head": g, "k_plain": 4, "k_data": 5, "model_weights": "abc"}
            for layer in range(ck.shape.num_layers) for g in range(ck.shape.num_kv_heads)]
    path = write_csv(tmp_path / "sweep_budget.csv", rows)
    assert read_budget(path, ck, "abc", ("plain", "data-aware")) == {
        "plain": {layer: [4] * ck.shape.num_kv_heads for layer in range(ck.shape.num_layers)},
        "data-aware": {layer: [5] * ck.shape.num_kv_heads for layer in range(ck.shape.num_layers)}}
    with pytest.raises(HeadlensError, match="belongs to another model"):
        read_budget(path, ck, "def", ("plain",))
    write_csv(path, [{**r, "k_plain": 17} for r in rows])
    with pytest.raises(HeadlensError, match="outside 0..16"):
        read_budget(path, ck, "abc", ("plain",))


def test_plan_layer_and_cut_agree_on_data_aware_exactness(ckpts):
    """The data-aware prediction is the value-path error on the calibration tokens themselves, after cutting."""
    ck = _ck(ckpts)
    X = _X(ck, 2, 300)
    full = full_plans(ck, [0], "data-aware", {0: X}, load_dtype=torch.float64)
    from headlens.circuits.heads import read_layer

    f = read_layer(ck, 0, with_qk=False, load_dtype=torch.float64)
    p = cut(full[0], [6, 2])
    _, total = p.cache_errors(f.W_V, X)
    assert total == pytest.approx(p.predicted_error, rel=1e-9)
    assert plan_layer(0, f.W_O, f.W_V, [6, 2], "data-aware", X).predicted_error == pytest.approx(total, rel=1e-9)


def test_batched_re_run_is_checked_and_falls_back(ckpts, monkeypatch):
    """The isolated re-runs of several configurations go through the block as one batch only after a check on the
    first text agreed with the one-by-one re-runs; when the batched form fails, the one-by-one numbers stand."""
    from headlens.compress import recorder as recorder_mod

    model, tok = ckpts.model("qwen3", "gqa")
    model = copy.deepcopy(model).double()
    ck = _ck(ckpts)
    full = full_plans(ck, [0, 1], "plain", load_dtype=torch.float64)
    configs = [cut_all(full, {0: [4, 4], 1: [2, 9]}), cut_all(full, {0: [7, 1], 1: [5, 5]})]
    used = []
    real = recorder_mod.Recorder._batched

    def spy(self, module, args, kwargs, cs, mode):
        used.append(mode)
        return real(self, module, args, kwargs, cs, mode)

    monkeypatch.setattr(recorder_mod.Recorder, "_batched", spy)
    batched = measure_many(model, ck, tok, configs, TEXTS, disable=True)
    assert used.count("iso-check") == 2 and used.count("iso-batch") == 2 * (len(TEXTS) - 1)

    def broken(self, module, args, kwargs, cs, mode):
        used.append("broken")
        raise RuntimeError("this family's block does not take a batch")

    monkeypatch.setattr(recorder_mod.Recorder, "_batched", broken)
    used.clear()
    fallback = measure_many(model, ck, tok, configs, TEXTS, disable=True)
    assert used == ["broken", "broken"]  # tried once per layer, then one by one
    for a, b in zip(batched, fallback):
        for la, lb in zip(a.layers, b.layers):
            assert la.isolated_error == pytest.approx(lb.isolated_error, rel=1e-12)
            assert la.value_path_error == pytest.approx(lb.value_path_error, rel=1e-12)
        assert a.kl_mean == pytest.approx(b.kl_mean, rel=1e-12)
