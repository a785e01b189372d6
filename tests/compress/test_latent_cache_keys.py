"""LatentCache key latents (issue 23): keys stored as latents, linear or pre-rotary, in transformers' own Cache.

Comparisons: k = head_dim with a random invertible encoder (U = E^-1) against DynamicCache, logits to 1e-5 and tokens
identical, on every decoder family; k < head_dim in float64 against keys projected by hand (rotation matrices built
from the family's own rotate function at explicit positions and inverted with torch.linalg.inv).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ALL_FAMILY_VARIANTS

from headlens.compress.cache import LatentCache
from headlens.compress.key_cache import KeyLatents
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
REFUSED = {"gptj"}  # rotary inside attention from its own buffer


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
    (cos/sin from the rotary module), the first cos.shape[-1] dims rotated and the rest passed."""
    import sys

    attn = next(iter(attention_modules(model).values()))
    fn = sys.modules[type(attn).__module__].apply_rotary_pos_emb
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


HAND = [("qwen3", "gqa"), ("gpt_neox", "mha"), ("phi", "gqa"), ("cohere", "gqa"), ("glm4", "gqa"), ("gpt2", "mha")]


@pytest.mark.parametrize("family,variant", HAND, ids=[f for f, _ in HAND])
def test_low_rank_key_latents_equal_keys_projected_by_hand(family, variant, ckpts):
    """float64, k = head_dim / 4, random E (k, hd) and U with E U = I, key biases: the keys the cache returns at
    every position, and the logits of a prefill and 5 decoding steps, equal a DynamicCache fed keys projected by
    hand, R(p) (U E (R(p)^-1 k - b) + b), with R(p) the family's rotation as a matrix, to 1e-6. Qwen3 normalises its
    keys (k_norm), GPT-NeoX and Phi rotate part of each head, Cohere and GLM-4 interleave, GPT-2 is linear."""
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
