"""LatentCache (issue 22): value latents stored in transformers' own Cache, inside generate().

Every comparison is against HuggingFace's own computation: the same model with ``DynamicCache`` (k = head_dim), or
the weight-replaced model (``apply_plans``: ``W_V^g`` replaced by ``W_V^g Q_g``, the exported checkpoint's weights)
with ``DynamicCache`` (k < head_dim). Models run in float32.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, variants_of

from headlens.compress.apply import apply_plans
from headlens.compress.cache import LatentCache, SlidingLatentLayer
from headlens.compress.plan import plan_layers
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

ENCODERS = {"bert", "distilbert", "t5"}
DECODERS = [(f, "gqa" if "gqa" in variants_of(f) else variants_of(f)[0]) for f in FAMILIES if f not in ENCODERS]
PROMPT = torch.tensor([[5, 17, 33, 2, 41, 8, 99, 120, 64, 7, 250, 31]])


def _setup(ckpts, family, variant):
    model, tok = ckpts.model(family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    return ck, copy.deepcopy(model).float().eval(), tok


def _plans(ck, k, kind="plain", X=None):
    layers = range(ck.shape.num_layers)
    return plan_layers(ck, {layer: k for layer in layers}, kind, X)


def _generate(model, cache, n=16, ids=PROMPT, **kw):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@pytest.mark.parametrize("family,variant", DECODERS, ids=[f for f, _ in DECODERS])
def test_full_size_latents_generate_as_dynamic_cache(family, variant, ckpts):
    """k = head_dim everywhere: LatentCache equals DynamicCache token for token, logits to 1e-5."""
    ck, model, _ = _setup(ckpts, family, variant)
    cache = LatentCache.from_plans(model, ck, _plans(ck, ck.shape.head_dim))
    seq, logits = _generate(model, cache)
    seq_ref, logits_ref = _generate(model, _dynamic(model))
    assert torch.equal(seq, seq_ref)
    assert float((logits - logits_ref).abs().max()) < 1e-5
    assert all(layer.values.shape[-1] == ck.shape.num_kv_heads * ck.shape.head_dim for layer in cache.layers
               if layer.values is not None and layer.values.numel())


LOW_RANK = [("qwen3", "gqa"), ("gpt2", "mha"), ("gpt_neox", "mha"), ("phi3", "gqa"), ("qwen2", "gqa"),
            ("llama", "gqa"), ("gemma2", "gqa")]


def _calibration(model, tok, ck):
    from headlens.residual.capture import capture_attention_inputs

    texts = ["The true meaning of life is absurdity and suffering, said the old man to the young woman.",
             "Mary went to Paris and John went to London; when Mary and John met again, John gave a book to Mary.",
             "Attention is all you need, said the researcher, and the heads looked at the previous token."]
    X, n = capture_attention_inputs(model, tok, ck.spec, texts, list(range(ck.shape.num_layers)), 512)
    assert n > ck.shape.hidden_size
    return X


def _perturb_biases(model) -> None:
    """Seeded noise on every bias (zero at initialisation), so that the value bias b_g the cache subtracts and adds
    back is tested (the plans fit weights only; the bias is read from the model)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
@pytest.mark.parametrize("family,variant", LOW_RANK, ids=[f for f, _ in LOW_RANK])
def test_latents_on_the_original_equal_the_weight_replaced_model(family, variant, kind, ckpts):
    """k < head_dim: LatentCache on the original checkpoint = the weight-replaced model with DynamicCache, token for
    token over 64 greedy tokens, logits to 1e-5; the cache holds sum_g k_g numbers per token and layer."""
    ck, model, tok = _setup(ckpts, family, variant)
    _perturb_biases(model)  # HF initialises biases to zero: give the value bias something to carry
    X = _calibration(model, tok, ck) if kind == "data-aware" else None
    k = ck.shape.head_dim // 4
    plans = _plans(ck, k, kind, X)
    replaced = copy.deepcopy(model)
    apply_plans(replaced, ck, plans)
    cache = LatentCache.from_plans(model, ck, plans)
    seq, logits = _generate(model, cache, n=64)
    seq_ref, logits_ref = _generate(replaced, _dynamic(replaced), n=64)
    assert torch.equal(seq, seq_ref)
    assert float((logits - logits_ref).abs().max()) < 1e-5
    G = ck.shape.num_kv_heads
    for layer in cache.layers:
        assert layer.values.shape[-1] == G * k and layer.values.shape[1] == 1
    if family == "gemma2":
        assert any(isinstance(layer, SlidingLatentLayer) for layer in cache.layers)
        assert any("sliding-window" in n for n in cache.notes)


