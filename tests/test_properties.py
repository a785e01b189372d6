"""Property-based tests (hypothesis, bounded and derandomized): the lazy safetensors reader against
safetensors.torch.load_file, shape inference on synthetic checkpoints of several layouts against the shapes
they were built with (contradicting configs refused), and the --layers/--k parsers against the selection
each text was generated from."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from headlens.errors import HeadlensError
from headlens.io.source import ModelSource
from headlens.io.tensors import SafetensorsSource
from headlens.selection import parse_ks, parse_layers

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------- safetensors reader

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 50
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.uint8:
        return x.abs().to(dtype)
    return x.to(dtype)


tensor_specs = st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 6), min_size=0, max_size=3),
                                  st.integers(0, 2**31 - 1)), min_size=1, max_size=5)


@settings(max_examples=40, **SETTINGS)
@given(specs=tensor_specs, rows=st.tuples(st.integers(-8, 8) | st.none(), st.integers(-8, 8) | st.none()),
       cols=st.tuples(st.integers(-8, 8) | st.none(), st.integers(-8, 8) | st.none()))
def test_safetensors_reader_matches_load_file(specs, rows, cols):
    tensors = {f"t{i}.weight": _tensor(dt, tuple(shape), seed) for i, (dt, shape, seed) in enumerate(specs)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        save_file(tensors, str(path))
        ref = load_file(str(path))
        src = SafetensorsSource(path)
        assert sorted(src.keys()) == sorted(ref)
        row_slice, col_slice = slice(*rows), slice(*cols)
        for name, t in ref.items():
            assert src.shape(name) == tuple(t.shape) and src.dtype(name) == t.dtype
            assert torch.equal(src.read(name), t)
            if t.dim() >= 1:
                assert torch.equal(src.read(name, row_slice), t[row_slice])
            if t.dim() == 2:
                assert torch.equal(src.read(name, (row_slice, col_slice)), t[row_slice][:, col_slice])


# ------------------------------------------------------------------------------------------- shape inference


def _weights(family: str, L: int, H: int, G: int, hd: int, d: int) -> dict[str, torch.Tensor]:
    """Attention weights (and the attention norm) of ``L`` layers in ``family``'s stored layout."""
    def w(*shape):
        return torch.randn(*shape, dtype=torch.float32)

    out: dict[str, torch.Tensor] = {}
    for i in range(L):
        if family == "llama":
            p = f"model.layers.{i}."
            out.update({p + "self_attn.q_proj.weight": w(H * hd, d), p + "self_attn.k_proj.weight": w(G * hd, d),
                        p + "self_attn.v_proj.weight": w(G * hd, d), p + "self_attn.o_proj.weight": w(d, H * hd),
                        p + "input_layernorm.weight": torch.ones(d)})
        elif family == "phi3":
            p = f"model.layers.{i}."
            out.update({p + "self_attn.qkv_proj.weight": w((H + 2 * G) * hd, d),
                        p + "self_attn.o_proj.weight": w(d, H * hd), p + "input_layernorm.weight": torch.ones(d)})
        elif family == "gpt_neox":
            p = f"gpt_neox.layers.{i}."
            out.update({p + "attention.query_key_value.weight": w(3 * H * hd, d),
                        p + "attention.dense.weight": w(d, H * hd), p + "input_layernorm.weight": torch.ones(d)})
        elif family == "gpt2":
            p = f"transformer.h.{i}."
            out.update({p + "attn.c_attn.weight": w(d, 3 * d), p + "attn.c_proj.weight": w(d, d),
                        p + "ln_1.weight": torch.ones(d)})
        elif family == "bert":
            p = f"encoder.layer.{i}."
            out.update({p + "attention.self.query.weight": w(H * hd, d), p + "attention.self.key.weight": w(H * hd, d),
                        p + "attention.self.value.weight": w(H * hd, d),
                        p + "attention.output.dense.weight": w(d, H * hd),
                        p + "attention.output.LayerNorm.weight": torch.ones(d)})
    return out


def _config(family: str, L: int, H: int, G: int, hd: int, d: int) -> dict:
    if family == "gpt2":
        return {"model_type": "gpt2", "n_head": H, "n_embd": d, "n_layer": L}
    cfg = {"model_type": family, "num_attention_heads": H, "hidden_size": d, "num_hidden_layers": L}
    if family in ("llama", "phi3"):
        cfg.update(num_key_value_heads=G, head_dim=hd)
    return cfg


@st.composite
def geometries(draw):
    family = draw(st.sampled_from(["llama", "phi3", "gpt_neox", "gpt2", "bert"]))
    G = draw(st.integers(1, 4))
    H = G * draw(st.integers(1, 3))
    hd = draw(st.sampled_from([2, 4, 6, 8]))
    if family in ("llama", "phi3"):
        d = draw(st.integers(4, 40))
    else:  # MHA layouts whose hidden size is H * hd
        G, d = H, H * hd
    return family, draw(st.integers(1, 3)), H, G, hd, d


