"""Residual sites on families whose layers do not look like Llama's: OLMo 2 (norm after each sublayer, before the
add), GLM-4 (post-sublayer norms), Granite (each branch scaled by residual_multiplier), and parallel layers.

Every site is checked against HuggingFace's output_hidden_states and against an independent recomputation from
plain forward hooks on the raw sublayers; a wrong site table makes capture (and ``sphere``) refuse.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T
from tiny_models import build_tiny

from headlens.arch import GENERIC
from headlens.errors import HeadlensError
from headlens.residual import plan as plan_mod
from headlens.residual.capture import record_sites
from headlens.residual.plan import site_plan
from headlens.residual.sites import SiteHook

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
MULT = 0.37
# family: (config, model, extra config, the sublayer whose raw output is attention's / the MLP's, then the norm (or
# scale) applied to it before the add)
FAMILIES = {
    "olmo2": (T.Olmo2Config, T.Olmo2Model, dict(num_key_value_heads=2),
              ("post_attention_layernorm", "post_feedforward_layernorm")),
    "glm4": (T.Glm4Config, T.Glm4Model, dict(num_key_value_heads=2), ("post_self_attn_layernorm", "post_mlp_layernorm")),
    "granite": (T.GraniteConfig, T.GraniteModel, dict(num_key_value_heads=2, residual_multiplier=MULT), None),
}
IDS = torch.tensor([[5, 17, 33, 2, 250, 91, 7, 400, 12, 64, 3]])  # (1, 11)


def _tiny(family: str, seed: int = 0):
    cfg, cls, extra, _ = FAMILIES[family]
    model = build_tiny(cfg, cls, seed, **TINY, **extra)
    with torch.no_grad():  # make the post-sublayer norms matter (HF initialises them to 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _raw_branches(model) -> tuple[dict, dict]:
    """{layer: self_attn output[0]}, {layer: mlp output} from plain hooks, one forward."""
    attn, mlp, handles = {}, {}, []
    for i, layer in enumerate(model.layers):
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: attn.__setitem__(i, o[0].clone())))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: mlp.__setitem__(i, o.clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=IDS, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return attn, mlp, out.hidden_states


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sites_match_hidden_states_and_an_independent_recomputation(family):
    model = _tiny(family)
    attn_raw, mlp_raw, hs = _raw_branches(model)
    sites = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
    with torch.no_grad(), record_sites(model, GENERIC, sites) as rec:
        model(input_ids=IDS)
    assert not rec.missing
    norms = FAMILIES[family][3]
    for l, layer in enumerate(model.layers):
        if norms is None:  # Granite: what is added is the branch times residual_multiplier
            attn, mlp = MULT * attn_raw[l], MULT * mlp_raw[l]
        else:
            with torch.no_grad():
                attn, mlp = layer.get_submodule(norms[0])(attn_raw[l]), layer.get_submodule(norms[1])(mlp_raw[l])
        v = {s: rec.values[s][l] for s in sites}
        torch.testing.assert_close(v["resid_pre"], hs[l], rtol=0, atol=0)
        if l + 1 < len(model.layers):  # HF's last hidden state is normed
            torch.testing.assert_close(v["resid_post"], hs[l + 1], rtol=0, atol=0)
        torch.testing.assert_close(v["attn_out"], attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v["mlp_out"], mlp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v["resid_mid"], hs[l] + attn, rtol=1e-5, atol=1e-5)
        # the stream, not the raw attention output (what the generic table gave OLMo 2)
        assert (v["resid_mid"] - attn_raw[l]).norm() > 0.1 * v["resid_mid"].norm()


def test_plans_say_where_the_trace_corrected_the_table():
    olmo2 = site_plan(_tiny("olmo2"), GENERIC)
    assert olmo2.source == "trace"
    assert olmo2.hooks["resid_mid"] == SiteHook("resid_mid", "mlp", "forward_pre")
    assert olmo2.hooks["attn_out"].module == "post_attention_layernorm"
    assert any(n.startswith("resid_mid: the spec table names post_attention_layernorm") for n in olmo2.notes)
    granite = site_plan(_tiny("granite"), GENERIC)
    assert granite.derived == {"attn_out": ((1, "resid_mid"), (-1, "resid_pre")),
                               "mlp_out": ((1, "resid_post"), (-1, "resid_mid"))}
    assert "by difference" in granite.describe("attn_out", GENERIC)


def _wrong_plan(monkeypatch, site: str, module: str, hook: str = "forward_pre") -> None:
    real = plan_mod.site_plan

    def wrong(model, spec):
        plan = real(model, spec)
        plan.hooks[site] = SiteHook(site, module, hook)
        return plan

    monkeypatch.setattr(plan_mod, "site_plan", wrong)


def test_a_wrong_site_table_refuses_naming_family_and_site(monkeypatch):
    model = _tiny("olmo2")
    _wrong_plan(monkeypatch, "resid_mid", "post_attention_layernorm")  # the generic table's (wrong) answer
    with pytest.raises(HeadlensError, match=r"^olmo2 \(generic.*resid_mid = resid_pre \+ attn_out fails at layer 0"):
        with torch.no_grad(), record_sites(model, GENERIC, ("resid_mid",)):
            model(input_ids=IDS)


def test_a_failed_trace_falls_back_to_the_table_and_the_check_catches_it(monkeypatch):
    from headlens.residual.tracing import lineage

    def broken(*_a, **_k):
        raise RuntimeError("no residual addition found")

    monkeypatch.setattr(lineage, "trace_layer", broken)
    model = _tiny("olmo2")
    plan = site_plan(model, GENERIC)
    assert plan.source.startswith("spec table (tracing failed: RuntimeError")
    with pytest.raises(HeadlensError, match="resid_mid = resid_pre \\+ attn_out fails"):
        with torch.no_grad(), record_sites(model, GENERIC, ("resid_pre",)):
            model(input_ids=IDS)
    with torch.no_grad(), record_sites(model, GENERIC, ("resid_pre",), verify=False) as rec:
        model(input_ids=IDS)  # verify=False: the caller takes responsibility
    assert set(rec.values["resid_pre"]) == {0, 1, 2}


def test_chain_identity_between_layers(monkeypatch):
    """A resid_post hook that is not the next layer's input (here: the layer's input norm) is refused."""
    model = _tiny("granite")
    _wrong_plan(monkeypatch, "resid_post", "input_layernorm", "forward")
    with pytest.raises(HeadlensError, match="granite .*fails at layer"):
        with torch.no_grad(), record_sites(model, GENERIC, ("resid_post",)):
            model(input_ids=IDS)


def test_the_check_runs_on_the_first_forward_only_and_holds_one_layer(monkeypatch):
    model = _tiny("glm4")
    calls = []
    from headlens.residual import verify

    real = verify.check_layer
    monkeypatch.setattr(verify, "check_layer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with torch.no_grad(), record_sites(model, GENERIC, ("resid_post",), layers=[2]) as rec:
        model(input_ids=IDS)
        model(input_ids=IDS)
    assert calls == [0, 1, 2]
    assert list(rec.values["resid_post"]) == [2]


@pytest.mark.parametrize("cls,cfg,extra", [
    (T.CohereModel, T.CohereConfig, dict(num_key_value_heads=2)),
    (T.StableLmModel, T.StableLmConfig, dict(num_key_value_heads=2, use_parallel_residual=True)),
    (T.PhiModel, T.PhiConfig, {}),
])
def test_parallel_layers_have_no_resid_mid_and_add_up(cls, cfg, extra):
    model = build_tiny(cfg, cls, 0, **TINY, **extra)
    plan = site_plan(model, dataclasses.replace(GENERIC, layers_path="layers"))
    assert plan.parallel and "resid_mid" in plan.missing
    with torch.no_grad(), record_sites(model, GENERIC, ("resid_pre", "resid_post", "attn_out", "mlp_out")) as rec:
        out = model(input_ids=IDS, output_hidden_states=True)
    v = rec.values
    for l in range(2):
        torch.testing.assert_close(v["resid_post"][l], out.hidden_states[l + 1], rtol=0, atol=0)
        torch.testing.assert_close(v["resid_post"][l], v["resid_pre"][l] + v["attn_out"][l] + v["mlp_out"][l],
                                   rtol=1e-5, atol=1e-5)