def test_nbytes_is_measured_from_the_tensors(ckpts):
    """nbytes after T tokens is T * (keys + sum_g k_g) * bytes per layer exactly, below DynamicCache's by the
    planned saving, and equals an independent count of the tensors reachable from the cache object."""
    ck, model, _ = _setup(ckpts, "qwen3", "gqa")
    s, k = ck.shape, 4
    cache = LatentCache.from_plans(model, ck, _plans(ck, k))
    dyn = _dynamic(model)
    n = 9
    _generate(model, cache, n=n)
    _generate(model, dyn, n=n)
    T = PROMPT.shape[1] + n - 1  # the last token generated is never cached
    per_token = s.num_layers * (s.num_kv_heads * s.head_dim + s.num_kv_heads * k) * 4
    assert cache.nbytes() == T * per_token
    full = s.num_layers * 2 * s.num_kv_heads * s.head_dim * 4 * T
    assert sum(t.numel() * t.element_size() for layer in dyn.layers for t in (layer.keys, layer.values)) == full
    assert cache.nbytes() / full == pytest.approx((s.head_dim + k) / (2 * s.head_dim))
    assert _reachable_bytes(cache) == cache.nbytes()


def _reachable_bytes(obj) -> int:
    """Bytes of the distinct cached tensors reachable from ``obj`` through gc's referents (the factors a layer keeps
    for its own use are parameters of the cache, not cached tokens: they sit under ``latents`` and ``_ready``)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
            continue
        if isinstance(x, dict):
            stack.extend(v for key, v in x.items() if key not in ("latents", "_ready"))
            continue
        if hasattr(x, "__dict__") and not isinstance(x, type):
            stack.append(vars(x))
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def test_batch_left_padding_crop_reorder_and_manual_loop(ckpts):
    """Batch of two with left padding, beam search (reorder_cache), crop, get_seq_length and a manual forward loop:
    LatentCache at k = head_dim behaves as DynamicCache, and at k < head_dim as the weight-replaced model."""
    ck, model, _ = _setup(ckpts, "qwen3", "gqa")
    plans = _plans(ck, 4)
    replaced = copy.deepcopy(model)
    apply_plans(replaced, ck, plans)
    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 2], [9, 8, 7, 6, 5, 4, 3]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    a, la = _generate(model, LatentCache.from_plans(model, ck, plans), n=12, ids=ids, attention_mask=mask)
    b, lb = _generate(replaced, _dynamic(replaced), n=12, ids=ids, attention_mask=mask)
    assert torch.equal(a, b) and float((la - lb).abs().max()) < 1e-5
    a, la = _generate(model, LatentCache.from_plans(model, ck, plans), n=8, num_beams=3)
    b, lb = _generate(replaced, _dynamic(replaced), n=8, num_beams=3)
    assert torch.equal(a, b)
    # a manual loop, with a crop in the middle
    cache, ref = LatentCache.from_plans(model, ck, plans), _dynamic(replaced)
    with torch.no_grad():
        out = model(PROMPT, past_key_values=cache, use_cache=True)
        out_ref = replaced(PROMPT, past_key_values=ref, use_cache=True)
        assert cache.get_seq_length() == ref.get_seq_length() == PROMPT.shape[1]
        cache.crop(-3)
        ref.crop(-3)
        assert cache.get_seq_length() == PROMPT.shape[1] - 3
        nxt = PROMPT[:, -3:]
        for _ in range(5):
            out = model(nxt, past_key_values=cache, use_cache=True)
            out_ref = replaced(nxt, past_key_values=ref, use_cache=True)
            assert float((out.logits - out_ref.logits).abs().max()) < 1e-5
            nxt = out.logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == ref.get_seq_length()


def test_loading_the_layer_types_leaves_transformers_alone():
    """Defining the latent layers registers nothing in transformers' own layer-type table (DynamicCache unchanged)."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicLayer, DynamicSlidingWindowLayer

    assert DYNAMIC_LAYER_TYPE_MAPPING["full_attention"] is DynamicLayer
    assert DYNAMIC_LAYER_TYPE_MAPPING["sliding_attention"] is DynamicSlidingWindowLayer


