"""A DeepSeek-V3 checkpoint as DeepSeek ships it: FP8 e4m3 weights with 128 x 128 (here 16 x 16) block scales
(``weight_scale_inv``). The latent-attention sweep reads it dequantized: its numbers equal the sweep of a float32
checkpoint holding the dequantized values (computed element by element in float64 by tests/quantized_models.py),
and it says the checkpoint is quantized. Before, it read the FP8 codes without their scales' (and failed on them)."""

from __future__ import annotations

import json

import pytest
from quantized_models import fp8_block, unquantized
from test_mla import _deepseek
from tiny_models import save_checkpoint, tokenizer_for

from headlens.circuits.mla import run_mla_sweep
from headlens.io.source import ModelSource


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds3-fp8")
    src = save_checkpoint(_deepseek("deepseek_v3"), tokenizer_for("none"), root / "float", "hf_dir")
    ref = fp8_block(src, root / "fp8", block=(16, 16))
    plain = unquantized(src, root / "fp8", root / "dequantized", ref)
    return root / "fp8", plain


def test_fp8_latent_attention_sweep_equals_the_dequantized_checkpoints(fp8_pair):
    fp8, plain = fp8_pair
    q = run_mla_sweep(ModelSource(weights=str(fp8)))
    d = run_mla_sweep(ModelSource(weights=str(plain)))
    assert q.model["quantization"]["method"] == "fp8" and "quantization" not in d.model
    qj, dj = q.to_json(), d.to_json()
    for a, b in zip(qj["layers"], dj["layers"]):
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or _close(a, b)


def _close(a, b, rel=1e-9):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(1.0, abs(a), abs(b))
    return a == b
