"""LatentCache key latents (issue 23): keys stored as latents, linear or pre-rotary, in transformers' own Cache.

Comparisons: k = head_dim with a random invertible encoder (U = E^-1) against DynamicCache, logits to 1e-5 and tokens
identical, on every decoder family; k < head_dim in float64 against keys projected by hand (rotation matrices built
from the family's own rotate function at explicit positions and inverted with torch.linalg.inv).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import ALL_FAMILY_VARIANTS

from headlens.compress.apply import FACTORS_FILE, LATENT_PLAN_FILE, save_latent_factors
from headlens.compress.cache import LatentCache
from headlens.compress.key_cache import KeyLatents, key_plan_entry
from headlens.compress.plan import plan_layers
from headlens.compress.rotary_keys import attention_modules, rotates_keys
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

ENCODERS = {"bert", "distilbert", "t5"}
DECODERS = [(f, v) for f, v in ALL_FAMILY_VARIANTS if f not in ENCODERS]
PROMPT = torch.tensor([[5, 17, 33, 2, 41, 8, 99, 120, 64, 7, 250, 31]])
# what each family does to its keys (written here, not read from the library): rotary families, and their NoPE layers
ROTARY = {"qwen3", "qwen2", "llama", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "qwen3_moe", "mixtral", "olmoe",
          "olmo", "olmo2", "granite", "glm4", "cohere", "stablelm", "stablelm_parallel", "gptj", "falcon", "falcon_mq",
          "phi", "starcoder2", "smollm3", "llama4"}
REFUSED: set[str] = set()  # every decoder family stores key latents


def _setup(ckpts, family, variant, dtype=torch.float32):
    model, _ = ckpts.model(family, variant)
    return copy.deepcopy(model).to(dtype).eval()


def _invertible(hd: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random well-conditioned E (hd, hd) and U = E^-1, float64."""
    q1, _ = torch.linalg.qr(torch.randn(hd, hd, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(hd, hd, generator=gen, dtype=torch.float64))
    E = q1 @ torch.diag(torch.rand(hd, generator=gen, dtype=torch.float64) + 0.5) @ q2
    return E, torch.linalg.inv(E)


def _low_rank(hd: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random E (k, hd) and U (hd, k) with E U = I and U E an oblique projection."""
    U = torch.randn(hd, k, generator=gen, dtype=torch.float64)
    P = torch.linalg.pinv(U)
    N = torch.randn(k, hd, generator=gen, dtype=torch.float64)
    return P + N @ (torch.eye(hd, dtype=torch.float64) - U @ P), U


def _key_latents(model, ck, k=None, seed=0, bias=False) -> dict[int, KeyLatents]:
    """Key latents for every layer of ``model`` (checkpoint ``ck``): k = head_dim (invertible E) where ``k`` is None,
    else low rank; the rotary flag as the model rotates the layer's keys."""
    G, hd = ck.shape.num_kv_heads, ck.shape.head_dim
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, module in attention_modules(model).items():
        pairs = [_invertible(hd, gen) if k is None else _low_rank(hd, k, gen) for _ in range(G)]
        b = [0.3 * torch.randn(hd, generator=gen, dtype=torch.float64) for _ in range(G)] if bias else None
        out[layer] = KeyLatents(layer, [e for e, _ in pairs], [u for _, u in pairs], b, rotates_keys(model, module))
    return out


def _generate(model, cache, n=16, ids=PROMPT, **kw):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward(model, cache, ids=PROMPT):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("family,variant", DECODERS, ids=[f"{f}-{v}" for f, v in DECODERS])
def test_full_size_key_latents_equal_dynamic_cache(family, variant, ckpts):
    """k = head_dim (random invertible E, U = E^-1): prefill logits and 16 greedy tokens as DynamicCache, without and
    with value latents (k = head_dim); the keys slot holds [batch, 1, tokens, G hd] latents."""
    model = _setup(ckpts, family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    keys = _key_latents(model, ck, bias=True)
    assert all(lat.rotary == (family in ROTARY) for lat in keys.values() if family not in ("llama4", "smollm3"))
    if family in REFUSED:
        with pytest.raises(HeadlensError, match=f"^{family} cannot store rotary key latents"):
            LatentCache({}, model.config, key_latents=keys, model=model)
        return
    ref = _forward(model, _dynamic(model))
    seq_ref, logits_ref = _generate(model, _dynamic(model))
    plans = plan_layers(ck, {layer: ck.shape.head_dim for layer in range(ck.shape.num_layers)}, "plain")
    for cache in (LatentCache({}, model.config, key_latents=keys, model=model),
                  LatentCache.from_plans(model, ck, plans, key_latents=keys)):
        assert float((_forward(model, cache) - ref).abs().max()) < 1e-5
        cache = LatentCache.from_plans(model, ck, plans, key_latents=keys) if cache.latents else \
            LatentCache({}, model.config, key_latents=keys, model=model)
        seq, logits = _generate(model, cache)
        assert torch.equal(seq, seq_ref)
        assert float((logits - logits_ref).abs().max()) < 1e-5
        G = len(keys[0].encode)
        assert all(layer.keys.shape[1] == 1 and layer.keys.shape[-1] == G * ck.shape.head_dim
                   for layer in cache.layers)
        assert all((layer.positions is not None) == (family in ROTARY) for layer in cache.layers
                   if family not in ("llama4", "smollm3"))


def test_nope_and_alibi_layers_are_linear():
    """What rotates_keys says, per layer, on the families with NoPE layers or ALiBi: as their configs say."""
    from tiny_models import build_model

    for family in ("llama4", "smollm3", "falcon_rw", "bloom", "gpt2"):
        model = build_model(family, "mha" if family in ("falcon_rw", "bloom", "gpt2") else "gqa")
        flags = {i: rotates_keys(model, m) for i, m in attention_modules(model).items()}
        text = model.config.get_text_config(decoder=True)
        if family in ("llama4", "smollm3"):
            want = {i: bool(text.no_rope_layers[i]) for i in flags}
        else:
            want = {i: False for i in flags}
        assert flags == want, family


# ------------------------------------------------------------------------------------------ k < head_dim, by hand


def _rotary_module(model):
    return next(m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb")


def _rotation(model, position: int, hd: int) -> torch.Tensor:
    """R(p) (hd, hd) float64: the family's own rotate function applied to the basis vectors at position ``p``
    (cos/sin from the rotary module), the first cos.shape[-1] dims rotated and the rest passed. GPT-J has no rotary
    module: its sin/cos are written here in closed form (angle p / 10000^(2i / rotary_dim)) and handed to its
    ``apply_rotary_pos_emb(tensor, sin, cos)`` on [batch, tokens, heads, rot]."""
    import sys

    attn = next(iter(attention_modules(model).values()))
    fn = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if getattr(model.config, "model_type", "") == "gptj":
        rot = model.config.rotary_dim or hd
        angle = position / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        basis = torch.eye(rot, dtype=torch.float64)[None, :, None]  # (1, rot tokens, 1 head, rot)
        cols = fn(basis, angle.sin().expand(1, rot, rot // 2), angle.cos().expand(1, rot, rot // 2))[0, :, 0]
    else:
        cos, sin = _rotary_module(model)(torch.zeros(1, dtype=torch.float64), torch.tensor([[position]]))
        rot = cos.shape[-1]
        basis = torch.eye(rot, dtype=torch.float64)[None, None]  # (1, 1, rot tokens, rot): token i = e_i
        cols = fn(basis, basis, cos.expand(1, rot, rot), sin.expand(1, rot, rot))[1][0, 0]  # row i = R e_i
    R = torch.eye(hd, dtype=torch.float64)
    R[:rot, :rot] = cols.T
    return R


class _HandCache:
    """A DynamicCache whose update replaces each new key k (position p, group g) by R(p) (U_g E_g R(p)^-1 (k) ...)
    computed with explicit matrices: the keys the key latents should give, and what attention gets."""

    def __new__(cls, model, keys: dict[int, KeyLatents]):
        from transformers import DynamicCache

        class Hand(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                past = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
                lat = keys[layer_idx]
                out = key_states.clone()
                for t in range(key_states.shape[2]):
                    R = _rotation(model, past + t, key_states.shape[-1]) if lat.rotary else torch.eye(key_states.shape[-1],
                                                                                 dtype=torch.float64)
                    Rinv = torch.linalg.inv(R)
                    for g in range(key_states.shape[1]):
                        b = lat.bias[g] if lat.bias is not None else 0
                        pre = Rinv @ key_states[0, g, t]
                        out[0, g, t] = R @ (lat.up[g] @ (lat.encode[g] @ (pre - b)) + b)
                return super().update(out, value_states, layer_idx, *args, **kwargs)

        return Hand(config=model.config)


HAND = [("qwen3", "gqa"), ("gpt_neox", "mha"), ("phi", "gqa"), ("cohere", "gqa"), ("glm4", "gqa"), ("gpt2", "mha"),
        ("gptj", "mha")]


@pytest.mark.parametrize("family,variant", HAND, ids=[f for f, _ in HAND])
def test_low_rank_key_latents_equal_keys_projected_by_hand(family, variant, ckpts):
    """float64, k = head_dim / 4, random E (k, hd) and U with E U = I, key biases: the keys the cache returns at
    every position, and the logits of a prefill and 5 decoding steps, equal a DynamicCache fed keys projected by
    hand, R(p) (U E (R(p)^-1 k - b) + b), with R(p) the family's rotation as a matrix, to 1e-6. Qwen3 normalises its
    keys (k_norm), GPT-NeoX and Phi rotate part of each head, Cohere and GLM-4 interleave, GPT-2 is linear, GPT-J
    turns part of each head with sin/cos gathered inside attention."""
    model = _setup(ckpts, family, variant, torch.float64)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    keys = _key_latents(model, ck, k=ck.shape.head_dim // 4, seed=3, bias=True)
    assert all(lat.rotary == (family != "gpt2") for lat in keys.values())
    cache, hand = LatentCache({}, model.config, key_latents=keys, model=model), _HandCache(model, keys)
    seen = []
    layer0 = cache.layers[0]
    update = layer0.update
    layer0.update = lambda k, v, *a, **kw: seen.append(update(k, v, *a, **kw)) or seen[-1]
    ids = PROMPT
    with torch.no_grad():
        for step in range(6):
            out, ref = model(ids, past_key_values=cache).logits, model(ids, past_key_values=hand).logits
            assert float((out - ref).abs().max()) < 1e-6
            assert float((seen[-1][0] - hand.layers[0].keys).abs().max()) < 1e-6
            if step == 0:  # the projection changes the model: the comparison has something to see
                assert float((out - _forward(model, _dynamic(model))).abs().max()) > 1e-3
            ids = out[:, -1:].argmax(-1)
    assert seen[-1][0].shape[2] == PROMPT.shape[1] + 5
    if family != "gpt2":
        assert torch.equal(cache.layers[0].positions, torch.arange(PROMPT.shape[1] + 5, dtype=torch.int32)[None])


# ------------------------------------------------------------------------------------------ batches, crop, beams


def _qwen3(ckpts, family="qwen3", variant="gqa"):
    model = _setup(ckpts, family, variant)
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    return model, ck, _key_latents(model, ck, bias=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gptj"])
def test_left_padding_positions_beams_crop_and_manual_loop(family, ckpts):
    """k = head_dim: batch of two with left padding (the stored positions are the model's position_ids: the
    padded row's start at 0 after its padding), beam search, a crop and a manual loop, as DynamicCache. Gemma 3 has
    sliding-window layers (window 4) with local and global RoPE; GPT-J gathers sin/cos at position_ids itself."""
    model, ck, keys = _qwen3(ckpts, family, "mha" if family == "gptj" else "gqa")
    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 2], [9, 8, 7, 6, 5, 4, 3]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    cache = LatentCache({}, model.config, key_latents=keys, model=model)
    given = []  # the position_ids the model hands its first attention module, call by call
    hook = next(iter(attention_modules(model).values())).register_forward_pre_hook(
        lambda m, args, kw: given.append(kw["position_ids"].expand(2, -1)), with_kwargs=True)
    a, la = _generate(model, cache, n=12, ids=ids, attention_mask=mask)
    hook.remove()
    b, lb = _generate(model, _dynamic(model), n=12, ids=ids, attention_mask=mask)
    assert torch.equal(a, b) and float((la - lb).abs().max()) < 1e-5
    want = torch.cat(given, dim=1).to(torch.int32)  # (the last token generated is never fed nor cached)
    assert want[0, 3] == 0 and want[1, 3] == 3  # the padded row's positions start after its padding
    for layer in cache.layers:
        assert torch.equal(layer.positions, want[:, want.shape[1] - layer.keys.shape[-2]:])
    assert any(layer.keys.shape[-2] < want.shape[1] for layer in cache.layers) == (family == "gemma3")
    # beams of one prompt share positions, so beam search cannot show them reordered: reorder rows by hand
    before = [(layer.keys.clone(), layer.positions.clone()) for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 3]))  # rows (1, 0)
    for layer, (k, p) in zip(cache.layers, before):
        assert torch.equal(layer.keys, k.flip(0)) and torch.equal(layer.positions, p.flip(0))
    a, la = _generate(model, LatentCache({}, model.config, key_latents=keys, model=model), n=8, num_beams=3)
    b, lb = _generate(model, _dynamic(model), n=8, num_beams=3)
    assert torch.equal(a, b) and float((la - lb).abs().max()) < 1e-5
    cache, ref = LatentCache({}, model.config, key_latents=keys, model=model), _dynamic(model)
    with torch.no_grad():
        out, out_ref = model(PROMPT[:, :3], past_key_values=cache), model(PROMPT[:, :3], past_key_values=ref)
        cache.crop(-1)
        ref.crop(-1)
        assert cache.layers[0].positions.shape[1] == 2
        nxt = PROMPT[:, 2:3]
        for _ in range(6):
            out, out_ref = model(nxt, past_key_values=cache), model(nxt, past_key_values=ref)
            assert float((out.logits - out_ref.logits).abs().max()) < 1e-5
            nxt = out.logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == ref.get_seq_length() == 8
    full = max(cache.layers, key=lambda layer: layer.positions.shape[1])  # Gemma 3's sliding layer keeps 3
    assert torch.equal(full.positions, torch.arange(8, dtype=torch.int32)[None])


def test_nbytes_counts_key_latents_and_positions(ckpts):
    """After T cached tokens: per layer T (G k_K + G k_V) latents in float32 and T int32 positions; an independent
    count over the tensors reachable from the cache agrees."""
    model, ck, _ = _qwen3(ckpts)
    G, hd, L = ck.shape.num_kv_heads, ck.shape.head_dim, ck.shape.num_layers
    keys = _key_latents(model, ck, k=3, seed=1)
    plans = plan_layers(ck, {layer: 5 for layer in range(L)}, "plain")
    cache = LatentCache.from_plans(model, ck, plans, key_latents=keys)
    _generate(model, cache, n=9)
    T = PROMPT.shape[1] + 8
    assert cache.nbytes() == L * T * ((G * 3 + G * 5) * 4 + 4)
    assert _reachable_bytes(cache) == cache.nbytes()
    assert cache.layers[0].keys.shape == (1, 1, T, G * 3) and cache.layers[0].positions.dtype == torch.int32
    linear = _setup(ckpts, "gpt2", "mha")
    ck2 = ModelSource(weights=ckpts.path("gpt2", "mha", "hf_dir")).checkpoint()
    cache = LatentCache({}, linear.config, key_latents=_key_latents(linear, ck2, k=3))
    _generate(linear, cache, n=9)
    assert cache.nbytes() == L * T * (4 * 3 + 4 * hd) * 4  # no positions for linear keys; full values


def _reachable_bytes(obj) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` through its attributes, containers and referents, less
    the factors (``latents``, ``key_latents``, ``_ready``: parameters of the cache, not cached tokens)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(v for key, v in x.items() if key not in ("latents", "key_latents", "_ready"))
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            stack.append(vars(x))
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def test_absorbed_attention_with_key_latents(ckpts):
    """Values read as latents (absorbed attention) while the keys come back rebuilt: the same tokens and logits
    (1e-5) as rebuilding both, at k < head_dim for keys and values."""
    from headlens.compress.absorbed import absorbed_attention

    model, ck, _ = _qwen3(ckpts)
    keys = _key_latents(model, ck, k=8, seed=2)
    plans = plan_layers(ck, {layer: 4 for layer in range(ck.shape.num_layers)}, "plain")
    a, la = _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=False, key_latents=keys), n=16)
    with absorbed_attention(model):
        b, lb = _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=True, key_latents=keys), n=16)
    assert torch.equal(a, b) and float((la - lb).abs().max()) < 1e-5


def test_key_factors_saved_and_read_back(ckpts, tmp_path):
    """save_latent_factors with key_latents + key_plan_entry in the plan file: from_pretrained(DIR, model) gives the
    same cache (same logits) as the factors in memory, rotary flag included; a layer with key latents only."""
    model, ck, _ = _qwen3(ckpts)
    keys = _key_latents(model, ck, k=6, seed=4, bias=True)
    plans = plan_layers(ck, {0: 4}, "plain")
    memory = LatentCache.from_plans(model, ck, plans, key_latents=keys)
    model.config.save_pretrained(tmp_path)
    from headlens.compress.cache import encoders

    save_latent_factors(plans, tmp_path / FACTORS_FILE, encoders(model, ck, plans), key_latents=keys)
    entries = [{"layer": 0, "kind": "plain", "k": plans[0].ks, **key_plan_entry(keys[0])},
               {"layer": 1, **key_plan_entry(keys[1])}]
    (tmp_path / LATENT_PLAN_FILE).write_text(json.dumps({"layers": entries}))
    with pytest.raises(HeadlensError, match="build it with `model`"):
        LatentCache.from_pretrained(tmp_path)
    read = LatentCache.from_pretrained(tmp_path, model=model)
    assert sorted(read.key_latents) == [0, 1] and sorted(read.latents) == [0]
    assert all(lat.rotary for lat in read.key_latents.values())
    assert float((_forward(model, read) - _forward(model, memory)).abs().max()) < 1e-6


def test_bad_key_latents_are_one_line(ckpts):
    model, ck, keys = _qwen3(ckpts)
    with pytest.raises(HeadlensError, match=r"^layer 0 has rotary key latents: .* build it with `model`"):
        LatentCache({}, model.config, key_latents=keys)
    gpt2 = _setup(ckpts, "gpt2", "mha")
    ck2 = ModelSource(weights=ckpts.path("gpt2", "mha", "hf_dir")).checkpoint()
    with pytest.raises(HeadlensError, match="have 2 kv groups in layer 0, but the model has 4 kv heads: they belong"):
        LatentCache({}, gpt2.config, key_latents=keys, model=gpt2)  # qwen3's factors (2 kv heads) on GPT-2
    rotated = {i: KeyLatents(i, lat.encode, lat.up, None, True) for i, lat in _key_latents(gpt2, ck2, k=4).items()}
    with pytest.raises(HeadlensError, match=r"^layer 0: key latents with rotary=True, but the model does not rotate"):
        LatentCache({}, gpt2.config, key_latents=rotated, model=gpt2)
    gen = torch.Generator().manual_seed(0)
    narrow = {i: KeyLatents(i, *map(list, zip(*[_low_rank(8, 4, gen) for _ in range(4)])), None, False)
              for i in range(2)}
    with pytest.raises(HeadlensError, match="head_dim 8, but the model has 16: they belong to another model"):
        LatentCache({}, gpt2.config, key_latents=narrow, model=gpt2)
    cache = LatentCache({}, model.config, key_latents=keys, model=model)  # run by another model of the family:
    with pytest.raises(HeadlensError, match="^layer 0: the LatentCache .* handed it no position_embeddings .* another"):
        _forward(_setup(ckpts, "qwen3", "gqa"), cache)  # never hooked
    with pytest.raises(HeadlensError, match="^layer 0: this LatentCache's rotary key latents were built for another"):
        _forward(copy.deepcopy(model), cache)  # hooked (the hooks copied with it), but not the cache's model
    bad = {0: KeyLatents(0, [keys[0].encode[0] * 2] * 4, keys[0].up[:1] * 4, None, True)}
    with pytest.raises(HeadlensError, match="does not invert its up-projection"):
        LatentCache({}, model.config, key_latents=bad, model=model)
