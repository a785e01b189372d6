"""``headlens generate``, ``compress --generate``, ``hl.load_compressed`` and ``CompressResult.latent_cache`` (issue 22).

References are computed without headlens's cache: transformers' own ``generate`` with ``DynamicCache``, and the
weight-replaced model (``apply_plans``: ``W_V^g`` replaced by ``W_V^g Q_g``, what the exported checkpoint holds) run
without a cache, its KL against the original taken in float64 here. Models run in float32 on the CPU.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

import headlens as hl
from headlens.cli import main
from headlens.io.embedded import default_texts, embedded_dir

PROMPT = "The function returns a new list. If the argument is omitted,"


def _eval_file(tmp_path, n: int = 2):
    path = tmp_path / "eval.txt"
    path.write_text("\n".join(default_texts("tiny-lm").eval[:n]) + "\n")
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """compress --save-model on tiny-lm (k = 16, plain, two eval texts): the exported directory."""
    root = tmp_path_factory.mktemp("generate")
    assert main(["compress", "--model", "tiny-lm", "--k", "16", "--latent", "plain", "--eval",
                 str(_eval_file(root)), "--out-dir", str(root / "o"), "--save-model", str(root / "m")]) == 0
    return root / "m"


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_dir("tiny-lm"), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(embedded_dir("tiny-lm"))


def _generate_cli(capsys, tmp_path, *argv) -> tuple[dict, str]:
    capsys.readouterr()
    code = main(["generate", *argv, "--out-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    return json.loads((tmp_path / "out" / "generate.json").read_text()), out


def _replaced(model, plans):
    """A copy of the Qwen3 ``model`` whose value weights are ``W_V^g Q_g = U_g P_g``, computed here in float64 from the
    plans' factors and not rounded to the checkpoint's bfloat16 (as ``apply_plans`` rounds what it writes): the
    model whose values the LatentCache rebuilds."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for plan in plans:
            W = out.model.layers[plan.layer].self_attn.v_proj.weight  # (G hd, d)
            for g in plan.groups:
                hd = g.up.shape[0]
                W[g.kv_head * hd:(g.kv_head + 1) * hd] = (g.up.double() @ g.down.double()).to(W.dtype)
    return out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> np.ndarray:
    lp, lq = _log_softmax(p_logits.double().numpy()), _log_softmax(q_logits.double().numpy())
    return (np.exp(lp) * (lp - lq)).sum(-1)


# ------------------------------------------------------------------------------------------- the greedy loop