def _save(root: Path, tensors: dict, config: dict | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"))
    if config is None:
        return root / "model.safetensors"
    (root / "config.json").write_text(json.dumps(config))
    return root


@settings(max_examples=40, **SETTINGS)
@given(geo=geometries())
def test_inferred_shape_is_the_built_one(geo):
    family, L, H, G, hd, d = geo
    tensors = _weights(family, L, H, G, hd, d)
    with tempfile.TemporaryDirectory() as tmp:
        with_config = _save(Path(tmp) / "dir", tensors, _config(family, L, H, G, hd, d))
        s = ModelSource(weights=with_config, auto_infer=True).checkpoint().shape
        assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (L, H, G, hd, d)
        bare = _save(Path(tmp) / "bare", tensors, None)  # no config: heads given, the rest from the shapes
        s = ModelSource(weights=bare, num_heads=H).checkpoint().shape
        assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (L, H, G, hd, d)


@settings(max_examples=30, **SETTINGS)
@given(geo=geometries().filter(lambda g: g[0] in ("llama", "phi3")),
       field=st.sampled_from(["num_key_value_heads", "head_dim", "hidden_size", "num_hidden_layers",
                              "num_attention_heads"]),
       delta=st.integers(1, 3))
def test_a_config_that_contradicts_the_weights_is_refused(geo, field, delta):
    family, L, H, G, hd, d = geo
    cfg = _config(family, L, H, G, hd, d)
    cfg[field] += delta
    if field == "num_attention_heads" and cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        cfg["num_key_value_heads"] = 1  # still contradicts: H changed, so H * hd no longer fits W_O
    with tempfile.TemporaryDirectory() as tmp:
        path = _save(Path(tmp) / "dir", _weights(family, L, H, G, hd, d), cfg)
        with pytest.raises(HeadlensError) as info:
            ModelSource(weights=path, auto_infer=True).checkpoint()
        assert len(str(info.value).splitlines()) == 1


@settings(max_examples=30, **SETTINGS)
@given(field=st.sampled_from(["num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                              "num_hidden_layers", "vocab_size"]),
       value=st.sampled_from([0, -1, "four", 4.0, True, [4], {"n": 4}]))
def test_a_size_field_that_is_no_positive_integer_is_named(field, value):
    cfg = _config("llama", 1, 4, 2, 4, 8)
    cfg[field] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = _save(Path(tmp) / "dir", _weights("llama", 1, 4, 2, 4, 8), cfg)
        with pytest.raises(HeadlensError, match=f"{field} is .*; it must be a positive integer"):
            ModelSource(weights=path, auto_infer=True).checkpoint()


# ----------------------------------------------------------------------------------------------- parsers

N_MAX = 40
space = st.sampled_from(["", " ", "  "])


@st.composite
def layer_lists(draw):
    """(text, expected list or None for an error) from drawn items, with the rule written out directly."""
    n = draw(st.integers(1, N_MAX))
    items = draw(st.lists(st.integers(-3, N_MAX + 3), min_size=1, max_size=6))
    texts = [draw(space) + str(v) + draw(space) for v in items]
    empty_at = draw(st.none() | st.integers(0, len(texts)))
    if empty_at is not None:
        texts.insert(empty_at, draw(space))
    ok = empty_at is None and len(set(items)) == len(items) and all(0 <= v < n for v in items)
    return ",".join(texts), n, sorted(items) if ok else None


@st.composite
def layer_slices(draw):
    n = draw(st.integers(1, N_MAX))
    parts = [draw(st.none() | st.integers(-N_MAX - 3, N_MAX + 3)) for _ in range(2)]
    step = draw(st.none() | st.integers(-2, 5))
    text = ":".join("" if p is None else str(p) for p in parts) + ("" if step is None else f":{step}")
    in_range = all(p is None or -n <= p <= n for p in parts)
    expect = list(range(n))[slice(parts[0], parts[1], step if step is None or step > 0 else 1)]
    ok = (step is None or step > 0) and in_range and bool(expect)
    return text, n, expect if ok else None


@settings(max_examples=150, **SETTINGS)
@given(case=layer_lists() | layer_slices())
def test_parse_layers_against_the_generated_selection(case):
    text, n, expect = case
    if expect is None:
        with pytest.raises(HeadlensError, match="^`layers` "):
            parse_layers(text, n)
    else:
        assert parse_layers(text, n) == expect


@settings(max_examples=150, **SETTINGS)
@given(items=st.lists(st.integers(-2, 70), min_size=1, max_size=6), head_dim=st.none() | st.integers(1, 64),
       empty=st.booleans(), pad=space)
def test_parse_ks_against_the_generated_sizes(items, head_dim, empty, pad):
    text = ",".join(pad + str(v) for v in items) + ("," if empty else "")
    ok = (not empty and len(set(items)) == len(items) and min(items) > 0
          and (head_dim is None or max(items) <= head_dim))
    if ok:
        assert parse_ks(text, head_dim) == sorted(items)
    else:
        with pytest.raises(HeadlensError, match="^`ks` "):
            parse_ks(text, head_dim)


@pytest.mark.parametrize("text", ["", " ", "all"])
def test_layer_edge_texts(text):
    if text == "all":
        assert parse_layers(text, 3) == [0, 1, 2]
    else:
        with pytest.raises(HeadlensError, match="is empty"):
            parse_layers(text, 3)
