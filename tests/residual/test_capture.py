"""record_sites: hooks on the unmodified HF model against output_hidden_states and the residual identities."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPT

from headlens.io.source import load_hf_model
from headlens.residual.capture import SITES, record_sites
from headlens.errors import HeadlensError
from headlens.io.checkpoint import open_model

FAMILIES = ["qwen3", "llama", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "bert", "mixtral", "olmoe", "qwen3_moe"]


def _model(ckpts, family):
    variant = "mha" if family in ("gpt2", "gpt_neox", "bert") else "gqa"
    ck = open_model(weights=ckpts.path(family, variant, "hf_dir"), auto_infer=True)
    model, tok = load_hf_model(ck.directory, torch.float32)  # MoE grouped GEMMs have no float64
    return ck, model, tok


def _count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_hidden_states_and_residual_identities(ckpts, family):
    ck, model, tok = _model(ckpts, family)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # HF installs its own output-recording hooks lazily
    before = _count_hooks(model)
    with torch.no_grad(), record_sites(model, ck.spec, SITES) as rec:
        out = model(input_ids=ids, output_hidden_states=True)
    assert _count_hooks(model) == before
    L = ck.shape.num_layers
    for layer in range(L):
        torch.testing.assert_close(rec.values["resid_pre"][layer], out.hidden_states[layer], rtol=0, atol=0)
        pre, post = rec.values["resid_pre"][layer], rec.values["resid_post"][layer]
        attn, mlp = rec.values["attn_out"][layer], rec.values["mlp_out"][layer]
        if ck.spec.residual in ("pre", "sandwich"):
            mid = rec.values["resid_mid"][layer]
            torch.testing.assert_close(mid, pre + attn, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(post, mid + mlp, rtol=1e-6, atol=1e-6)
        elif ck.spec.residual == "parallel":
            assert "resid_mid" in rec.missing and layer not in rec.values["resid_mid"]
            torch.testing.assert_close(post, pre + attn + mlp, rtol=1e-6, atol=1e-6)
        else:  # post-norm BERT: the stream is re-normalised after each add
            blk = model.encoder.layer[layer]
            mid = rec.values["resid_mid"][layer]
            torch.testing.assert_close(mid, blk.attention.output.LayerNorm(pre + attn), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(post, blk.output.LayerNorm(mid + mlp), rtol=1e-6, atol=1e-6)
    if ck.spec.final_norm:
        torch.testing.assert_close(rec.values["final"][-1], out.last_hidden_state, rtol=0, atol=0)
        # HF's last hidden state is the final norm of the last layer's output.
        if family not in ("gpt2",):
            torch.testing.assert_close(out.hidden_states[L], out.last_hidden_state, rtol=0, atol=0)
    else:
        assert "final" in rec.missing


def test_only_requested_sites_and_layers_are_kept_in_half_precision(ckpts):
    ck, model, tok = _model(ckpts, "llama")
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), record_sites(model, ck.spec, ("resid_post",), layers=[1], store_dtype=torch.float16) as rec:
        model(input_ids=ids)
    assert list(rec.values) == ["resid_post"] and list(rec.values["resid_post"]) == [1]
    assert rec.values["resid_post"][1].dtype == torch.float16
    assert rec.values["resid_post"][1].device.type == "cpu"


def test_hooks_are_removed_when_the_forward_raises(ckpts):
    ck, model, tok = _model(ckpts, "qwen3")
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    before = _count_hooks(model)

    def boom(*_a, **_k):
        raise RuntimeError("forward failed")

    handle = model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        with torch.no_grad(), record_sites(model, ck.spec, SITES):
            model(input_ids=torch.tensor([[5, 6, 7]]))
    handle.remove()
    assert _count_hooks(model) == before


def test_unknown_site(ckpts):
    ck, model, _ = _model(ckpts, "llama")
    with pytest.raises(HeadlensError, match="unknown site 'mlp_in'"):
        with record_sites(model, ck.spec, ("mlp_in",)):
            pass
