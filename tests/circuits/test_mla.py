"""Multi-head latent attention: each head's OV circuit through the latent, against an explicit dense float64
product of the model's own module weights and against the model's own attention output."""

import numpy as np
import pytest
import torch

from tiny_models import PROMPT, build_tiny, save_checkpoint, tokenizer_for

from headlens.circuits.mla import analyze_mla_layer, head_ov_factors, is_mla_config, mla_shape, read_mla_layer
from headlens.errors import HeadlensError
from headlens.io.tensors import SafetensorsSource

H, D, R, NOPE, ROPE, V = 4, 48, 12, 8, 8, 10  # v_head_dim 10 < kv_lora_rank 12: the head's rank is <= 10


def _deepseek(family: str):
    import transformers

    cfg_cls, model_cls = {"deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
                          "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[family]
    model = build_tiny(cfg_cls, model_cls, seed=3, vocab_size=512, hidden_size=D, intermediate_size=64,
                       moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=H,
                       n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                       first_k_dense_replace=2, kv_lora_rank=R, q_lora_rank=16, qk_rope_head_dim=ROPE,
                       qk_nope_head_dim=NOPE, v_head_dim=V, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    # every layer dense (first_k_dense_replace=2): the MoE grouped GEMM has no float64 kernel
    with torch.no_grad():  # a latent norm gain that is not all ones, so diag(gamma) matters
        for layer in model.model.layers:
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def mla(request, tmp_path_factory):
    model = _deepseek(request.param)
    out = tmp_path_factory.mktemp(request.param)
    save_checkpoint(model, tokenizer_for("none"), out, "hf_dir")
    config = model.config.to_dict()
    return model, SafetensorsSource(out / "model.safetensors"), config, out


def _dense_head(attn, h: int) -> np.ndarray:
    """W_O^h W_UV^h diag(gamma) W_DKV from the module's weights, sliced independently, float64 (d x d)."""
    w_dkv = attn.kv_a_proj_with_mqa.weight.detach().double().numpy()[:R]
    gamma = attn.kv_a_layernorm.weight.detach().double().numpy()
    w_ukv = attn.kv_b_proj.weight.detach().double().numpy()  # (H * (NOPE + V), R)
    w_uv = w_ukv[h * (NOPE + V) + NOPE:(h + 1) * (NOPE + V)]  # (V, R)
    w_o = attn.o_proj.weight.detach().double().numpy()[:, h * V:(h + 1) * V]  # (D, V)
    return w_o @ w_uv @ np.diag(gamma) @ w_dkv


def test_head_spectra_match_the_dense_product(mla):
    model, tensors, config, _ = mla
    shape = mla_shape(config)
    assert is_mla_config(config) and (shape.kv_lora_rank, shape.v_head_dim) == (R, V)
    for layer in range(2):
        res = analyze_mla_layer(read_mla_layer(tensors, "model.layers.", layer, shape))
        attn = model.model.layers[layer].self_attn
        stack = []
        for h in range(H):
            dense = _dense_head(attn, h)
            s = np.linalg.svd(dense, compute_uv=False)
            got = np.array(res.heads[h].ov.singular_values)
            assert len(got) == V and res.heads[h].ov.rank <= min(V, R)
            np.testing.assert_allclose(got, s[:V], rtol=1e-10, atol=1e-12 * s[0])
            assert s[V:].max() < 1e-10 * s[0]  # the dense product has no rank beyond v_head_dim
            w_uv = attn.kv_b_proj.weight.detach().double().numpy()[h * (NOPE + V) + NOPE:(h + 1) * (NOPE + V)]
            readout = attn.o_proj.weight.detach().double().numpy()[:, h * V:(h + 1) * V] @ w_uv @ np.diag(
                attn.kv_a_layernorm.weight.detach().double().numpy())
            stack.append(readout)
            np.testing.assert_allclose(res.heads[h].latent_use.singular_values,
                                       np.linalg.svd(readout, compute_uv=False)[:V], rtol=1e-10)
        np.testing.assert_allclose(res.layer_latent_use.singular_values,
                                   np.linalg.svd(np.vstack(stack), compute_uv=False), rtol=1e-8, atol=1e-12)
        gamma_wdkv = (attn.kv_a_layernorm.weight.detach().double()[:, None]
                      * attn.kv_a_proj_with_mqa.weight.detach().double()[:R]).numpy()
        np.testing.assert_allclose(res.latent_map.singular_values, np.linalg.svd(gamma_wdkv, compute_uv=False),
                                   rtol=1e-10)
        assert 1 <= res.layer_latent_use.rank_e90 <= res.layer_latent_use.rank_e99 <= R


def test_the_circuit_is_the_attention_output_of_a_single_token(mla):
    """With one token the attention weight is 1, so the layer's attention output is sum_h W_OV^h x, scaled by the
    latent RMSNorm's 1/rms(W_DKV x): the linear part and that one number reproduce the model exactly."""
    model, tensors, config, _ = mla
    model = model.double()
    seen = {}
    attn = model.model.layers[1].self_attn
    handle = attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=kwargs.get("hidden_states", args[0] if args else None),
                                                 y=out[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[17]]))
    finally:
        handle.remove()
    x = seen["x"][0, 0].numpy()  # (D,)
    f = read_mla_layer(tensors, "model.layers.", 1, mla_shape(config))
    ov = sum((lambda AB: AB[0] @ AB[1])(head_ov_factors(f, h)).numpy() for h in range(H))
    c = attn.kv_a_proj_with_mqa.weight.detach().numpy()[:R] @ x
    scale = 1.0 / np.sqrt(np.mean(c ** 2) + attn.kv_a_layernorm.variance_epsilon)
    # (the latent RMSNorm computes in float32 even in a float64 model: agreement to ~1e-7)
    np.testing.assert_allclose(ov @ x * scale, seen["y"][0, 0].numpy(), rtol=1e-5, atol=1e-9)
    model.float()


