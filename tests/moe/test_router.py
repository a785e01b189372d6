"""`headlens router`: routing and statistics against a direct recomputation from the gate weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import MAX_PARAMS, PROMPT, build_model, build_tiny, save_checkpoint, tokenizer_for

from headlens.cli import main
from headlens.moe.dump import load_dump
from headlens.moe.statistics import csr_to_dense

TEXTS = [PROMPT, "Octopuses have three hearts, and two of them stop beating when they swim.", "The prime number."]


def _extra_moe(family: str):
    """Tiny Qwen2-MoE (shared expert, a dense first layer), DeepSeek-V2 (softmax, group-limited top-k) and
    DeepSeek-V3 (sigmoid + correction bias, grouped top-k), built through the config guard of tiny_models."""
    import transformers

    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "qwen2_moe":
        model = build_tiny(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, vocab_size=512,
                           hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, mlp_only_layers=[0], norm_topk_prob=False,
                           max_position_embeddings=256, **ids)
    elif family == "deepseek_v2":
        model = build_tiny(transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, vocab_size=512,
                           hidden_size=48, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
                           first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.0, max_position_embeddings=256,
                           **ids)
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.weight.normal_(0, 0.5)
    else:
        model = build_tiny(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, vocab_size=512,
                           hidden_size=48, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                           q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                           routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256, **ids)
        with torch.no_grad():  # a non-zero correction bias and router, so the grouped rule matters
            for layer in model.model.layers[1:]:
                layer.mlp.gate.weight.normal_(0, 0.5)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMS
    return model.eval()


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for fam in ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3"):
        model = build_model(fam) if fam in ("qwen3_moe", "mixtral", "olmoe") else _extra_moe(fam)
        tok = tokenizer_for("qwen3_moe")
        out[fam] = (save_checkpoint(model, tok, root / fam, "hf_dir"), model, tok)
    return out


def _reference_routing(model, tok, family: str):
    """Gate inputs hooked text by text (no padding), routed again by the family's rule written out here."""
    cfg = model.config
    per_layer: dict[int, list] = {}
    hooks = []
    base = model.model
    for i, layer in enumerate(base.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "weight") or gate.weight.dim() != 2 or "Router" not in type(gate).__name__:
            continue
        per_layer[i] = []
        hooks.append(gate.register_forward_pre_hook(lambda m, a, i=i: per_layer[i].append(a[0].reshape(-1, a[0].shape[-1]).detach())))
    with torch.no_grad():
        for text in TEXTS:
            base(input_ids=tok(text, return_tensors="pt")["input_ids"])
    for h in hooks:
        h.remove()
    k = cfg.num_experts_per_tok
    out = {}
    for i, xs in per_layer.items():
        x = torch.cat(xs).double()
        gate = base.layers[i].mlp.gate
        logits = x @ gate.weight.detach().double().T
        if family == "deepseek_v3":
            s = torch.sigmoid(logits)
            choice = s + gate.e_score_correction_bias.detach().double()
            E = s.shape[1]
            G = cfg.n_group
            gs = choice.view(-1, G, E // G).topk(2, -1)[0].sum(-1)
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(cfg.topk_group, -1)[1], 1)
            choice = choice.masked_fill(~keep.repeat_interleave(E // G, 1).bool(), float("-inf"))
            idx = choice.topk(k, -1)[1]
            w = s.gather(1, idx)
            w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        elif family == "deepseek_v2":
            p = torch.softmax(logits, -1)
            E = p.shape[1]
            G = cfg.n_group
            gmax = p.view(-1, G, E // G).max(-1).values
            keep = torch.zeros_like(gmax).scatter_(1, gmax.topk(cfg.topk_group, -1)[1], 1)
            p = p.masked_fill(~keep.repeat_interleave(E // G, 1).bool(), 0.0)
            w, idx = p.topk(k, -1)
            w = w * cfg.routed_scaling_factor
        else:
            p = torch.softmax(logits, -1)
            w, idx = p.topk(k, -1)
            if family == "mixtral" or cfg.norm_topk_prob:
                w = w / w.sum(-1, keepdim=True)
        out[i] = (logits, idx, w)
    return out


def _sorted_pairs(idx, w):
    o = torch.argsort(idx, 1)
    return torch.gather(idx, 1, o), torch.gather(w.double(), 1, o)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_routing_and_stats_against_direct_recomputation(moe_dirs, capsys, tmp_path, family):
    d, model, tok = moe_dirs[family]
    pf = tmp_path / "texts.txt"
    pf.write_text("\n".join(TEXTS) + "\n\n")
    code = main(["router", "--weights", str(d), "--prompt-file", str(pf), "--batch-size", "2",
                 "--out-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    report, layers, dispatch = load_dump(tmp_path / "out" / "router_dump")
    ref = _reference_routing(model, tok, family)
    assert report.moe_layers == sorted(ref)
    if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        assert report.dense_layers == [0] and "dense layers skipped: [0]" in out
    assert report.rule == {"deepseek_v3": "sigmoid_grouped_topk",
                           "deepseek_v2": "softmax_group_limited_topk"}.get(family, "softmax_topk")
    k = model.config.num_experts_per_tok
    for r, s in zip(layers, report.stats):
        logits, idx, w = ref[r.layer]
        T = logits.shape[0]
        assert r.indices.shape == (T, k) and report.tokens == T  # padding dropped, every real token kept
        torch.testing.assert_close(r.logits.double(), logits, rtol=1e-4, atol=1e-5)
        gi, gw = _sorted_pairs(r.indices, r.weights)
        ri, rw = _sorted_pairs(idx, w)
        assert torch.equal(gi, ri)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
        E = logits.shape[1]
        counts = np.bincount(idx.flatten().numpy(), minlength=E)
        assert counts.sum() == T * k
        np.testing.assert_allclose(s.load_share, counts / (T * k), rtol=1e-12)
        assert s.load_cv == pytest.approx(counts.std() / counts.mean(), rel=1e-9)
        assert s.dead_experts == [e for e in range(E) if counts[e] == 0]
        f = counts / counts.sum()
        nz = f[f > 0]
        assert s.load_entropy_norm == pytest.approx(-(nz * np.log(nz)).sum() / math.log(E), rel=1e-9)
        sets = [set(row) for row in idx.tolist()]
        for i in range(E):
            for j in range(E):
                if i != j and counts[i]:
                    both = sum(1 for st in sets if i in st and j in st)
                    assert s.coactivation[i][j] == pytest.approx(both / counts[i], abs=1e-12)
        if family == "deepseek_v3":
            sg = torch.sigmoid(logits)
            dist = sg / sg.sum(-1, keepdim=True)
        else:
            dist = torch.softmax(logits, -1)
        ent = -(dist * dist.log()).sum(-1).mean() / math.log(E)
        assert s.routing_entropy_norm == pytest.approx(float(ent), rel=1e-4)
        # consecutive tokens inside each text
        starts = np.cumsum([0] + [len(tok(t)["input_ids"]) for t in TEXTS])
        ov = [len(sets[t] & sets[t + 1]) / k for a, b in zip(starts, starts[1:]) for t in range(a, b - 1)]
        assert s.repeat_consecutive == pytest.approx(np.mean(ov), rel=1e-9)
        csr = {key.split("dispatch.")[1]: v for key, v in dispatch.items() if key.startswith(f"layer{r.layer}.")}
        dense = torch.zeros(T, E)
        dense.scatter_(1, r.indices, r.weights)
        torch.testing.assert_close(csr_to_dense(csr), dense)
    assert len(report.transitions) == len(layers) - 1
    assert [(t.source, t.target) for t in report.transitions] == list(zip(report.moe_layers, report.moe_layers[1:]))
    for t in report.transitions:
        assert np.asarray(t.counts).sum() == report.tokens
    for name in ("router_load.png", "router_coactivation.png", "router_entropy.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "out" / "router.html").read_text()
    assert "coloured by each token" in html and "data:image/png;base64" in html
    csv_text = (tmp_path / "out" / "router_stats.csv").read_text().splitlines()
    assert len(csv_text) == 1 + len(layers)


def test_dump_reloads_into_the_same_numbers(moe_dirs, capsys, tmp_path):
    d, _, _ = moe_dirs["mixtral"]
    assert main(["router", "--weights", str(d), "--prompt", PROMPT, "--out-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    import json

    raw = json.loads((tmp_path / "router_dump.json").read_text())
    report, layers, _ = load_dump(tmp_path / "router_dump.json")
    assert report.to_json() == raw
    assert [r.layer for r in layers] == report.moe_layers


def _bad(capsys, tmp_path, *argv) -> str:
    out_dir = tmp_path / "out"
    capsys.readouterr()
    code = main(["router", *argv, "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out_dir.exists()
    return err


def test_bad_input(moe_dirs, ckpts, capsys, tmp_path):
    dense = ckpts.path("llama", "gqa", "hf_dir")
    assert f"no MoE layers in {Path(dense).name}" in _bad(capsys, tmp_path, "--weights", str(dense), "--prompt", "hi")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    d = str(moe_dirs["qwen3_moe"][0])
    assert "is empty" in _bad(capsys, tmp_path, "--weights", d, "--prompt-file", str(empty))
    assert "--prompt is empty" in _bad(capsys, tmp_path, "--weights", d, "--prompt", " ")
    assert "needs a HuggingFace model directory" in _bad(capsys, tmp_path, "--weights",
                                                         str(ckpts.path("llama", "gqa", "pt")))
    assert "--color-layer 7 is out of range" in _bad(capsys, tmp_path, "--weights", d, "--prompt", PROMPT,
                                                     "--color-layer", "7")


def test_probabilities_are_not_softmaxed_twice():
    from headlens.moe.statistics import routing_distribution

    p = torch.softmax(torch.randn(5, 6, dtype=torch.float64), -1)
    dist, kind = routing_distribution(p, "softmax_topk")
    torch.testing.assert_close(dist, p)
    assert "already probabilities" in kind
    logits = torch.randn(5, 6, dtype=torch.float64)
    dist, kind = routing_distribution(logits, "softmax_topk")
    torch.testing.assert_close(dist, torch.softmax(logits, -1))
    dist, kind = routing_distribution(logits, "sigmoid_grouped_topk")
    torch.testing.assert_close(dist, torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True))


def test_router_from_a_hub_cache(moe_dirs, capsys, tmp_path, monkeypatch):
    from tiny_models import make_hub_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, model, tok = moe_dirs["olmoe"]
    make_hub_cache(model, tok, tmp_path / "hub", "org/tiny-olmoe")
    code = main(["router", "--hf-repo", "org/tiny-olmoe", "--cache-dir", str(tmp_path / "hub"), "--prompt", PROMPT,
                 "--out-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("tiny-olmoe: 2 MoE layers")
    report, _, _ = load_dump(tmp_path / "out" / "router_dump")
    assert report.model["name"] == "tiny-olmoe"


def test_route_from_python(moe_dirs, tmp_path):
    """The library entry point: typed result without the CLI, errors naming parameters (not flags)."""
    from headlens.errors import HeadlensError
    from headlens.io.source import ModelSource
    from headlens.moe.router import RouterConfig, route

    d, model, tok = moe_dirs["qwen2_moe"]
    r = route(ModelSource(weights=d), TEXTS, RouterConfig(batch_size=2, progress=False))
    assert r.report.moe_layers == [1, 2] and r.report.dense_layers == [0] and r.color_layer == 1
    assert r.report.tokens == sum(len(ids) for ids in r.token_ids) == sum(len(p) for p in r.token_pieces)
    assert [len(ids) for ids in r.token_ids] == [len(tok(t)["input_ids"]) for t in TEXTS]
    assert [(t.source, t.target) for t in r.report.transitions] == [(1, 2)]
    with pytest.raises(HeadlensError, match=r"^`batch_size` must be at least 1, got 0$"):
        RouterConfig(batch_size=0)
    with pytest.raises(HeadlensError, match=r"^`color_layer` 7 is out of range"):
        route(ModelSource(weights=d), PROMPT, RouterConfig(color_layer=7))
    with pytest.raises(HeadlensError, match=r"^`color_layer` 0 is not a MoE layer: choose one of \[1, 2\]$"):
        route(ModelSource(weights=d), PROMPT, RouterConfig(color_layer=0, progress=False))