def test_the_greedy_loop_is_transformers_generate(tiny_lm):
    """headlens's timed loop (prefill, then one-token steps) gives the tokens of transformers' greedy ``generate``
    (which stops at an end-of-text token: compared up to it), and the cache it filled holds prompt + N - 1 tokens
    whose bytes are its tensors'."""
    from transformers import DynamicCache

    from headlens.compress.decode import greedy

    model, tok = tiny_lm
    ids = tok(PROMPT, return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    g = greedy(model, ids, cache, 12)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert len(g.tokens) == 12 and g.tokens[:len(ref)] == ref and len(ref) >= 4
    assert g.cached_tokens == ids.shape[1] + 11
    assert g.cache_bytes == 6 * 2 * (2 * 64) * 4 * g.cached_tokens  # layers x (k, v) x kv heads x hd x float32
    assert g.prefill_seconds > 0 and g.decode_seconds > 0


# ------------------------------------------------------------------------------------------- generate on the fly


def test_full_size_latents_change_nothing(capsys, tmp_path):
    """k = head_dim: the LatentCache holds keys + sum_g k_g = keys + values numbers, so the bytes are DynamicCache's
    (ratio 1.0); the texts are the same and the KL is zero to float32 rounding."""
    data, out = _generate_cli(capsys, tmp_path, "--k", "64", "--max-new-tokens", "8")
    assert data["kv_bytes_ratio"] == 1.0
    assert data["original"]["kv_bytes_per_token"] == data["compressed"]["kv_bytes_per_token"] == 6144
    assert data["greedy_agreement"] == 1.0 and data["top1_agreement"] == 1.0
    assert data["kl_mean"] < 1e-9
    assert all(p["original"] == p["compressed"] and p["first_divergence"] is None for p in data["prompts"])
    assert len(data["prompts"]) == 4 and all(p["prompt_tokens"] <= 16 for p in data["prompts"])  # shipped openings
    assert "note: prompts: the first 16 tokens of 4 eval texts shipped for tiny-lm" in out
    assert "cache bytes per token: compressed / original = 1.0000" in out


def test_k16_against_the_weight_replaced_model(capsys, tmp_path, tiny_lm):
    """k = 16 of 64: the cache holds 6 x (128 + 32) numbers per token instead of 6 x 256 (ratio 0.625 exactly); the
    compressed continuation is the weight-replaced model's greedy ``generate``; the KL per position is the one
    computed here between the original and the weight-replaced model without any cache."""
    from transformers import DynamicCache

    from headlens.compress.plan import plan_layers

    n = 10
    data, out = _generate_cli(capsys, tmp_path, "--k", "16", "--prompt", PROMPT, "--max-new-tokens", str(n))
    assert data["kv_bytes_ratio"] == 0.625
    assert data["original"]["kv_bytes_per_token"] == 6144 and data["compressed"]["kv_bytes_per_token"] == 3840
    assert data["compressed"]["kv_bytes_per_value"] == 4 and data["dtype"] == "float32"
    assert data["latents"]["ks"] == {str(layer): [16, 16] for layer in range(6)}
    (p,) = data["prompts"]
    model, tok = tiny_lm
    ck = hl.ModelSource(embedded="tiny-lm").checkpoint()
    replaced = _replaced(model, plan_layers(ck, {layer: 16 for layer in range(6)}, "plain"))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = lambda m: m.generate(ids, past_key_values=DynamicCache(config=m.config), max_new_tokens=n,  # noqa: E731
                                    do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert p["original_ids"] == want(model)  # (this prompt meets no end-of-text token within n)
        assert p["compressed_ids"] == want(replaced)
        forced = torch.tensor([ids[0].tolist() + p["original_ids"][:-1]])
        a, b = model(forced, use_cache=False).logits[0, -n:], replaced(forced, use_cache=False).logits[0, -n:]
    kl = _kl(a, b)
    np.testing.assert_allclose(p["kl"], kl, rtol=1e-3, atol=1e-8)
    assert data["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-8) and data["kl_mean"] > 1e-5
    assert p["top1_agreement"] == float((b.argmax(-1) == torch.tensor(p["original_ids"])).float().mean())
    first = next((i for i, (x, y) in enumerate(zip(p["original_ids"], p["compressed_ids"])) if x != y), None)
    assert p["first_divergence"] == first and p["greedy_agreement"] == (1.0 if first is None else first / n)
    for field in ("kv_bytes_per_token", "tokens_per_second", "prefill_seconds", "decode_seconds", "cached_tokens"):
        assert field in data["original"] and field in data["compressed"]
    assert data["original"]["tokens_per_second"] > 0 and data["compressed"]["cache"] == "LatentCache"
    assert "original:   tiny-lm (qwen3, float32) with DynamicCache" in out
    assert f"  original:   {tok.decode(p['original_ids'], skip_special_tokens=True)!r}" in out


def test_data_aware_and_a_layer_subset(capsys, tmp_path):
    """Data-aware latents on layers 0 and 1 only: the other four layers keep full values, so the cache holds
    4 x 256 + 2 x (128 + 2 x 8) numbers per token."""
    data, _ = _generate_cli(capsys, tmp_path, "--k", "8", "--latent", "data-aware", "--layers", "0:2", "--prompt",
                            PROMPT, "--max-new-tokens", "4")
    assert data["latents"]["kind"] == "data-aware" and data["latents"]["ks"] == {"0": [8, 8], "1": [8, 8]}
    assert data["compressed"]["kv_bytes_per_token"] == (4 * 256 + 2 * (128 + 16)) * 4
    assert any("calibration texts" in n for n in data["notes"])


def test_the_library_call_and_its_repr():
    r = hl.run_generate(hl.ModelSource(embedded="tiny-lm"), hl.GenerateConfig(prompts=PROMPT, max_new_tokens=3))
    assert isinstance(r, hl.GenerateResult) and r.latents["ks"]["0"] == [16, 16]  # default k = head_dim / 4
    shown = repr(r)
    assert shown.startswith("<GenerateResult tiny-lm (plain k=16): 1 prompt(s) x 3 tokens") and "B/token" in shown
    assert json.loads(json.dumps(r.to_json(), allow_nan=False))["max_new_tokens"] == 3
    with pytest.raises(hl.HeadlensError, match="`source` is required"):
        hl.run_generate(cfg=hl.GenerateConfig(k=4))
    with pytest.raises(hl.HeadlensError, match=r"`max_new_tokens` must be an integer, got str '8'"):
        hl.GenerateConfig(max_new_tokens="8")


# ------------------------------------------------------------------------------------------- saved directories


def test_generate_with_a_compressed_directory(capsys, tmp_path, saved):
    """--compressed: the exported model with LatentCache.from_pretrained against the original it records (the
    embedded tiny-lm); the compressed continuation is the exported model's own greedy generate with DynamicCache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    data, out = _generate_cli(capsys, tmp_path, "--compressed", str(saved), "--prompt", PROMPT,
                              "--max-new-tokens", "8")
    assert data["original"]["model"] == "the embedded tiny-lm (qwen3, float32)"
    assert data["compressed"]["model"] == f"the exported model {saved}"
    assert data["kv_bytes_ratio"] == 0.625 and data["latents"]["what"] == "plain k=16"
    exported = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(saved)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = exported.generate(ids, past_key_values=DynamicCache(config=exported.config), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert data["prompts"][0]["compressed_ids"] == ref
    assert not any("cannot be read here" in n for n in data["notes"])


def test_an_original_that_cannot_be_read_is_said(capsys, tmp_path, saved):
    """A directory whose recorded original is gone compares LatentCache with DynamicCache on the exported model, and
    says so: the two agree to the bfloat16 rounding of the exported value weights."""
    import shutil

    d = tmp_path / "moved"
    shutil.copytree(saved, d)
    record = json.loads((d / "headlens_latent.json").read_text())
    record["source"] = {"name": "gone", "source": str(tmp_path / "gone")}
    (d / "headlens_latent.json").write_text(json.dumps(record))
    data, out = _generate_cli(capsys, tmp_path, "--compressed", str(d), "--prompt", PROMPT, "--max-new-tokens", "6")
    assert data["original"]["model"].startswith(f"the exported model {d}")
    assert "compares LatentCache with DynamicCache on the same weights" in out
    assert data["kl_mean"] < 1e-4 and data["kv_bytes_ratio"] == 0.625


def test_load_compressed(saved):
    """The exported model in its stored dtype (bfloat16), eval mode, generating with its LatentCache; the same in
    float32 on request; a directory that is not one, refused."""
    model, tok = hl.load_compressed(saved)
    assert model.dtype == torch.bfloat16 and not model.training and type(model).__name__ == "Qwen3ForCausalLM"
    cache = hl.LatentCache.from_pretrained(saved)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 and cache.get_seq_length() == ids.shape[1] + 4
    assert cache.nbytes() == (ids.shape[1] + 4) * 6 * (128 + 32) * 2  # bfloat16 keys and latents
    model32, _ = hl.load_compressed(saved, dtype="float32")
    assert model32.dtype == torch.float32
    with pytest.raises(hl.HeadlensError, match="has no headlens_latent.json"):
        hl.load_compressed(embedded_dir("tiny-lm"))
    with pytest.raises(hl.HeadlensError, match="`compressed` must be a path"):
        hl.load_compressed(3)


def test_the_readme_latent_cache_example_runs(saved, tmp_path, monkeypatch, capsys):
    """The README's LatentCache block, run as written, in a directory holding the model it names."""
    import shutil

    from test_api import _readme_block

    code = _readme_block("hl.load_compressed(")
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "headlens-out" / "tiny-lm-k16"
    shutil.copytree(saved, target)
    assert "headlens-out/tiny-lm-k16" in code
    exec(compile(code, "README.md (LatentCache example)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("LatentCache(6 layers, 6 storing value latents (sum of k = 192)"), out
    tokens, nbytes = (int(x) for x in out[-2].split())
    assert nbytes == tokens * 6 * (128 + 32) * 2  # bfloat16: 0.625 of the 6 x 256 x 2 bytes of a DynamicCache


def test_result_latent_cache(tiny_lm):
    """CompressResult.latent_cache(name) on the kept model generates as the weight-replaced model does; without
    keep_model it is refused, naming the parameter."""
    from transformers import DynamicCache

    src = hl.ModelSource(embedded="tiny-lm")
    cfg = hl.CompressConfig(ks=8, latents="plain", layers="0:3")
    result = hl.run_compress(src, cfg, [PROMPT], keep_model=True)
    cache = result.latent_cache("plain k=8")
    model, ck, tok, plans, _ = result.kept
    replaced = _replaced(model, list(plans[0].values()))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(ids, past_key_values=cache, **kw)
        b = replaced.generate(ids, past_key_values=DynamicCache(config=replaced.config), **kw)
    assert torch.equal(a, b)
    assert cache.nbytes() == cache.get_seq_length() * (3 * 256 + 3 * (128 + 16)) * 4
    with pytest.raises(hl.HeadlensError, match="no configuration 'plain k=9': choose one of plain k=8"):
        result.latent_cache("plain k=9")
    plain = hl.run_compress(src, cfg, [PROMPT])
    with pytest.raises(hl.HeadlensError, match="the model was not kept: run with `keep_model` True"):
        plain.latent_cache("plain k=8")


# ------------------------------------------------------------------------------------------- compress --generate


def test_compress_generate_measures_the_planned_bytes(capsys, tmp_path):
    """Every configuration's LatentCache, measured after a generation, holds the planned numbers per token (keys
    at full size + sum_g k_g per layer): at float32 4 bytes each against the plan's 2 (--kv-bytes), on a layer subset
    too (the layers left out hold full values, as the plan counts them)."""
    out_dir = tmp_path / "out"
    capsys.readouterr()
    assert main(["compress", "--k", "16,64", "--latent", "plain", "--layers", "0:4", "--eval",
                 str(_eval_file(tmp_path)), "--generate", "5", "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    s = json.loads((out_dir / "compress_summary.json").read_text())
    assert s["generate"]["tokens"] == 5 and s["generate"]["prompt"]
    for r in s["configurations"]:
        k = int(r["name"].split("=")[1])
        numbers = 4 * (128 + 2 * k) + 2 * 256
        assert r["kv_bytes_per_token_after"] == numbers * 2
        assert r["kv_bytes_per_token_measured"] == numbers * 4 and r["kv_bytes_per_value_measured"] == 4
        assert r["kv_measured_matches_plan"] is True and r["generated_text"]
        assert f"measured {numbers * 4} B/token at 4 B/number = {numbers} numbers/token; planned {numbers} " in out
    assert out.count(": agree") == 2


def test_compress_generate_flags_a_sliding_window(capsys, tmp_path, ckpts):
    """Gemma 2's sliding layers (window 4) keep the latents of the last 3 tokens only: the measured bytes per token
    are then below the plan's, by exactly that, and the summary flags the difference with the cache's note."""
    out_dir = tmp_path / "out"
    eval_file = tmp_path / "e.txt"
    eval_file.write_text("one two three four five six seven eight nine ten\n")
    capsys.readouterr()
    assert main(["compress", "--weights", str(ckpts.path("gemma2", "gqa", "hf_dir")), "--k", "8", "--latent",
                 "plain", "--eval", str(eval_file), "--generate", "6", "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    s = json.loads((out_dir / "compress_summary.json").read_text())
    (r,) = s["configurations"]
    G, hd = s["model"]["num_kv_heads"], s["model"]["head_dim"]
    per_layer = G * hd + G * 8  # numbers per cached token
    from transformers import AutoTokenizer

    T = len(AutoTokenizer.from_pretrained(ckpts.path("gemma2", "gqa", "hf_dir"))(
        "one two three four five six seven eight nine ten")["input_ids"][:16]) + 5
    kept = [T if t == "full_attention" else min(T, 3) for t in ("sliding_attention", "full_attention",
                                                                 "sliding_attention")]
    assert r["kv_bytes_per_token_measured"] == pytest.approx(sum(kept) * per_layer * 4 / T)
    assert r["kv_bytes_per_token_after"] == 3 * per_layer * 2
    assert r["kv_measured_matches_plan"] is False and "DIFFER" in out
    assert any("sliding-window" in n and "numbers per token in generation" in n for n in s["notes"])


def test_compress_on_an_encoder_reports_value_weights(capsys, tmp_path):
    """MiniLM (d 384, 12 kv heads of 32): per group 32 x 384 parameters become 8 x (32 + 384) at k = 8, and k = 30
    (30 x 416 > 32 x 384) saves nothing; the summary and the printed lines say an encoder has no cache to save."""
    out_dir = tmp_path / "out"
    eval_file = tmp_path / "e.txt"
    eval_file.write_text("\n".join(default_texts("minilm").eval[:4]) + "\n")
    capsys.readouterr()
    assert main(["compress", "--model", "minilm", "--k", "8,30", "--latent", "plain", "--eval", str(eval_file),
                 "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    s = json.loads((out_dir / "compress_summary.json").read_text())
    by = {r["name"]: r for r in s["configurations"]}
    dense = 6 * 12 * 32 * 384
    assert by["plain k=8"]["value_params_before"] == dense
    assert by["plain k=8"]["value_params_after"] == 6 * 12 * 8 * (32 + 384)
    assert by["plain k=8"]["value_flops_per_token_after"] == 2 * 6 * 12 * 8 * (32 + 384)
    assert by["plain k=30"]["value_params_after"] == dense and by["plain k=30"]["value_params_saving"] == 0.0
    assert by["plain k=8"]["kv_bytes_per_token_measured"] is None
    assert any(n.startswith("An encoder keeps no KV cache") for n in s["notes"])
    assert "note: an encoder keeps no KV cache: the latents save value-projection weights and FLOPs" in out
    assert f"value weights {dense} -> {6 * 12 * 8 * 416} parameters and multiply-adds per token (72.9% saved)" in out


# ------------------------------------------------------------------------------------------- unsupported transformers


def test_a_transformers_without_the_layered_cache_is_one_line(monkeypatch, capsys, tmp_path):
    """transformers 4.x has no layered Cache API (``DynamicSlidingWindowLayer``...): generate says so in one line,
    exit 2, nothing written; ``hl.LatentCache`` raises the same HeadlensError."""
    import transformers.cache_utils as cu

    monkeypatch.delattr(cu, "DynamicSlidingWindowLayer")
    monkeypatch.delitem(sys.modules, "headlens.compress.cache")
    monkeypatch.delattr(hl, "LatentCache", raising=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--max-new-tokens", "2", "--prompt", PROMPT]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("headlens generate: error: LatentCache needs transformers' layered Cache API "
                          "(transformers 5.x; this is "), err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(hl.HeadlensError, match="layered Cache API"):
        hl.LatentCache  # noqa: B018
