"""Latents of size 0 and perplexities beyond float64 in ``headlens compress``.

- k = 0 removes a kv group's values: allowed, with a note, and measured as what it is (the model with every
  ``v_proj`` zeroed, computed here with transformers and an explicit log-softmax);
- a budget file of zeros everywhere: one note per configuration, the comparison says "equal", not "equal is better";
- a perplexity that overflows float64 prints as ``inf`` with a note, and the JSON stays strict (null and a flag).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import headlens as hl
from headlens.cli import main
from headlens.compress.measure import perplexity
from headlens.io.embedded import default_texts, embedded_dir

EVAL = default_texts("tiny-lm").eval[:2]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def zero_and_16():
    return hl.run_compress(hl.ModelSource(embedded="tiny-lm"), hl.CompressConfig(ks=[0, 16], latents="plain"), EVAL)


def _nll_without_values(texts: list[str]) -> float:
    """Mean next-token loss of tiny-lm with every value projection zeroed, one text at a time, float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_dir("tiny-lm")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        for layer in model.model.layers:
            assert layer.self_attn.v_proj.bias is None
            layer.self_attn.v_proj.weight.zero_()
        total, n = 0.0, 0
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            total -= float(logp[:-1].gather(1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    return total / n


def test_k0_removes_the_values_and_says_so(zero_and_16):
    r = zero_and_16
    (c0, m0), (c16, m16) = r.pairs()
    assert c0.latent_dims == 0 and c16.latent_dims == 16 * 12
    assert any("plain k=0: k = 0 for every kv group: their values are removed" in n for n in r.notes), r.notes
    assert not any("k=16" in n for n in r.notes)
    assert m0.nll_after == pytest.approx(_nll_without_values(EVAL), rel=1e-6)
    assert m0.ppl_after == pytest.approx(math.exp(m0.nll_after), rel=1e-12) and math.isfinite(m0.ppl_after)
    assert m0.ppl_after > 1e20  # absurd but finite: printed in scientific notation
    from headlens.report.compress import result_lines

    line = next(x for x in result_lines(r.to_json()) if x.startswith("plain k=0 "))
    assert f"-> {m0.ppl_after:.3e};" in line, line


def test_a_perplexity_beyond_float64_is_inf_in_print_and_null_in_json(zero_and_16, tmp_path):
    from headlens.report.compress import result_lines, write_report

    assert perplexity(709.0) == math.exp(709.0) and perplexity(710.0) == math.inf
    r = zero_and_16
    m = r.measurements[0]
    saved = (m.nll_after, m.ppl_after)
    try:
        m.nll_after = 812.5  # as if the compressed model put ~e^-812 on the actual tokens
        m.ppl_after = perplexity(m.nll_after)
        files = write_report(r, tmp_path)
        data = _strict((tmp_path / "compress_summary.json").read_text())
        rec = data["configurations"][0]
        assert rec["ppl_after"] is None and rec["ppl_after_overflow"] is True and rec["nll_after"] == 812.5
        assert rec["ppl_before_overflow"] is False and rec["ppl_before"] == pytest.approx(math.exp(rec["nll_before"]))
        assert data["configurations"][1]["ppl_after_overflow"] is False
        assert _strict(json.dumps(r.to_json())) == data  # to_json() is the summary file
        lines = result_lines(data)
        assert "ppl" in lines[0] and f"{rec['ppl_before']:.2f} -> inf;" in lines[0], lines[0]
        assert any(x.startswith("note: plain k=0: perplexity after is beyond float64 (mean next-token loss 812.5 "
                                "nats") for x in lines), lines
        page = (tmp_path / "compress.html").read_text()
        assert "\u2192 inf" in page
        assert all(p.is_file() for p in files)
    finally:
        m.nll_after, m.ppl_after = saved


def test_a_budget_of_zeros_is_noted_and_compared_as_equal(tmp_path, capsys):
    from headlens.circuits.sweep_parts import weights_digest
    from headlens.io.tables import write_csv

    digest = weights_digest(hl.ModelSource(embedded="tiny-lm").checkpoint())
    budget = write_csv(tmp_path / "zeros.csv", [{"layer": layer, "kv_head": g, "k_plain": 0, "k_data": 0,
                                                 "model_weights": digest} for layer in range(6) for g in range(2)])
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(EVAL) + "\n")
    capsys.readouterr()
    assert main(["compress", "--model", "tiny-lm", "--budget", str(budget), "--latent", "plain", "--eval", str(ev),
                 "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    notes = [x for x in out.splitlines() if x.startswith("note: ")]
    assert notes == [f"note: plain budget {budget}: k = 0 for every kv group: their values are removed (the attention "
                     "of those groups writes only the value bias)",
                     f"note: uniform plain (bytes of budget {budget}): k = 0 for every kv group: their values are "
                     "removed (the attention of those groups writes only the value bias)"], out
    assert "equal is better" not in out
    assert f"vs uniform plain (bytes of budget {budget})" in out and out.count("-> equal\n") == 1, out
    data = _strict((tmp_path / "out" / "compress_summary.json").read_text())
    assert data["notes"][:2] == [n[len("note: "):] for n in notes]
