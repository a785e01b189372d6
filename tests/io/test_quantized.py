"""Quantized checkpoints (issue 21): every scheme read right, analysed as its dequantized weights, run dequantized.

The checkpoints come from ``tests/quantized_models.py``: a tiny Qwen3 (GQA, hidden 48, 4 heads of 16) quantized by
each scheme, with each weight's value as the format defines it computed independently of headlens (the real
quantizer's own dequantization for bitsandbytes and compressed-tensors, the published formula element by element for
the others). For each scheme:

- headlens's reader gives exactly those values (float64), and they are the original weights to within the format's
  rounding;
- ``ov`` / ``sweep`` on the quantized checkpoint print and save the numbers of the same weights stored unquantized,
  plus the ``weights: ..., dequantized`` line and the JSON's ``quantization``;
- the commands that run the model load it dequantized (one stderr line) and compute what the unquantized copy
  computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quantized_models import (bitsandbytes, compressed_tensors, fp8_block, gptq, awq, mxfp4_experts, unquantized,
                              _pack_bits)
from safetensors.torch import load_file, save_file

from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.io import dequant
from headlens.io.checkpoint import open_model
from headlens.io.quantized import DequantizingSource, logical_names, stored_names
from headlens.io.tensors import open_path

# name -> (builder, its keyword arguments, relative Frobenius error the format's rounding allows, reader tolerance)
SCHEMES = {
    "fp8-block32": (fp8_block, {"block": (32, 32)}, 0.06, 0.0),
    "fp8-block16": (fp8_block, {"block": (16, 16)}, 0.06, 0.0),
    "fp8-tensor": (fp8_block, {"block": None}, 0.06, 0.0),
    "gptq-int4-actorder": (gptq, {"bits": 4, "group_size": 16, "act_order": True}, 0.12, 0.0),
    "gptq-int2": (gptq, {"bits": 2, "group_size": 16, "act_order": False}, 0.6, 0.0),
    "gptq-int8-v2": (gptq, {"bits": 8, "group_size": 16, "act_order": False, "checkpoint_format": "gptq_v2"}, 0.01,
                     0.0),
    "awq-int4": (awq, {"group_size": 16}, 0.12, 0.0),
    "bnb-int8": (bitsandbytes, {"kind": "int8"}, 0.01, 1e-6),
    "bnb-nf4": (bitsandbytes, {"kind": "nf4"}, 0.15, 1e-6),
    "bnb-fp4": (bitsandbytes, {"kind": "fp4"}, 0.2, 1e-6),
    "ct-int4-group": (compressed_tensors, {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                           "group_size": 16}, 0.12, 4e-3),
    "ct-int4-group-asym": (compressed_tensors, {"num_bits": 4, "type": "int", "symmetric": False,
                                                "strategy": "group", "group_size": 16}, 0.12, 4e-3),
    "ct-int8-channel": (compressed_tensors, {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                        0.02, 4e-3),
    "ct-fp8-channel": (compressed_tensors, {"num_bits": 8, "type": "float", "symmetric": True,
                                            "strategy": "channel"}, 0.06, 4e-3),
    "ct-fp8-block": (compressed_tensors, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                                          "block_structure": [16, 16]}, 0.06, 4e-3),
}
# what the weights line names for each scheme
LABELS = {
    "fp8-block32": "fp8 block 32x32", "fp8-block16": "fp8 block 16x16", "fp8-tensor": "fp8 per-tensor",
    "gptq-int4-actorder": "gptq int4, group 16, act-order", "gptq-int2": "gptq int2, group 16",
    "gptq-int8-v2": "gptq int8, group 16, v2", "awq-int4": "awq int4, group 16",
    "bnb-int8": "bitsandbytes int8, row scales", "bnb-nf4": "bitsandbytes nf4, block 64, nested absmax",
    "bnb-fp4": "bitsandbytes fp4, block 64", "ct-int4-group": "compressed-tensors int4, group 16",
    "ct-int4-group-asym": "compressed-tensors int4, group 16, zero point",
    "ct-int8-channel": "compressed-tensors int8, per-channel", "ct-fp8-channel": "compressed-tensors fp8, per-channel",
    "ct-fp8-block": "compressed-tensors fp8, block 16x16",
}


class Built:
    def __init__(self, root: Path, base: Path):
        self.root, self.base = root, base
        self.made: dict[str, tuple[Path, dict, Path]] = {}

    def __call__(self, scheme: str) -> tuple[Path, dict[str, torch.Tensor], Path]:
        """(quantized directory, reference values, the same values stored unquantized)."""
        if scheme not in self.made:
            builder, kwargs, _, _ = SCHEMES[scheme]
            out = self.root / scheme
            ref = builder(self.base, out, **kwargs)
            self.made[scheme] = (out, ref, unquantized(self.base, out, self.root / f"{scheme}-dense", ref))
        return self.made[scheme]


@pytest.fixture(scope="module")
def built(ckpts, tmp_path_factory) -> Built:
    base = ckpts.path("qwen3", "gqa", "hf_dir")
    assert sum(v.numel() for v in load_file(str(base / "model.safetensors")).values()) < 1_000_000  # tiny
    return Built(tmp_path_factory.mktemp("quantized"), base)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reader_gives_the_formats_values(scheme, built):
    qdir, ref, _ = built(scheme)
    _, _, rounding, tol = SCHEMES[scheme]
    original = load_file(str(built.base / "model.safetensors"))
    src = DequantizingSource(open_path(qdir), json.loads((qdir / "config.json").read_text()), qdir)
    assert src.quantization is not None and src.quantization.tensors == len(ref) == 14
    assert LABELS[scheme] in src.quantization.schemes
    assert set(src.keys()) == set(original) - {"lm_head.weight"} or set(src.keys()) == set(original)
    for name, want in ref.items():
        got = src.read(name)
        assert got.dtype == torch.float64 and tuple(got.shape) == tuple(want.shape), name
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= tol * scale, (name, float((got - want).abs().max()), scale)
        w = original[name].to(torch.float64)
        assert float((got - w).norm() / w.norm()) < rounding, (name, float((got - w).norm() / w.norm()))
        assert torch.equal(src.read(name, (slice(1, 5), slice(2, 9))), got[1:5, 2:9])


@pytest.mark.parametrize("scheme", ["fp8-block32", "gptq-int4-actorder", "awq-int4", "bnb-int8", "bnb-nf4",
                                    "ct-int4-group-asym"])
def test_ov_on_a_quantized_checkpoint_is_ov_on_its_dequantized_weights(scheme, built, tmp_path, capsys):
    qdir, _, dense = built(scheme)
    args = ["--auto-infer", "--layer", "1", "--head", "3", "--latent-dim", "4", "--json"]
    assert main(["ov", "--weights", str(qdir), *args, "--out-dir", str(tmp_path / "q")]) == 0
    q_out = capsys.readouterr().out
    assert main(["ov", "--weights", str(dense), *args, "--out-dir", str(tmp_path / "d")]) == 0
    d_out = capsys.readouterr().out
    numbers = [ln for ln in q_out.splitlines() if not ln.startswith(("saved", "weights:"))]
    assert numbers == [ln for ln in d_out.splitlines() if not ln.startswith("saved")]
    assert f"weights: {LABELS[scheme]}, dequantized" in q_out.splitlines()
    assert "weights:" not in d_out
    q_json = json.loads(next((tmp_path / "q").glob(f"{scheme}_layer1_head3.json")).read_text())
    d_json = json.loads(next((tmp_path / "d").glob(f"{scheme}-dense_layer1_head3.json")).read_text())
    assert q_json["singular_values"] == pytest.approx(d_json["singular_values"], rel=1e-6)  # bnb: float32 reference
    assert q_json["model"]["quantization"]["schemes"] == [LABELS[scheme]]
    assert q_json["model"]["quantization"]["dequantized"] is True
    assert d_json["model"]["quantization"] is None


def test_int8_with_scb_and_no_quantization_config_is_dequantized(built, tmp_path, capsys):
    """The issue's case: an int8 checkpoint with SCB row scales but no quantization_config was analysed as raw
    integers (sigma_1 in the millions); now it is the dequantized head."""
    qdir, _, dense = built("bnb-int8")
    bare = tmp_path / "no-config"
    shutil.copytree(qdir, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    args = ["--auto-infer", "--layer", "0", "--head", "1", "--latent-dim", "8"]
    assert main(["ov", "--weights", str(bare), *args, "--out-dir", str(tmp_path / "a")]) == 0
    got = capsys.readouterr().out.splitlines()
    assert main(["ov", "--weights", str(dense), *args, "--out-dir", str(tmp_path / "b")]) == 0
    want = capsys.readouterr().out.splitlines()
    assert got[:4] == want[:4]
    assert "weights: bitsandbytes int8, row scales, dequantized" in got


def test_sweep_on_a_quantized_checkpoint(built, tmp_path, capsys):
    qdir, _, dense = built("gptq-int4-actorder")
    args = ["--auto-infer", "--k", "4,8"]
    assert main(["sweep", "--weights", str(qdir), *args, "--out-dir", str(tmp_path / "q")]) == 0
    q_out = capsys.readouterr().out.splitlines()
    assert main(["sweep", "--weights", str(dense), *args, "--out-dir", str(tmp_path / "d")]) == 0
    d_out = capsys.readouterr().out.splitlines()
    assert "weights: gptq int4, group 16, act-order, dequantized" in q_out
    strip = [ln for ln in q_out if not ln.startswith(("weights:", "saved")) and "layer(s)" not in ln]
    assert strip == [ln for ln in d_out if not ln.startswith("saved") and "layer(s)" not in ln]
    assert (tmp_path / "q" / "sweep_heads.csv").read_text() == (tmp_path / "d" / "sweep_heads.csv").read_text()
    summary = json.loads((tmp_path / "q" / "sweep_summary.json").read_text())
    assert summary["model"]["quantization"]["method"] == "gptq"


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_running_model_is_dequantized(scheme, built, capsys):
    """Commands that run the model load it dequantized to the requested dtype and say so in one stderr line; the
    model computes what the same weights stored unquantized compute."""
    from headlens.io.source import ModelSource

    qdir, _, dense = built(scheme)
    capsys.readouterr()
    model = ModelSource(weights=str(qdir)).model(qdir, "float32")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dequantized from {_paren(LABELS[scheme])} to float32"], err
    ref = ModelSource(weights=str(dense)).model(dense, "float32")
    ids = torch.tensor([[5, 17, 33, 2, 41, 8, 99]])
    assert torch.allclose(_hidden(model, ids), _hidden(ref, ids), rtol=1e-5, atol=1e-5)


def _paren(label: str) -> str:
    method, _, detail = label.partition(" ")
    return f"{method} ({detail})"


def test_fp8_route_and_why(built):
    """fp8 whose blocks tile every weight goes through transformers' own loader (checked against headlens's values);
    with a 48-wide weight in blocks of 32, transformers reads blocks of 24 (it derives the block from the scale
    grid), so that checkpoint is dequantized by headlens instead."""
    from transformers import AutoModelForCausalLM

    from headlens.io import quantized_model

    tiled = quantized_model.inspect(built("fp8-block16")[0])
    assert tiled is not None and tiled.transformers_fp8() == [16, 16]
    ragged_dir, ref, _ = built("fp8-block32")
    ragged = quantized_model.inspect(ragged_dir)
    assert ragged is not None and ragged.transformers_fp8() is None
    plain = AutoModelForCausalLM.from_pretrained(ragged_dir, dtype=torch.float32)  # transformers alone
    name = "model.layers.0.self_attn.q_proj.weight"  # (64, 48)
    err = (plain.get_parameter(name).detach().double() - ref[name]).abs().max()
    assert float(err) > 1e-3, "transformers now reads ragged fp8 blocks right: the headlens route may be retired"


def test_transformers_fp8_disagreement_is_refused(built, monkeypatch):
    from headlens.io import quantized_model

    qdir, _, _ = built("fp8-block16")
    q = quantized_model.inspect(qdir)
    original = quantized_model.DequantizingSource.read

    def off(self, name, index=None):
        t = original(self, name, index)
        return t * 1.01 if self.is_quantized(name) else t

    monkeypatch.setattr(quantized_model.DequantizingSource, "read", off)
    from headlens.io.source import ModelSource

    with pytest.raises(HeadlensError, match="dequantized .* differently from its stored scales"):
        ModelSource(weights=str(qdir)).model(qdir, "float32")
    assert q is not None


def test_compress_and_sphere_on_a_quantized_checkpoint(built, tmp_path, capsys):
    qdir, _, dense = built("awq-int4")
    texts = tmp_path / "eval.txt"
    texts.write_text("The true meaning of life is absurdity and suffering\nThe cat sat on the mat and the dog barked\n")
    args = ["--k", "8", "--latent", "plain", "--eval", str(texts)]
    assert main(["compress", "--weights", str(qdir), *args, "--out-dir", str(tmp_path / "q")]) == 0
    q = capsys.readouterr()
    assert main(["compress", "--weights", str(dense), *args, "--out-dir", str(tmp_path / "d")]) == 0
    d = capsys.readouterr()
    assert "dequantized from awq (int4, group 16) to float32" in q.err
    qs = json.loads((tmp_path / "q" / "compress_summary.json").read_text())
    ds = json.loads((tmp_path / "d" / "compress_summary.json").read_text())
    for a, b in zip(qs["configurations"], ds["configurations"]):
        assert a["kl_mean"] == pytest.approx(b["kl_mean"], rel=1e-4, abs=1e-7)
        assert a["ppl_after"] == pytest.approx(b["ppl_after"], rel=1e-5)
    assert d.err.count("dequantized") == 0
    assert main(["sphere", "--weights", str(qdir), "--prompt", "The cat sat on the mat", "--out-dir",
                 str(tmp_path / "s")]) == 0
    assert "dequantized from awq (int4, group 16) to float32" in capsys.readouterr().err


def test_gpt_oss_mxfp4_experts(tmp_path, capsys):
    """gpt-oss ships its experts as MXFP4: headlens's reader gives the published values, and its load matches
    transformers' own MXFP4 dequantization (Mxfp4Config(dequantize=True))."""
    import transformers
    from tiny_models import build_tiny, tokenizer_for
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from headlens.io.source import ModelSource

    model = build_tiny(transformers.GptOssConfig, transformers.GptOssForCausalLM, vocab_size=512, hidden_size=64,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                       sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    base = tmp_path / "gptoss"
    model.save_pretrained(base)
    tokenizer_for("qwen3").save_pretrained(base)
    qdir = tmp_path / "gptoss-mxfp4"
    ref = mxfp4_experts(base, qdir)
    src = DequantizingSource(open_path(qdir), json.loads((qdir / "config.json").read_text()), qdir)
    assert src.quantization.schemes == ["mxfp4 experts"]
    for name, want in ref.items():
        assert torch.equal(src.read(name), want), name
    capsys.readouterr()
    ours = ModelSource(weights=str(qdir)).model(qdir, "float32")
    assert capsys.readouterr().err.strip() == "dequantized from mxfp4 (experts) to float32"
    theirs = AutoModelForCausalLM.from_pretrained(qdir, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32)
    for name in ref:  # ours is the base model (no "model." prefix), theirs the causal LM
        assert torch.equal(ours.get_parameter(name.removeprefix("model.")), theirs.get_parameter(name)), name
    ids = torch.tensor([[5, 17, 33, 2, 41]])
    assert torch.allclose(_hidden(ours, ids), _hidden(theirs.model, ids), atol=1e-6)


# ------------------------------------------------------------------------------------------- refusals


def _with_tensors(base: Path, out: Path, change, qcfg: dict | None = None) -> Path:
    shutil.copytree(base, out)
    sd = load_file(str(out / "model.safetensors"))
    change(sd)
    save_file(sd, str(out / "model.safetensors"))
    if qcfg is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (out / "config.json").write_text(json.dumps(cfg))
    return out


V = "model.layers.0.self_attn.v_proj.weight"


def test_raw_integer_or_fp8_weights_are_refused(built, tmp_path, capsys):
    def int8(sd):
        sd[V] = (sd[V] * 100).round().to(torch.int8)

    def fp8(sd):
        sd[V] = sd[V].to(torch.float8_e4m3fn)

    for name, change, dtype in (("int8", int8, "int8"), ("fp8", fp8, "float8_e4m3fn")):
        path = _with_tensors(built.base, tmp_path / name, change)
        for argv in (["ov", "--weights", str(path), "--auto-infer", "--layer", "0", "--head", "0"],
                     ["sphere", "--weights", str(path), "--prompt", "The cat sat", "--out-dir", str(tmp_path / "o")],
                     ["compress", "--weights", str(path), "--k", "4", "--latent", "plain", "--eval",
                      str(_eval(tmp_path)), "--out-dir", str(tmp_path / "c")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"tensor {V} is {dtype} and matches no quantization scheme" in err[0], err


def _eval(tmp_path: Path) -> Path:
    p = tmp_path / "eval.txt"
    p.write_text("The cat sat on the mat and the dog barked\n")
    return p


def test_unknown_quantization_method_is_refused(built, tmp_path, capsys):
    path = _with_tensors(built.base, tmp_path / "hqq", lambda sd: None, {"quant_method": "hqq", "nbits": 4})
    assert main(["ov", "--weights", str(path), "--auto-infer"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and '"hqq"' in err and "fp8, fbgemm_fp8, gptq, awq, bitsandbytes" in err


def test_gptq_without_its_config_is_refused_naming_quantization(built, tmp_path, capsys):
    qdir, _, _ = built("gptq-int4-actorder")
    path = tmp_path / "gptq-no-config"
    shutil.copytree(qdir, path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert main(["ov", "--weights", str(path), "--auto-infer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "GPTQ/AWQ packed weight" in err and "quantization_config" in err and "\n" not in err


def test_fp8_file_is_valid(built):
    """An fp8 safetensors file is read, not refused as invalid (F8_E4M3 was an unknown dtype)."""
    qdir, _, _ = built("fp8-block32")
    src = open_path(qdir / "model.safetensors")
    assert src.dtype(V) == torch.float8_e4m3fn


def test_mismatched_scale_grid_is_refused(built, tmp_path, capsys):
    qdir, _, _ = built("fp8-block32")
    cfg = json.loads((qdir / "config.json").read_text())
    path = tmp_path / "bad-grid"
    shutil.copytree(qdir, path)
    cfg["quantization_config"]["weight_block_size"] = [16, 16]
    (path / "config.json").write_text(json.dumps(cfg))
    assert main(["ov", "--weights", str(path), "--auto-infer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weight_scale_inv has shape" in err and "blocks of 16x16" in err


# ----------------------------------------------------------------------------------------- names, shards


def test_logical_names_and_parts():
    names = ["a.q.qweight", "a.q.qzeros", "a.q.scales", "a.q.g_idx", "a.q.bias", "a.k.weight", "a.k.weight_scale_inv",
             "a.v.weight", "a.v.SCB", "a.v.weight_format", "a.o.weight_packed", "a.o.weight_scale", "a.o.weight_shape",
             "e.gate_up_proj_blocks", "e.gate_up_proj_scales", "a.o.input_scale", "n.weight"]
    assert logical_names(names) == ["a.q.weight", "a.q.bias", "a.k.weight", "a.v.weight", "a.o.weight",
                                     "e.gate_up_proj", "n.weight"]
    assert stored_names({"a.q.weight", "n.weight"}, names) == {"a.q.qweight", "a.q.qzeros", "a.q.scales",
                                                               "a.q.g_idx", "n.weight"}


def test_sharded_quantized_checkpoint_with_parts_in_different_shards(built, tmp_path, capsys):
    """A weight and its scale may sit in different shards of an index: both are found."""
    qdir, ref, _ = built("fp8-block32")
    path = tmp_path / "sharded"
    shutil.copytree(qdir, path, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(str(qdir / "model.safetensors"))
    first = {k: v for k, v in sd.items() if not k.endswith("_scale_inv")}
    second = {k: v for k, v in sd.items() if k.endswith("_scale_inv")}
    save_file(first, str(path / "model-00001-of-00002.safetensors"))
    save_file(second, str(path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                                             **{k: "model-00002-of-00002.safetensors" for k in second}}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = open_model(weights=str(path), auto_infer=True)
    assert torch.equal(ck.tensors.read(V), ref[V])


def test_weights_digest_hashes_the_stored_bytes(built):
    """Two quantized checkpoints with equal dequantized values but other stored bytes are other models."""
    from headlens.circuits.sweep_parts import weights_digest

    a = open_model(weights=str(built("fp8-block32")[0]), auto_infer=True)
    b = open_model(weights=str(built("fp8-block16")[0]), auto_infer=True)
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) == weights_digest(open_model(weights=str(built("fp8-block32")[0]), auto_infer=True))


# ----------------------------------------------------------------------------------------- the math alone


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), values=st.lists(st.integers(0, 255), min_size=1, max_size=70),
       columns=st.integers(1, 3))
def test_unpack_bits_inverts_the_published_packing(bits, values, columns):
    """Element i starts at bit i * bits of the little-endian stream of 32-bit words (AutoGPTQ, compressed-tensors)."""
    values = [v % (1 << bits) for v in values]
    cols = [[(v + c) % (1 << bits) for v in values] for c in range(columns)]
    packed = torch.tensor([_pack_bits(c, bits) for c in cols], dtype=torch.int32)  # (columns, words)
    got = dequant.unpack_bits(packed, bits, len(values), dim=1)
    assert got.tolist() == cols
    got_t = dequant.unpack_bits(packed.T.contiguous(), bits, len(values), dim=0)
    assert got_t.T.tolist() == cols


def test_fp4_and_e8m0_values():
    """MXFP4 codes against the OCP table, written out by sign, exponent and mantissa bits."""
    for code in range(16):
        sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
        value = (man * 0.5) if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
        assert dequant.FP4_E2M1[code] == (-value if sign else value)
    blocks = torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8)  # codes 1 (0.5) then 2 (1.0)
    out = dequant.mxfp4(blocks, torch.tensor([130], dtype=torch.uint8))  # scale 2^3
    assert out[:2].tolist() == [4.0, 8.0] and out.shape == (32,)


def test_router_on_an_fp8_moe_checkpoint(ckpts, tmp_path, capsys):
    """A Qwen3-MoE with every projection stored fp8 (its experts saved one by one, as on disk): router loads it
    dequantized (the experts regrouped by transformers' own conversion) and routes as the same weights unquantized;
    its JSON names the quantization."""
    base = ckpts.path("qwen3_moe", "gqa", "hf_dir")
    qdir = tmp_path / "moe-fp8"
    ref = fp8_block(base, qdir, block=(16, 16))
    assert any(".experts.0." in k for k in ref)
    dense = unquantized(base, qdir, tmp_path / "moe-dense", ref)
    args = ["--prompt", "The cat sat on the mat and the dog barked at the moon"]
    assert main(["router", "--weights", str(qdir), *args, "--out-dir", str(tmp_path / "q")]) == 0
    q = capsys.readouterr()
    assert main(["router", "--weights", str(dense), *args, "--out-dir", str(tmp_path / "d")]) == 0
    d = capsys.readouterr()
    assert "dequantized from fp8 (block 16x16) to float32" in q.err and "dequantized" not in d.err
    assert q.out.replace(str(tmp_path / "q"), "") == d.out.replace(str(tmp_path / "d"), "").replace("moe-dense",
                                                                                                     "moe-fp8")
    qj = json.loads((tmp_path / "q" / "router_dump.json").read_text())
    assert qj["model"]["quantization"]["schemes"] == ["fp8 block 16x16"]


def test_fbgemm_fp8_and_bfloat16_load(built, tmp_path, capsys):
    """fbgemm_fp8 (Llama-3.1-405B-FP8's layout: fp8 weight, (out, 1) weight_scale) reads as the same numbers as the
    compressed-tensors fp8 channel checkpoint it is built from; a bfloat16 load is dequantized to bfloat16."""
    qdir, ref, _ = built("ct-fp8-channel")
    path = tmp_path / "fbgemm"
    shutil.copytree(qdir, path)
    sd = load_file(str(path / "model.safetensors"))
    sd = {k: v.float() if k.endswith("weight_scale") else v for k, v in sd.items()}
    save_file(sd, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    (path / "config.json").write_text(json.dumps(cfg))
    src = DequantizingSource(open_path(path), cfg, path)
    assert src.quantization.schemes == ["fbgemm_fp8 fp8, per-channel"]
    for name, want in ref.items():
        assert torch.equal(src.read(name), want)
    from headlens.io.source import ModelSource

    capsys.readouterr()
    model = ModelSource(weights=str(path)).model(path, "bfloat16")
    assert capsys.readouterr().err.strip() == "dequantized from fbgemm_fp8 (fp8, per-channel) to bfloat16"
    assert model.get_parameter("layers.0.self_attn.v_proj.weight").dtype == torch.bfloat16
    assert torch.equal(model.get_parameter("layers.0.self_attn.v_proj.weight"), ref[V].to(torch.bfloat16))


def test_hub_weight_only_fetches_only_the_shards_it_needs(built, tmp_path, capsys, monkeypatch):
    """A sharded quantized hub repo: a weight-only ov of layer 0 reads the shards holding layer 0's weights and their
    scales (here in another shard) from the local cache, and not the shard of layer 1, which is absent."""
    qdir, _, dense = built("fp8-block32")
    sha = "1" * 40
    snap = tmp_path / "hub" / "models--org--q" / "snapshots" / sha
    shutil.copytree(qdir, snap, ignore=shutil.ignore_patterns("model.safetensors"))
    (tmp_path / "hub" / "models--org--q" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--q" / "refs" / "main").write_text(sha)
    sd = load_file(str(qdir / "model.safetensors"))
    shards = {"a": {k: v for k, v in sd.items() if ".layers.0." in k and not k.endswith("_scale_inv")},
              "b": {k: v for k, v in sd.items() if ".layers.0." in k and k.endswith("_scale_inv")},
              "c": {k: v for k, v in sd.items() if ".layers.1." in k},
              "d": {k: v for k, v in sd.items() if ".layers." not in k}}
    weight_map = {}
    for tag, part in shards.items():
        save_file(part, str(snap / f"model-{tag}.safetensors"))
        weight_map.update({k: f"model-{tag}.safetensors" for k in part})
    (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (snap / "model-c.safetensors").unlink()  # layer 1's shard is not in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--layer", "0", "--head", "1", "--latent-dim", "4", "--auto-infer"]
    assert main(["ov", "--hf-repo", "org/q", "--cache-dir", str(tmp_path / "hub"), *args,
                 "--out-dir", str(tmp_path / "o")]) == 0
    got = capsys.readouterr().out.splitlines()
    assert main(["ov", "--weights", str(qdir), *args, "--out-dir", str(tmp_path / "p")]) == 0
    want = capsys.readouterr().out.splitlines()
    assert got[:6] == want[:6] and "weights: fp8 block 32x32, dequantized" in got


@pytest.mark.parametrize("scheme", ["fp8-block16", "gptq-int4-actorder"])
def test_compress_save_model_from_a_quantized_checkpoint(scheme, built, tmp_path, capsys):
    """The compressed model of a quantized checkpoint is saved dequantized, in the checkpoint's own float type (its
    config's torch_dtype), without a quantization_config (through either loading route), and a plain
    from_pretrained runs it as the measured model: its value weights are the dense copy's compressed ones."""
    from transformers import AutoModelForCausalLM

    qdir, _, dense = built(scheme)
    texts = tmp_path / "eval.txt"
    texts.write_text("The true meaning of life is absurdity and suffering\nThe cat sat on the mat and the dog barked\n")
    args = ["--k", "8", "--latent", "plain", "--eval", str(texts)]
    assert main(["compress", "--weights", str(qdir), *args, "--out-dir", str(tmp_path / "o1"),
                 "--save-model", str(tmp_path / "q")]) == 0
    assert main(["compress", "--weights", str(dense), *args, "--out-dir", str(tmp_path / "o2"),
                 "--save-model", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert json.loads((tmp_path / "q" / "headlens_latent.json").read_text())["storage_dtype"] == "float32"
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    d = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    for name, p in d.named_parameters():
        assert torch.allclose(q.get_parameter(name), p, rtol=1e-5, atol=1e-7), name
