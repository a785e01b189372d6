"""The families added to the spec table for issue 10, each against dense float64 and HuggingFace's own outputs.

For every tiny checkpoint of tests/tiny_models.py's NEW_FAMILIES (MHA, MQA and GQA where the family can express
them), opened from its HuggingFace directory with ``auto_infer``:

- every head's W_OV spectrum from ``analyze_ov`` (and, with the pre-attention norm's gain folded, from a model whose
  norms were perturbed) equals the singular values of the explicit d x d float64 product that tests/reference.py
  writes out from each modeling file; ``sweep`` (the CLI) reports the same spectra, per head and per kv group
  (each layout record, and every family whose output projection is not square);
- ``ov --prompt`` loads the model (T5: its encoder) and its cache_error is the dense one on the prompt's inputs;
  one token through each HF attention module gives out(x) - out(0) = sum_h W_OV^h x; heatmaps are HF's eager
  attentions (Falcon and Bloom return them only when asked; T5's second output is its position bias);
- the attention input headlens captures is what the HuggingFace attention module receives, and equals the
  family's pre-attention norm applied to ``output_hidden_states[l]``; ``resid_pre`` equals ``output_hidden_states``;
- the residual fields of the spec add up on the real model: ``resid_mid = resid_pre + attn_out`` and
  ``resid_post = resid_mid + mlp_out`` (parallel layers: ``resid_post = resid_pre + attn_out + mlp_out``; Granite:
  each branch times ``residual_multiplier``; DistilBERT: through its two LayerNorms), ``resid_pre[l+1] =
  resid_post[l]``, and the final norm's output is the model's last hidden state.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from reference import attention_norm, capture_attention_io, dense_svals, dense_wov, norm_gain, value_output_blocks
from tiny_models import MODEL_TYPES, NEW_FAMILIES, NEW_FAMILY_VARIANTS, PROMPT, hidden_size, kv_heads, variants_of

import headlens
from headlens.arch import SPECS, spec_for_type, supported_types
from headlens.circuits.heads import read_head
from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.io.checkpoint import open_model
from headlens.io.tables import read_table
from headlens.residual.capture import capture_layer, record_sites
from headlens.residual.modules import final_norm, find_layer, first_tensor, hidden_states_input
from headlens.residual.sites import is_parallel

transformers.logging.set_verbosity_error()

H, HD, L = 4, 16, 2  # every tiny model: 4 query heads of dim 16, 2 layers
CASES = NEW_FAMILY_VARIANTS
IDS = [f"{f}-{v}" for f, v in CASES]
# One variant per family for the slower checks: the one with the most structure (GQA, else MQA, else MHA).
WIDEST = [(f, next(v for v in ("gqa", "mqa", "mha") if v in variants_of(f))) for f in NEW_FAMILIES]
# sweep reads through the same Layout records as ov: run it once per layout record and on non-square o (d != H*hd).
SWEPT = [(f, v) for f, v in WIDEST if SPECS[MODEL_TYPES[f]].layout != SPECS["llama"].layout or hidden_size(f) != H * HD]
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "final")


@pytest.fixture(scope="module")
def opened(ckpts):
    """(family, variant, perturb_norms) -> (model, tokenizer, Checkpoint opened from its HF directory)."""
    cache = {}

    def get(family, variant, perturb_norms=False):
        key = (family, variant, perturb_norms)
        if key not in cache:
            model, tok = ckpts.model(family, variant, perturb_norms)
            path = ckpts.path(family, variant, "hf_dir", perturb_norms)
            cache[key] = model, tok, open_model(weights=path, auto_infer=True)
        return cache[key]

    return get


def _ids(tok) -> torch.Tensor:
    return tok(PROMPT, return_tensors="pt")["input_ids"]


def _base(model):
    """The model without its head (Llama4ForCausalLM's base_model_prefix names no attribute: it is ``model``)."""
    base = model.base_model
    return model.model if base is model and hasattr(model, "model") else base


def test_every_new_family_is_in_the_table():
    assert {MODEL_TYPES[f] for f in NEW_FAMILIES} <= set(SPECS)
    for model_type in ("gpt_neo", "gpt_bigcode", "llama4", "llama4_text", "t5", "distilbert", "olmo2", "glm4"):
        assert model_type in supported_types()


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_spec_and_shape_come_from_the_config_and_weights(opened, family, variant):
    model, _, ck = opened(family, variant)
    assert ck.spec is SPECS[MODEL_TYPES[family]]
    s = ck.shape
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (
        L, H, kv_heads(family, variant), HD, hidden_size(family))
    _, _, H_ref, G_ref, hd_ref = value_output_blocks(model, family, 0)
    assert (H_ref, G_ref, hd_ref) == (H, kv_heads(family, variant), HD)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_ov_spectrum_of_every_head_is_the_dense_float64_one(opened, family, variant):
    model, _, ck = opened(family, variant)
    G = kv_heads(family, variant)
    for layer in range(L):
        for head in range(H):
            r = headlens.analyze_ov(ck, headlens.OVConfig(layer=layer, head=head, dtype=torch.float64))
            W = dense_wov(model, family, layer, head)
            s = dense_svals(W, HD)
            assert r.kv_head == head // (H // G)
            np.testing.assert_allclose(r.singular_values, s, rtol=1e-9, atol=1e-13 * s[0])
            assert r.rank == np.linalg.matrix_rank(W)
        gain = norm_gain(model, family, layer)
        assert (r.norm_key is None) == (gain is None), (family, layer, r.norm_key)


@pytest.mark.parametrize("family,variant", WIDEST, ids=[f"{f}-{v}" for f, v in WIDEST])
def test_folded_norm_gain_is_the_modules_gain(opened, family, variant):
    model, _, ck = opened(family, variant, perturb_norms=True)
    for layer in range(L):
        gain = norm_gain(model, family, layer)
        if gain is None:  # OLMo (no parameters), OLMo 2 (no norm before attention): nothing to fold
            with pytest.raises(HeadlensError, match="`fold_norm`: no norm weight"):
                headlens.analyze_ov(ck, headlens.OVConfig(layer=layer, head=0, fold_norm=True))
            continue
        for head in range(H):
            r = headlens.analyze_ov(ck, headlens.OVConfig(layer=layer, head=head, fold_norm=True,
                                                          dtype=torch.float64))
            s = dense_svals(dense_wov(model, family, layer, head) * gain[None, :], HD)  # W_OV diag(gamma)
            np.testing.assert_allclose(r.singular_values, s, rtol=1e-9, atol=1e-13 * s[0])


@pytest.mark.parametrize("family,variant", SWEPT, ids=[f"{f}-{v}" for f, v in SWEPT])
def test_sweep_reports_the_dense_spectra(opened, ckpts, capsys, tmp_path, family, variant):
    model, _, _ = opened(family, variant)
    code = main(["sweep", "--weights", str(ckpts.path(family, variant, "hf_dir")), "--dtype", "float64",
                 "--k", "2,4", "--out-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    heads, groups = read_table(tmp_path / "sweep_heads.csv"), read_table(tmp_path / "sweep_groups.csv")
    G = kv_heads(family, variant)
    assert len(heads) == L * H and len(groups) == L * G
    for row in heads:
        s = dense_svals(dense_wov(model, family, row["layer"], row["head"]), HD)
        assert row["kv_head"] == row["head"] // (H // G)
        assert row["ov_sigma_max"] == pytest.approx(s[0], rel=1e-9)
        assert row["ov_rel_error_k4"] == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-7)
    for row in groups:  # the kv group's stacked operator [W_O^h W_V^g]_h, stacked explicitly
        W = np.vstack([dense_wov(model, family, row["layer"], h) for h in range(H) if h // (H // G) == row["kv_head"]])
        s = np.linalg.svd(W, compute_uv=False)[:HD]
        assert row["stack_rel_error_k4"] == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-7)
    assert json.loads((tmp_path / "sweep_summary.json").read_text())["model"]["num_kv_heads"] == G


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_attention_input_is_what_the_attention_module_receives(opened, family, variant):
    model, tok, ck = opened(family, variant)
    ids = _ids(tok)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(L):
        got = capture_layer(model, tok, ck.spec, layer, PROMPT, want_probs=False).attn_input.double()  # (N, d)
        received, _ = capture_attention_io(model, family, layer, ids)  # an independent hook on the module
        torch.testing.assert_close(got, torch.from_numpy(received), rtol=0, atol=0)
        norm = attention_norm(model, family, layer)
        with torch.no_grad():
            want = (norm(hidden[layer]) if norm is not None else hidden[layer])[0].double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_heads_sum_to_what_the_hf_attention_module_outputs_for_one_token(opened, family, variant):
    """One token attends to itself with probability 1, so the attention module is affine in its input:
    out(x) - out(0) = sum_h W_OV^h x, whatever the positions, biases, ALiBi or relative bias add."""
    model, _, ck = opened(family, variant)
    ids = torch.tensor([[7]])
    for layer in range(L):
        x, y = capture_attention_io(model, family, layer, ids)
        _, y0 = capture_attention_io(model, family, layer, ids, zero_input=True)
        total = sum(read_head(ck, layer, h, load_dtype=torch.float64).W_O.numpy()
                    @ (read_head(ck, layer, h, load_dtype=torch.float64).W_V.numpy() @ x[0]) for h in range(H))
        np.testing.assert_allclose(total, (y - y0)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_resid_pre_is_output_hidden_states(opened, family, variant):
    model, tok, ck = opened(family, variant)
    with record_sites(model, ck.spec, ("resid_pre",)) as rec, torch.no_grad():
        hidden = model(input_ids=_ids(tok), output_hidden_states=True).hidden_states
    for layer in range(L):
        torch.testing.assert_close(rec.values["resid_pre"][layer], hidden[layer], rtol=0, atol=0)


@pytest.mark.parametrize("family,variant", WIDEST, ids=[f"{f}-{v}" for f, v in WIDEST])
def test_ov_with_a_prompt_runs_the_model_and_its_cache_error_is_the_dense_one(opened, ckpts, family, variant):
    """``ov --prompt`` end to end: the model is loaded from the directory (T5: its encoder), the prompt's attention
    inputs hooked, and cache_error equals ||(W - W_k) X|| / ||W X|| with the dense W and an independent hook's X."""
    model, tok, _ = opened(family, variant)
    layer, head, k = L - 1, H - 1, 4
    r = headlens.analyze_head(headlens.ModelSource(weights=ckpts.path(family, variant, "hf_dir")),
                              headlens.OVConfig(layer=layer, head=head, latent_dim=k, prompt=PROMPT,
                                                dtype=torch.float64))
    X = capture_attention_io(model, family, layer, _ids(tok))[0].T  # (d, N)
    W = dense_wov(model, family, layer, head)
    U, S, Vt = np.linalg.svd(W)
    W_k = (U[:, :k] * S[:k]) @ Vt[:k]
    assert r.cache_inputs == "prompt" and r.cache_tokens == X.shape[1]
    assert r.cache_error == pytest.approx(np.linalg.norm((W - W_k) @ X) / np.linalg.norm(W @ X), rel=1e-5)


@pytest.mark.parametrize("family,variant", WIDEST, ids=[f"{f}-{v}" for f, v in WIDEST])
def test_heatmap_is_the_eager_attention_hf_returns(opened, ckpts, family, variant):
    model, tok, ck = opened(family, variant)
    ids = _ids(tok)
    original = model.config._attn_implementation
    got = [capture_layer(model, tok, ck.spec, layer, PROMPT, want_probs=True).attn_probs for layer in range(L)]
    assert model.config._attn_implementation == original
    # The reference loads eagerly: set_attn_implementation("eager") is refused by Falcon, whose SDPA model then
    # takes its eager code under output_attentions=True with SDPA's boolean mask (non-causal probabilities).
    eager = type(model).from_pretrained(str(ckpts.path(family, variant, "hf_dir")), attn_implementation="eager",
                                        dtype=torch.float32)
    with torch.no_grad():
        want = eager(input_ids=ids, output_attentions=True).attentions
    for layer in range(L):
        assert got[layer].shape == (H, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(got[layer], want[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[layer].sum(-1), torch.ones(H, ids.shape[1]), rtol=1e-5, atol=1e-5)


def _spec_sites(model, spec, ids, parallel: bool) -> tuple[dict[str, dict[int, torch.Tensor]], torch.Tensor]:
    """Each site hooked where the spec's fields say, with plain hooks written here ({site: {layer: tensor}}), and
    the model's last hidden state."""
    seen: dict[str, dict[int, torch.Tensor]] = {s: {} for s in SITES}
    handles = []

    def keep(site, layer, pre):
        def hook(_m, args, kwargs, *output):
            x = hidden_states_input(args, kwargs) if pre else first_tensor(output[0])
            seen[site][layer] = x.detach().clone()
        return hook

    for layer in range(L):
        _, blk = find_layer(model, spec, layer)
        named = [("resid_pre", "", True), ("resid_post", "", False), ("attn_out", spec.attn_out, False),
                 ("mlp_out", spec.mlp_out, False)]
        if not parallel:
            named.append(("resid_mid", spec.mid_input, True))
        for site, rel, pre in named:
            mod = blk.get_submodule(rel) if rel else blk
            register = mod.register_forward_pre_hook if pre else mod.register_forward_hook
            handles.append(register(keep(site, layer, pre), with_kwargs=True))
    fin = final_norm(model, spec)
    if fin is not None:
        handles.append(fin[1].register_forward_hook(keep("final", -1, False), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            last = _base(model)(input_ids=ids).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return seen, last


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_residual_fields_of_the_spec_add_up_on_the_real_model(opened, family, variant):
    model, tok, ck = opened(family, variant)
    spec, config = ck.spec, model.config
    parallel = is_parallel(spec, config)
    assert parallel == (family in ("cohere", "stablelm_parallel", "gptj", "falcon", "falcon_mq", "phi"))
    assert parallel or spec.mid_input
    v, last = _spec_sites(model, spec, _ids(tok), parallel)
    close = dict(rtol=1e-5, atol=1e-5)
    m = getattr(config, spec.branch_scale) if spec.branch_scale else 1.0  # Granite: the hooks see m-less branches
    assert (m != 1.0) == (family == "granite")
    for layer in range(L):
        pre, post, attn = v["resid_pre"][layer], v["resid_post"][layer], v["attn_out"][layer]
        mlp = v["mlp_out"][layer].reshape(pre.shape) if spec.flat_mlp else v["mlp_out"][layer]  # OPT: (B*N, d)
        assert spec.flat_mlp or v["mlp_out"][layer].shape == pre.shape
        if parallel:
            torch.testing.assert_close(post, pre + attn + mlp, **close)
            continue
        mid = v["resid_mid"][layer].reshape(pre.shape)
        if spec.residual == "post":  # DistilBERT: mid = sa_norm(pre + attn), post = out_norm(mid + mlp)
            blk = model.transformer.layer[layer]
            with torch.no_grad():
                torch.testing.assert_close(mid, blk.sa_layer_norm(pre + attn), **close)
                torch.testing.assert_close(post, blk.output_layer_norm(mid + mlp), **close)
            continue
        torch.testing.assert_close(mid, pre + m * attn, **close)
        torch.testing.assert_close(post, mid + m * mlp, **close)
        if layer + 1 < L:
            torch.testing.assert_close(v["resid_pre"][layer + 1], post, rtol=0, atol=0)
    assert bool(spec.final_norm) == (family != "distilbert")
    if spec.final_norm:
        torch.testing.assert_close(v["final"][-1], last, **close)


# ------------------------------------------------------------------------------------ unsupported families


def test_an_unknown_family_is_refused_by_name_with_the_sorted_list(tmp_path, capsys):
    """A family outside the table whose layers hold self_attn.v_proj but another output projection used to fall
    through to the generic spec and fail on a missing o_proj tensor."""
    from safetensors.torch import save_file

    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "weirdformer", "num_attention_heads": 2}))
    save_file({"model.layers.0.self_attn.v_proj.weight": torch.zeros(8, 8),
               "model.layers.0.self_attn.wo.weight": torch.zeros(8, 8)}, str(d / "model.safetensors"))
    listed = ", ".join(sorted(SPECS))
    with pytest.raises(HeadlensError) as info:
        open_model(weights=d)
    assert str(info.value).startswith(f"unsupported architecture 'weirdformer'; supported: {listed}")
    capsys.readouterr()
    assert main(["ov", "--weights", str(d)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "unsupported architecture 'weirdformer'; supported: " in err


def test_the_generic_spec_needs_both_llama_projections():
    keys = ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"]
    assert spec_for_type("newllama", keys).layout == SPECS["llama"].layout
    with pytest.raises(HeadlensError, match=r"^unsupported architecture 'newllama'; supported: bert, bloom, "):
        spec_for_type("newllama", keys[:1])


def test_a_post_norm_opt_folds_no_norm_that_does_not_feed_its_attention(tmp_path):
    """OPT-350m (do_layer_norm_before=False) applies self_attn_layer_norm after the attention's add: its attention
    reads the stream itself, so that norm's gain must not be folded (it was, silently)."""
    from tiny_models import build_tiny, save_checkpoint, tokenizer_for

    model = build_tiny(transformers.OPTConfig, transformers.OPTModel, 0, vocab_size=512, hidden_size=64,
                       word_embed_proj_dim=64, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=128, dropout=0.0, do_layer_norm_before=False)
    tok = tokenizer_for("opt")
    ids = _ids(tok)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    x, _ = capture_attention_io(model, "opt", 1, ids)  # what attention receives: the stream, no norm
    torch.testing.assert_close(torch.from_numpy(x), hidden[1][0].double(), rtol=0, atol=0)
    ck = open_model(weights=save_checkpoint(model, tok, tmp_path / "opt350", "hf_dir"), auto_infer=True)
    r = headlens.analyze_ov(ck, headlens.OVConfig(layer=1, head=0))
    assert r.norm_key is None
    with pytest.raises(HeadlensError, match="`fold_norm`: no norm weight feeding layer 1's attention"):
        headlens.analyze_ov(ck, headlens.OVConfig(layer=1, head=0, fold_norm=True))
