"""Self-check of the tiny model / tokenizer / checkpoint helpers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from tiny_models import (
    ALL_FAMILY_VARIANTS,
    FAMILIES,
    MAX_PARAMS,
    MHA_ONLY,
    PROMPT,
    SAVE_FORMATS,
    attention_keys,
    build_model,
    build_tokenizer,
    expected_attention_shapes,
    make_hub_cache,
    save_checkpoint,
    tokenizer_for,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

IDS = [f"{f}-{v}" for f, v in ALL_FAMILY_VARIANTS]


def _inputs(tok, family):
    enc = tok(PROMPT, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 8  # longer than gemma's sliding window (4)
    return dict(enc)


def _last_hidden(model, inputs):
    with torch.no_grad():
        base = model.base_model
        if base is model and hasattr(model, "model"):  # Llama4ForCausalLM's prefix names no attribute of it
            base = model.model
        return base(**inputs).last_hidden_state


def test_family_variants_cover_everything():
    assert {f for f, _ in ALL_FAMILY_VARIANTS} == set(FAMILIES)
    for fam in ("llama", "qwen3", "qwen2", "mistral", "phi3", "gemma2", "gemma3", "qwen3_moe", "mixtral", "olmoe"):
        assert {v for f, v in ALL_FAMILY_VARIANTS if f == fam} == {"mha", "mqa", "gqa"}, fam


@pytest.mark.parametrize("family", sorted(MHA_ONLY))
@pytest.mark.parametrize("variant", ["mqa", "gqa"])
def test_mha_only_families_reject_grouped_variants(family, variant):
    with pytest.raises(ValueError):
        build_model(family, variant)


def test_bad_names_rejected():
    with pytest.raises(ValueError):
        build_model("llama", "gqa4")
    with pytest.raises(ValueError):
        build_model("no_such_family")


def test_config_typos_are_rejected():
    from tiny_models import _make_config

    with pytest.raises(TypeError):
        _make_config(transformers.LlamaConfig, num_key_values_heads=2)


def test_tokenizer():
    tok = build_tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) <= 400
    ids = tok(PROMPT)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == PROMPT
    assert all(p.isprintable() and p for p in pieces)
    assert tok.unk_token and tok.bos_token and tok.eos_token and tok.pad_token
    assert tok.decode(ids) == PROMPT
    assert tok(PROMPT)["input_ids"] == ids  # deterministic

    bos = build_tokenizer("bos")(PROMPT)["input_ids"]
    assert bos[0] == tok.bos_token_id and bos[1:] == ids

    btok = build_tokenizer("bert")
    enc = btok(PROMPT, "and suffering")
    assert enc["input_ids"][0] == btok.cls_token_id
    assert enc["input_ids"].count(btok.sep_token_id) == 2
    assert set(enc["token_type_ids"]) == {0, 1}

    batch = tok([PROMPT, "The cat"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, -1].item() == tok.pad_token_id


@pytest.mark.parametrize("family,variant", ALL_FAMILY_VARIANTS, ids=IDS)
def test_family(family, variant, tmp_path):
    model = build_model(family, variant)
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_PARAMS
    sd = model.state_dict()
    for role, shape in expected_attention_shapes(family, variant).items():
        assert tuple(sd[attention_keys(family, 0)[role]].shape) == shape

    # same seed -> same weights
    again = build_model(family, variant)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())

    tok = tokenizer_for(family)
    inputs = _inputs(tok, family)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    seq = inputs["input_ids"].shape[1]
    assert out.hidden_states[-1].shape == (1, seq, model.config.hidden_size)
    assert torch.isfinite(out.hidden_states[-1]).all()
    ref = _last_hidden(model, inputs)

    paths = {fmt: save_checkpoint(model, tok, tmp_path / fmt, fmt) for fmt in SAVE_FORMATS}

    for fmt in ("hf_dir", "hf_sharded"):
        d = paths[fmt]
        assert d.is_dir() and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
        if fmt == "hf_sharded":
            index = json.loads((d / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) >= 2
        auto = transformers.T5EncoderModel if family == "t5" else AutoModel  # AutoModel: the encoder-decoder
        reloaded = auto.from_pretrained(d)
        reloaded.eval()
        assert reloaded.config.model_type == model.config.model_type
        with torch.no_grad():
            got = reloaded(**inputs).last_hidden_state
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    reloaded_tok = AutoTokenizer.from_pretrained(paths["hf_dir"])
    assert reloaded_tok(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]

    for fmt in ("safetensors", "pt", "bin"):
        p = paths[fmt]
        assert p.is_file()
        loaded = load_file(p) if fmt == "safetensors" else torch.load(p, weights_only=True)
        assert set(loaded) == set(sd)
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert paths["safetensors"].suffix == ".safetensors"
    assert paths["pt"].suffix == ".pt"
    assert paths["bin"].name == "pytorch_model.bin"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_sliding_window_matters(family):
    model = build_model(family, "gqa")
    tok = tokenizer_for(family)
    inputs = _inputs(tok, family)
    ref = _last_hidden(model, inputs)
    model.config.sliding_window = 4096
    for layer in model.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 4096
    wide = _last_hidden(model, inputs)
    assert not torch.allclose(ref, wide, atol=1e-4)


def test_perturb_norms():
    plain = build_model("gemma2")
    pert = build_model("gemma2", perturb_norms=True)
    key = attention_keys("gemma2", 0)["norm"]
    assert torch.equal(plain.state_dict()[key], torch.zeros_like(plain.state_dict()[key]))
    assert not torch.equal(pert.state_dict()[key], plain.state_dict()[key])
    other = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(pert.state_dict()[other], plain.state_dict()[other])


def test_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model("llama", "gqa")
    tok = tokenizer_for("llama")
    sha = "0123456789abcdef" * 2 + "01234567"
    snapshot = make_hub_cache(model, tok, tmp_path / "hub", "tiny-org/tiny-llama", sha)
    assert snapshot == tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / sha
    assert (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").read_text() == sha

    path = huggingface_hub.hf_hub_download(
        "tiny-org/tiny-llama", "config.json", cache_dir=tmp_path / "hub", local_files_only=True
    )
    assert json.loads(open(path).read())["model_type"] == "llama"
    assert str(path).startswith(str(snapshot))

    reloaded = AutoModel.from_pretrained(
        "tiny-org/tiny-llama", cache_dir=tmp_path / "hub", local_files_only=True
    )
    inputs = _inputs(tok, "llama")
    with torch.no_grad():
        got = reloaded(**inputs).last_hidden_state
    torch.testing.assert_close(got, _last_hidden(model, inputs), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(
        "tiny-org/tiny-llama", cache_dir=tmp_path / "hub", local_files_only=True
    )(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]

    # default revision sha
    snap0 = make_hub_cache(model, None, tmp_path / "hub2", "tiny-org/other")
    assert snap0.name == "0" * 40
    assert huggingface_hub.hf_hub_download(
        "tiny-org/other", "config.json", cache_dir=tmp_path / "hub2", local_files_only=True
    )