# ------------------------------------------------------------------------------------------ saved directories


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """compress --save-model on tiny-lm (k = 16, plain): the exported directory, with its original alongside."""
    from headlens.cli import main

    root = tmp_path_factory.mktemp("latent")
    assert main(["compress", "--model", "tiny-lm", "--k", "16", "--latent", "plain", "--out-dir",
                 str(root / "o"), "--save-model", str(root / "m")]) == 0
    return root / "m"


def test_from_pretrained_on_the_original_and_the_exported_model(saved):
    from transformers import AutoModelForCausalLM

    from headlens.io.embedded import embedded_dir

    original = AutoModelForCausalLM.from_pretrained(embedded_dir("tiny-lm"), dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)  # bfloat16 weights, widened
    a, la = _generate(original, LatentCache.from_pretrained(saved), n=32)
    b, lb = _generate(exported, LatentCache.from_pretrained(saved), n=32)
    c, lc = _generate(exported, _dynamic(exported), n=32)
    # the exported weights are W_V Q rounded to bfloat16; the cache rebuilds U E (that rounding): equal to it
    assert torch.equal(b, c) and float((lb - lc).abs().max()) < 2e-3
    assert torch.equal(a, c) and float((la - lc).abs().max()) < 1e-2  # the original + the factors
    plan = json.loads((saved / "headlens_latent.json").read_text())
    assert all(layer["k"] == [16, 16] for layer in plan["layers"])


def _copy(saved, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(saved, out)
    return out


def test_bad_compressed_directories(saved, tmp_path):
    from headlens.io.embedded import embedded_dir

    with pytest.raises(HeadlensError, match="has no headlens_latent.json"):
        LatentCache.from_pretrained(embedded_dir("tiny-lm"))
    d = _copy(saved, tmp_path, "no-factors")
    (d / "latent_factors.safetensors").unlink()
    with pytest.raises(HeadlensError, match="latent factors are missing"):
        LatentCache.from_pretrained(d)
    d = _copy(saved, tmp_path, "corrupt")
    (d / "latent_factors.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(HeadlensError, match="is not a readable latent factors file"):
        LatentCache.from_pretrained(d)
    d = _copy(saved, tmp_path, "other-model")  # factors whose head_dim is not the model's
    sd = load_file(str(d / "latent_factors.safetensors"))
    sd = {k: (v[:8] if k.endswith(".up") else v[:, :8] if k.endswith(".encode") else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(d / "latent_factors.safetensors"), metadata={"format": "headlens-latent-factors/1"})
    with pytest.raises(HeadlensError, match="head_dim 8, but the model has 64: they belong to another model"):
        LatentCache.from_pretrained(d)
    d = _copy(saved, tmp_path, "layers")
    plan = json.loads((d / "headlens_latent.json").read_text())
    plan["layers"].append(dict(plan["layers"][0], layer=9))
    (d / "headlens_latent.json").write_text(json.dumps(plan))
    with pytest.raises(HeadlensError, match="lacks layer9.group0.up|name layer 9"):
        LatentCache.from_pretrained(d)
    d = _copy(saved, tmp_path, "broken-encoder")
    sd = load_file(str(d / "latent_factors.safetensors"))
    sd["layer0.group0.encode"] = sd["layer0.group0.encode"] * 2
    save_file(sd, str(d / "latent_factors.safetensors"))
    with pytest.raises(HeadlensError, match="does not invert its up-projection"):
        LatentCache.from_pretrained(d)


def test_rank_condition_refused(ckpts):
    """A latent whose down-projection leaves the row space of the value weights cannot be stored from the values:
    refused, naming the layer and group (here W_V^0 of layer 0 has zeroed rows and P is not its)."""
    ck, model, _ = _setup(ckpts, "qwen3", "gqa")
    plans = _plans(ck, 4)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[:8] = 0
    plans[0].groups[0].down = torch.randn_like(plans[0].groups[0].down)
    with pytest.raises(HeadlensError, match=r"layer 0, kv group 0: .* row space of the value weights .*rank 8 of 16"):
        LatentCache.from_plans(model, ck, plans)