def test_wrong_shapes_and_fields_are_one_line_errors(mla):
    _, tensors, config, _ = mla
    with pytest.raises(HeadlensError, match="kv_lora_rank"):
        mla_shape({**config, "kv_lora_rank": "twelve"})
    with pytest.raises(HeadlensError, match="expected"):
        read_mla_layer(tensors, "model.layers.", 0, mla_shape({**config, "v_head_dim": V + 2}))
    with pytest.raises(HeadlensError, match="not a multi-head latent attention checkpoint"):
        read_mla_layer(tensors, "transformer.h.", 0, mla_shape(config))


def test_ov_on_a_latent_attention_checkpoint(mla, tmp_path, capsys):
    """`headlens ov` reads head h's circuit through the latent; with a prompt, each token's value path is scaled
    by the latent RMSNorm's 1/rms(W_DKV x), so cache_error is that of the model's real value-path outputs."""
    import json

    from headlens.cli import main

    model, _, config, directory = mla
    layer, head, k = 1, 2, 4
    assert main(["ov", "--weights", str(directory), "--layer", str(layer), "--head", str(head), "--latent-dim",
                 str(k), "--prompt", PROMPT, "--json", str(tmp_path / "ov.json")]) == 0
    out = capsys.readouterr().out
    assert "multi-head latent attention" in out and f"kv_lora_rank={R}" in out and "latent use: head 2 reads" in out
    got = json.loads((tmp_path / "ov.json").read_text())
    attn = model.model.layers[layer].self_attn
    W = _dense_head(attn, head)
    U, s, Vt = np.linalg.svd(W)
    np.testing.assert_allclose(got["singular_values"], s[:V], rtol=1e-9)
    assert got["rank"] == V and got["num_value_heads"] == H and got["latent"]["kv_lora_rank"] == R
    # the value path's inputs, hooked independently: the attention module's input and its latent's RMS
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw.get("hidden_states", a[0] if a
                                                                                 else None)), with_kwargs=True)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(directory)(PROMPT, return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    X = seen["x"][0].double().numpy().T  # (d, N)
    c = attn.kv_a_proj_with_mqa.weight.detach().double().numpy()[:R] @ X
    Xs = X / np.sqrt((c ** 2).mean(0) + attn.kv_a_layernorm.variance_epsilon)[None, :]
    Wk = U[:, :k] @ np.diag(s[:k]) @ Vt[:k]
    expected = np.linalg.norm((W - Wk) @ Xs) / np.linalg.norm(W @ Xs)
    assert got["cache_inputs"] == "prompt" and got["cache_tokens"] == X.shape[1]
    np.testing.assert_allclose(got["cache_error"], expected, rtol=1e-5)


def _rank_at(s: np.ndarray, level: float) -> int:
    e = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.searchsorted(e, level - 1e-12) + 1)


def test_sweep_on_a_latent_attention_checkpoint(mla, tmp_path, capsys):
    import csv
    import json

    from headlens.cli import main

    model, _, config, directory = mla
    out = tmp_path / "sweep"
    assert main(["sweep", "--weights", str(directory), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"kv_lora_rank {R}" in text and "KV bytes/token/layer: 40 cached as the latent" in text
    rows = list(csv.DictReader((out / "sweep_mla_heads.csv").open()))
    assert len(rows) == 2 * H
    for row in rows:
        layer, head = int(row["layer"]), int(row["head"])
        attn = model.model.layers[layer].self_attn
        s = np.linalg.svd(_dense_head(attn, head), compute_uv=False)[:V]
        assert int(row["ov_rank"]) == V and int(row["ov_rank_e90"]) == _rank_at(s, 0.9)
        w_uv = attn.kv_b_proj.weight.detach().double().numpy()[head * (NOPE + V) + NOPE:(head + 1) * (NOPE + V)]
        readout = attn.o_proj.weight.detach().double().numpy()[:, head * V:(head + 1) * V] @ w_uv @ np.diag(
            attn.kv_a_layernorm.weight.detach().double().numpy())
        assert int(row["latent_e99"]) == _rank_at(np.linalg.svd(readout, compute_uv=False), 0.99)
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["kv_bytes_per_token_layer"] == {"latent": (R + ROPE) * 2, "expanded": H * (NOPE + ROPE + V) * 2}
    assert [row["layer"] for row in summary["layers"]] == [0, 1]


def test_the_latent_sweep_result_prints_short_and_serialises(mla):
    import json

    from headlens.circuits.mla import run_mla_sweep
    from headlens.io.source import ModelSource

    _, _, _, directory = mla
    r = run_mla_sweep(ModelSource(weights=directory))
    lines = repr(r).splitlines()
    assert lines[0].startswith(f"<MLASweepResult {directory.name}: 2 latent-attention layer(s), kv_lora_rank {R}")
    assert len(lines) == 4 and lines[-1].startswith("  see: ") and "to_json()" in lines[-1], lines
    assert json.loads(json.dumps(r.to_json(), allow_nan=False)) == r.to_json()
