"""Calibration honesty (issue 24): each configuration's value-latent error on held-out calibration tokens beside its
in-sample error, and the one-line warning where data-aware latents lose more there than plain ones."""

from __future__ import annotations

import pytest
import torch

import headlens as hl
from headlens.compress.run import run_compress
from headlens.compress.summary import summary


def _run(tokens: int):
    cfg = hl.CompressConfig(target_errors=[0.2], latents=["plain", "data-aware"], max_calib_tokens=tokens,
                            layers="0:2")
    return run_compress(hl.ModelSource(embedded="tiny-lm"), cfg, disable=True)


def test_held_out_errors_equal_a_refit_by_hand():
    """The held-out numbers equal data-aware and plain plans fitted by hand (plan_layers) on the even calibration
    positions and measured with LayerPlan.cache_errors on the odd ones (squares summed over layers)."""
    from headlens.circuits.heads import read_layer
    from headlens.compress.plan import plan_layers
    from headlens.residual.capture import capture_attention_inputs

    r = _run(64)
    source = hl.ModelSource(embedded="tiny-lm")
    ck = source.checkpoint(full=True)
    tok = source.tokenizer(ck.directory)
    lm = source.lm_model(ck.directory, torch.float32)
    from headlens.compress.texts import compress_texts

    calib = compress_texts(source, True, None, None).calib
    X, n = capture_attention_inputs(lm, tok, ck.spec, calib, [0, 1], 64)
    assert n == r.calibration_tokens == 64
    recs = {rec["name"]: rec for rec in summary(r)["configurations"]}
    for c in r.configurations:
        rec = recs[c.name]
        even = {layer: X[layer][:, 0::2].double() for layer in (0, 1)}
        odd = {layer: X[layer][:, 1::2].double() for layer in (0, 1)}

        def err(kind, tokens):
            plans = plan_layers(ck, c.ks, kind, even if kind == "data-aware" else None, load_dtype=torch.float32)
            num = den = 0.0
            for p in plans:
                W_V = read_layer(ck, p.layer, with_qk=False).W_V
                per, _ = p.cache_errors(W_V, tokens[p.layer])
                for g, e in zip(p.groups, per):
                    total = float(torch.linalg.norm(g.R @ (W_V[g.kv_head].double() @ tokens[p.layer])))
                    num, den = num + (e * total) ** 2, den + total ** 2
            return (num / den) ** 0.5

        assert rec["heldout_tokens"] == 32
        assert rec["plain_error_heldout"] == pytest.approx(err("plain", odd), rel=1e-6)
        assert rec["calib_error_heldout"] == pytest.approx(err(c.latent, odd), rel=1e-6)
        if c.latent == "data-aware":
            assert rec["calib_error_in_sample"] == pytest.approx(err("data-aware", even), rel=1e-6)
            assert rec["calib_error_in_sample"] < rec["calib_error_heldout"]  # a fit flatters its own tokens
        else:
            assert rec["calib_error_in_sample"] is None


def test_too_little_calibration_data_is_said_in_one_line():
    """12 calibration tokens: the data-aware latents lose more on the held-out half than plain latents of the same
    sizes, and the run says so; with 256 tokens it does not."""
    few = _run(12)
    lines = [n for n in few.notes if "held-out calibration tokens" in n]
    assert lines and all("\n" not in n and "too few for a data-aware fit" in n for n in lines)
    assert any(n.startswith("data-aware error<=0.2: ") for n in lines)
    many = _run(256)
    assert not [n for n in many.notes if "data-aware error<=0.2: on held-out" in n]
