"""The residual identities for every family of tests/tiny_models.py (read from its table, so families added there
are covered): every site against HuggingFace's output_hidden_states and float64 sums of the other sites, with the
layer's structure (sequential, parallel, post-norm) as the site plan found it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tiny_models
from tiny_models import PROMPT, tokenizer_for

from headlens.arch import GENERIC, SPECS
from headlens.residual.capture import record_sites
from headlens.residual.modules import find_blocks
from headlens.residual.plan import site_plan

FAMILIES = sorted(tiny_models.FAMILIES)
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _spec(model):
    spec = SPECS.get(model.config.model_type)
    return spec if spec is not None else dataclasses.replace(GENERIC, layers_path=find_blocks(model), final_norm=None)


def _close(got, want, what):
    got, want = got.double(), want.double()
    rel = float((got - want).norm() / max(float(want.norm()), 1e-30))
    assert rel < 1e-5, f"{what}: relative error {rel:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_identities(ckpts, family):
    variant = tiny_models.variants_of(family)[0]
    model, _ = ckpts.model(family, variant)
    spec = _spec(model)
    plan = site_plan(model, spec)
    assert plan.source == "trace", plan.source
    ids = tokenizer_for(family)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), record_sites(model, spec, SITES) as rec:  # verify=True: raises if the sites are wrong
        out = model(input_ids=ids, output_hidden_states=True)
    v = rec.values
    hs = out.hidden_states
    L = len(v["resid_pre"])
    for l in range(L):
        torch.testing.assert_close(v["resid_pre"][l], hs[l], rtol=0, atol=0)
        if l + 1 < L:
            torch.testing.assert_close(v["resid_post"][l], hs[l + 1], rtol=0, atol=0)
            torch.testing.assert_close(v["resid_pre"][l + 1], v["resid_post"][l], rtol=0, atol=0)
        pre, post, attn, mlp = (v[s][l].double() for s in ("resid_pre", "resid_post", "attn_out", "mlp_out"))
        if plan.parallel:
            assert "resid_mid" in rec.missing
            _close(post, pre + attn + mlp, f"{family} layer {l}: resid_post = resid_pre + attn_out + mlp_out")
        elif plan.post_norm:
            layer = model.get_submodule(f"{rec.hooks['resid_pre'].split(' on ')[1].split('.<l>')[0]}.{l}")
            norm1, norm2 = (layer.get_submodule(n) for n in plan.post_norms)
            with torch.no_grad():
                _close(v["resid_mid"][l], norm1(v["resid_pre"][l] + v["attn_out"][l]), f"{family} {l}: resid_mid")
                _close(v["resid_post"][l], norm2(v["resid_mid"][l] + v["mlp_out"][l]), f"{family} {l}: resid_post")
        else:
            mid = v["resid_mid"][l].double()
            _close(mid, pre + attn, f"{family} layer {l}: resid_mid = resid_pre + attn_out")
            _close(post, mid + mlp, f"{family} layer {l}: resid_post = resid_mid + mlp_out")
