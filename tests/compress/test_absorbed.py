"""Absorbed attention (issue 22): attention that reads a LatentCache's latents, ``(softmax(q K^T) C_g) U_g^T + b_g``,
never the values rebuilt from them.

Every model comparison is three-way against HuggingFace's own computation: the original model with the LatentCache
read as latents (inside ``absorbed_attention``), the same cache rebuilding values (``absorbed=False``), and the
weight-replaced model (``apply_plans``) with DynamicCache; 64 greedy tokens, logits to 1e-5, float32. The attention
function itself is checked against a dense float64 computation. The tiny families' biases are zero as HF initialises
them: the value bias is perturbed here wherever there is one, so ``+ rowsum * b_g`` is exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import FAMILIES, build_tiny, save_checkpoint, tokenizer_for, variants_of

import headlens.compress.absorbed as absorbed_mod
from headlens.compress.absorbed import (ABSORBED, LatentValues, absorbed_attention, absorbed_attention_forward,
                                        supports_absorbed)
from headlens.compress.apply import apply_plans
from headlens.compress.cache import LatentCache, LatentLayer, LayerLatents, SlidingLatentLayer, _LatentValues
from headlens.compress.plan import plan_layers
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource

PROMPT = torch.tensor([[5, 17, 33, 2, 41, 8, 99, 120, 64, 7, 250, 31]])


def _mistral_window(variant="gqa", seed=0):
    """Mistral with a 6-token sliding window in every layer (the FAMILIES builder has none), sdpa by default."""
    return build_tiny(transformers.MistralConfig, transformers.MistralForCausalLM, seed, vocab_size=512,
                      hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=6,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)


BUILDERS = {**FAMILIES, "mistral_window": _mistral_window}


def _perturb_biases(model, seed=1):
    """Seeded noise on every bias of the attention projections (HF initialises them to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and any(s in name for s in ("attn", "attention")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (float32 model in eval mode, its Checkpoint, tokenizer), biases perturbed, saved once."""
    cache = {}

    def get(family, variant):
        if (family, variant) not in cache:
            model = _perturb_biases(BUILDERS[family](variant)).float().eval()
            tok = tokenizer_for("mistral" if family == "mistral_window" else family)
            out = tmp_path_factory.mktemp(f"{family}-{variant}")
            path = save_checkpoint(model, tok, out, "hf_dir")
            cache[family, variant] = (model, ModelSource(weights=path).checkpoint(), tok)
        return cache[family, variant]

    return get


def _plans(ck, k, kind="plain", X=None):
    return plan_layers(ck, {layer: k for layer in range(ck.shape.num_layers)}, kind, X)


def _generate(model, cache, n=64, ids=PROMPT, **kw):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def _dynamic(model):
    return transformers.DynamicCache(config=model.config)


class Spy:
    """Counts, while installed: values rebuilt from latents (``decode``) and latents read by absorbed attention
    (``_apply_latents``: calls and the widths of the latents read)."""

    def __init__(self, monkeypatch):
        self.decoded, self.absorbed, self.widths = 0, 0, set()
        decode, apply = _LatentValues.decode, absorbed_mod._apply_latents

        def counting_decode(layer, latents, dtype):
            self.decoded += 1
            return decode(layer, latents, dtype)

        def counting_apply(layer, probs, C, *args):
            self.absorbed += 1
            self.widths.add(int(C.shape[-1]))
            return apply(layer, probs, C, *args)

        monkeypatch.setattr(_LatentValues, "decode", counting_decode)
        monkeypatch.setattr(absorbed_mod, "_apply_latents", counting_apply)


def _three_ways(model, ck, plans, monkeypatch, n=64, **kw):
    """(absorbed, rebuilding, weight-replaced) generations, each (sequences, logits). Asserts that the absorbed run
    rebuilt values only in the prefill (once per layer) and at every one of the n - 1 decoding steps read each
    layer's latents, sum_g k_g numbers per token, and that the rebuilding run read no latents."""
    replaced = copy.deepcopy(model)
    apply_plans(replaced, ck, plans)
    ref = _generate(replaced, _dynamic(replaced), n=n, **kw)
    spy = Spy(monkeypatch)
    rebuilt = _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=False), n=n, **kw)
    assert spy.decoded == len(plans) * n and spy.absorbed == 0
    spy.decoded = 0
    own = model.config._attn_implementation
    with absorbed_attention(model):
        assert model.config._attn_implementation == ABSORBED
        absorbed = _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=True), n=n, **kw)
    assert model.config._attn_implementation == own
    assert spy.decoded == len(plans), "absorbed attention rebuilt values in a decoding step"
    assert spy.absorbed == len(plans) * (n - 1)
    assert spy.widths == {sum(plan.ks) for plan in plans}
    return absorbed, rebuilt, ref


def _assert_same(a, b, tol=1e-5):
    assert torch.equal(a[0], b[0])
    assert float((a[1] - b[1]).abs().max()) < tol


# ------------------------------------------------------------------------------------------ the attention function


def _layer(ks, hd, bias=True, seed=0):
    """A latent cache layer with random up-projections (hd x k_g), their pseudo-inverses as encoders, and biases."""
    g = torch.Generator().manual_seed(seed)
    up = [torch.randn(hd, k, generator=g, dtype=torch.float64) for k in ks]
    enc = [torch.linalg.pinv(u) for u in up]
    b = [torch.randn(hd, generator=g, dtype=torch.float64) for _ in ks] if bias else None
    return LatentLayer(LayerLatents(0, enc, up, b))


def _attention(G, n, hd, softcap=None):
    """A Gemma 2 attention module (G kv heads of n query heads each): its eager function, the one the prefill falls
    back on outside a model, caps logits as absorbed attention does."""
    cfg = transformers.Gemma2Config(hidden_size=12 * G * n, num_attention_heads=G * n, num_key_value_heads=G, head_dim=hd,
                                    attn_logit_softcapping=softcap, num_hidden_layers=1, vocab_size=16,
                                    intermediate_size=8, layer_types=["full_attention"])
    return transformers.models.gemma2.modeling_gemma2.Gemma2Attention(cfg, 0).eval()


@pytest.mark.parametrize("L", [5, 40], ids=["absorbed", "prefill"])
@pytest.mark.parametrize("ks", [[4, 4], [3, 9]], ids=["uniform-k", "k-per-group"])
@pytest.mark.parametrize("softcap", [None, 0.7])
def test_attention_function_equals_dense_float64_attention_on_the_rebuilt_values(ks, softcap, L, monkeypatch):
    """GQA (2 kv groups of 3 query heads), a padding mask, softcapping, value bias, k per group equal or not: the
    output equals float64 ``softmax(q K^T s + mask) (C U^T + b)`` to 1e-6 of its largest entry and the probabilities
    returned are that softmax. 5 queries (15 score rows per group, head_dim 32) read the latents; 40 (a prefill)
    rebuild the values once and run the module's eager attention."""
    torch.manual_seed(0)
    B, G, n, S, hd = 2, 2, 3, 50, 32
    layer = _layer(ks, hd)
    q, K = torch.randn(B, G * n, L, hd), torch.randn(B, G, S, hd)
    C = torch.randn(B, 1, S, sum(ks))
    mask = torch.zeros(B, 1, L, S)
    mask[0, :, :, :3] = torch.finfo(torch.float32).min  # three padded tokens in the first row
    mask[:, :, :, -2:] = torch.finfo(torch.float32).min
    spy = Spy(monkeypatch)
    out, probs = absorbed_attention_forward(_attention(G, n, hd, softcap), q, K, LatentValues.wrap(C, layer), mask,
                                            scaling=0.3, softcap=softcap)
    assert (spy.absorbed, spy.decoded) == ((1, 0) if L == 5 else (0, 1))
    parts = torch.split(C[:, 0].double(), ks, dim=-1)
    lat = layer.latents
    V = torch.stack([parts[g] @ lat.up[g].T + lat.bias[g] for g in range(G)], dim=1)  # (B, G, S, hd)
    scores = q.double() @ K.double().repeat_interleave(n, dim=1).transpose(2, 3) * 0.3
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    p = torch.softmax(scores + mask.double(), dim=-1)
    expected = (p @ V.repeat_interleave(n, dim=1)).transpose(1, 2)  # (B, L, H, hd)
    assert out.shape == (B, L, G * n, hd) and out.dtype == torch.float32
    assert float((out.double() - expected).abs().max()) < 1e-6 * float(expected.abs().max())
    assert float((probs.double() - p).abs().max()) < 1e-6


def test_dropout_in_training_equals_eager_attention_on_the_rebuilt_values():
    """In training, dropout on the probabilities (the same draws as eager's, seeded): equal to the family's eager
    attention on the rebuilt values, the bias scaled by each row's kept mass."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    torch.manual_seed(0)
    B, G, n, L, S, hd, ks = 1, 2, 2, 3, 6, 16, [4, 4]
    layer = _layer(ks, hd)
    q, K, C = torch.randn(B, G * n, L, hd), torch.randn(B, G, S, hd), torch.randn(B, 1, S, sum(ks))
    module = _attention(G, n, hd).train()
    torch.manual_seed(5)
    out, _ = absorbed_attention_forward(module, q, K, LatentValues.wrap(C, layer), None, scaling=0.5, dropout=0.4)
    V = layer.decode(C, torch.float32)
    torch.manual_seed(5)
    ref, _ = eager_attention_forward(module, q, K, V, None, scaling=0.5, dropout=0.4)
    assert float((out - ref).abs().max()) < 1e-5
    out_eval, _ = absorbed_attention_forward(module.eval(), q, K, LatentValues.wrap(C, layer), None, scaling=0.5,
                                             dropout=0.4)
    assert float((out_eval - out).abs().max()) > 1e-2  # the dropout did act in training


# ------------------------------------------------------------------------------------------ in generate()


FAMILY_CASES = [("qwen3", "gqa"), ("llama", "gqa"), ("llama", "mqa"), ("qwen2", "gqa"), ("gpt2", "mha"),
                ("gemma2", "gqa"), ("mistral_window", "gqa")]


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
@pytest.mark.parametrize("family,variant", FAMILY_CASES, ids=[f"{f}-{v}" for f, v in FAMILY_CASES])
def test_absorbed_equals_rebuilding_and_the_weight_replaced_model(family, variant, kind, built, monkeypatch):
    """Qwen3 (GQA, q/k norms), Llama (GQA and MQA), Qwen2 and GPT-2 (value bias; GPT-2's fused Conv1D, MHA), Gemma 2
    (sliding window 4, logit softcapping, eager by default) and Mistral with a 6-token window (sdpa): absorbed =
    rebuilding = the weight-replaced model with DynamicCache over 64 greedy tokens, logits to 1e-5; the absorbed run
    rebuilds values only in the prefill."""
    from headlens.residual.capture import capture_attention_inputs

    model, ck, tok = built(family, variant)
    X = None
    if kind == "data-aware":
        texts = ["The true meaning of life is absurdity and suffering, said the old man to the young woman.",
                 "Mary went to Paris and John went to London; when Mary and John met again, John gave a book."]
        X, _ = capture_attention_inputs(model, tok, ck.spec, texts, list(range(ck.shape.num_layers)), 512)
    plans = _plans(ck, ck.shape.head_dim // 4, kind, X)
    absorbed, rebuilt, ref = _three_ways(model, ck, plans, monkeypatch)
    _assert_same(absorbed, ref)
    _assert_same(rebuilt, ref)
    if family in ("gemma2", "mistral_window"):  # the window really cut the cache: 76 tokens seen, a few kept
        cache = LatentCache.from_plans(model, ck, plans)
        with absorbed_attention(model):
            _generate(model, cache, n=64)
        sliding = [layer for layer in cache.layers if isinstance(layer, SlidingLatentLayer)]
        assert sliding and all(layer.values.shape[-2] < 10 for layer in sliding)


ENCODERS = {"bert", "distilbert", "t5"}
DECODERS = [(f, "gqa" if "gqa" in variants_of(f) else variants_of(f)[0]) for f in FAMILIES if f not in ENCODERS]
SELF_ATTENDING = {"gptj", "gpt_neo", "falcon", "falcon_mq", "falcon_rw", "bloom"}  # attention computed in the module itself


@pytest.mark.parametrize("family,variant", DECODERS, ids=[f for f, _ in DECODERS])
def test_every_decoder_family_absorbs_or_is_refused(family, variant, ckpts, monkeypatch):
    """Every tiny decoder family: where attention goes through transformers' interface, absorbed = rebuilding over 16
    greedy tokens (logits to 1e-5, k = head_dim / 4, latents read at every decoding step); the others (GPT-J, GPT-Neo,
    Falcon, BLOOM) are refused by absorbed_attention, naming the class."""
    model, _ = ckpts.model(family, variant)
    model = copy.deepcopy(model).float().eval()
    assert supports_absorbed(model) == (family not in SELF_ATTENDING)
    if family in SELF_ATTENDING:
        with pytest.raises(HeadlensError, match=f"{type(model).__name__} computes attention itself"):
            with absorbed_attention(model):
                pass
        return
    ck = ModelSource(weights=ckpts.path(family, variant, "hf_dir")).checkpoint()
    plans = _plans(ck, ck.shape.head_dim // 4)
    rebuilt = _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=False), n=16)
    spy = Spy(monkeypatch)
    with absorbed_attention(model):
        absorbed = _generate(model, LatentCache.from_plans(model, ck, plans), n=16)
    _assert_same(absorbed, rebuilt)
    assert spy.absorbed == len(plans) * 15 and spy.decoded == len(plans)


def test_batch_with_left_padding_and_beams(built, monkeypatch):
    """Qwen3: a batch of two with left padding, beam search (the cache reorders latents between steps), with k
    different per kv group: absorbed = rebuilding = weight-replaced."""
    model, ck, _ = built("qwen3", "gqa")
    plans = plan_layers(ck, {0: [2, 6], 1: [4, 4]})
    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 2, 41, 8], [9, 8, 7, 6, 5, 4, 3, 2, 1]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    a, b, ref = _three_ways(model, ck, plans, monkeypatch, n=64, ids=ids, attention_mask=mask)
    _assert_same(a, ref)
    _assert_same(b, ref)
    a, b, ref = _three_ways(model, ck, plans, monkeypatch, n=12, num_beams=3)
    assert torch.equal(a[0], ref[0]) and torch.equal(b[0], ref[0])


def test_short_multi_token_steps_read_latents(built, monkeypatch):
    """A manual loop from a 3-token prompt, then 3 tokens at a time (6 score rows per group, head_dim 16: absorbed
    throughout; the prompt's causal pattern rebuilt where sdpa's mask leaves it to the kernel, the steps' from the
    mask): logits equal the weight-replaced model's, no value ever rebuilt."""
    model, ck, _ = built("qwen3", "gqa")
    plans = _plans(ck, 4)
    replaced = copy.deepcopy(model)
    apply_plans(replaced, ck, plans)
    cache, ref = LatentCache.from_plans(model, ck, plans), _dynamic(replaced)
    spy = Spy(monkeypatch)
    with absorbed_attention(model), torch.no_grad():
        for step in range(4):
            nxt = PROMPT[:, 3 * step:3 * step + 3]
            out = model(nxt, past_key_values=cache, use_cache=True)
            out_ref = replaced(nxt, past_key_values=ref, use_cache=True)
            assert float((out.logits - out_ref.logits).abs().max()) < 1e-5
    assert spy.decoded == 0 and spy.absorbed == 4 * len(plans)


def test_softcapping_is_applied(built, monkeypatch):
    """Gemma 2 with a logit softcap of 1 over large attention logits (without the cap the model's logits move by more
    than 1e-2): absorbed =
    rebuilding (the family's eager attention, which caps) = the weight-replaced model."""
    model, ck, _ = built("gemma2", "gqa")
    model = copy.deepcopy(model)
    plans = _plans(ck, 4)
    capped = [m for m in model.modules() if getattr(m, "attn_logit_softcapping", None) is not None]
    assert capped
    with torch.no_grad():
        for m in capped:
            m.attn_logit_softcapping = 1.0
            m.k_proj.weight *= 40  # logits of several units, where a cap of 1 bites (random init gives ~0.01)
    absorbed, rebuilt, ref = _three_ways(model, ck, plans, monkeypatch, n=16)
    _assert_same(absorbed, ref)
    _assert_same(rebuilt, ref)
    for m in capped:
        m.attn_logit_softcapping = None
    with absorbed_attention(model):
        uncapped = _generate(model, LatentCache.from_plans(model, ck, plans), n=16)
    assert float((uncapped[1][0] - absorbed[1][0]).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_the_model_setting_is_restored_and_plain_values_use_it(family, built):
    """Inside the block, a DynamicCache (plain values) runs the model's own implementation (sdpa for Qwen3, eager for
    Gemma 2) with its own masks: the same logits, bit for bit; leaving the block, also by an exception, restores the setting; re-entering for a
    model already inside changes nothing."""
    model, _, _ = built(family, "gqa")
    own = model.config._attn_implementation
    assert own == {"qwen3": "sdpa", "gemma2": "eager"}[family]
    ref = _generate(model, _dynamic(model), n=8)
    with absorbed_attention(model):
        with absorbed_attention(model):
            inside = _generate(model, _dynamic(model), n=8)
        assert model.config._attn_implementation == ABSORBED
    assert torch.equal(inside[0], ref[0]) and torch.equal(inside[1], ref[1])  # the same function, the same masks
    with pytest.raises(RuntimeError, match="boom"):
        with absorbed_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == own
    assert not absorbed_mod.absorbing() and not absorbed_mod._previous


def test_only_the_model_inside_the_block_absorbs_in_any_thread(built, monkeypatch):
    """A cache absorbs when the model it was built for is inside the block, also when generate runs in a thread
    started there (a streamer's pattern); a second model's cache rebuilds meanwhile (no latents reach its sdpa)."""
    import threading

    model, ck, _ = built("qwen3", "gqa")
    other = copy.deepcopy(model)
    plans = _plans(ck, 4)
    ref = _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=False), n=8)
    spy = Spy(monkeypatch)
    results = {}
    with absorbed_attention(model):
        worker = threading.Thread(target=lambda: results.update(
            own=_generate(model, LatentCache.from_plans(model, ck, plans, absorbed=True), n=8)))
        worker.start()
        worker.join()
        assert spy.absorbed == len(plans) * 7
        spy.absorbed = spy.decoded = 0
        results["other"] = _generate(other, LatentCache.from_plans(other, ck, plans), n=8)
        assert spy.absorbed == 0 and spy.decoded == len(plans) * 8  # every forward rebuilt its values
    _assert_same(results["own"], ref)
    _assert_same(results["other"], ref)


def test_refusals(built, ckpts):
    model, ck, _ = built("qwen3", "gqa")
    plans = _plans(ck, 4)
    with pytest.raises(HeadlensError, match="`absorbed` must be True, False or 'auto'"):
        LatentCache.from_plans(model, ck, plans, absorbed="yes")
    with pytest.raises(HeadlensError, match="built with `absorbed`=True, but the model is not running absorbed"):
        _generate(model, LatentCache.from_plans(model, ck, plans, absorbed=True), n=2)
    # latents that reach another attention function (the implementation switched inside the block) are refused
    with absorbed_attention(model):
        model.config._attn_implementation_internal = "sdpa"
        with pytest.raises(HeadlensError, match="only the 'headlens_latent' attention function reads latents"):
            _generate(model, LatentCache.from_plans(model, ck, plans), n=2)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(HeadlensError, match="attention sinks"):
        absorbed_attention_forward(_attention(2, 1, 8), torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 3, 8),
                                   LatentValues.wrap(torch.zeros(1, 1, 3, 8), _layer([4, 4], 8)), None,
                                   s_aux=torch.zeros(2))
    falcon, _ = ckpts.model("falcon", "gqa")
    with pytest.raises(HeadlensError, match="FalconForCausalLM computes attention itself"):
        with absorbed_attention(falcon):
            pass
    other = copy.deepcopy(model)
    other.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(HeadlensError, match="runs flex_attention attention"):
        with absorbed_attention(other):
            pass
    assert other.config._attn_implementation == "flex_attention"


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """README's absorbed-attention block, on a ``compress --save-model`` directory of tiny-lm and the original model:
    it reads latents at every decoding step, gives the same tokens as the same cache rebuilding outside the block,
    and the model's setting is back after it."""
    import re
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlens.cli import main
    from headlens.io.embedded import embedded_dir

    saved = tmp_path / "m"
    assert main(["compress", "--model", "tiny-lm", "--k", "16", "--latent", "plain", "--out-dir", str(tmp_path / "o"),
                 "--save-model", str(saved)]) == 0
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "absorbed_attention(model)" in b]
    assert len(blocks) == 1
    model = AutoModelForCausalLM.from_pretrained(embedded_dir("tiny-lm"), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(embedded_dir("tiny-lm"))("The cat sat on the", return_tensors="pt").input_ids
    scope = {"model": model, "ids": ids}
    spy = Spy(monkeypatch)
    exec(compile(blocks[0].replace('"compressed-dir"', repr(str(saved))), "README.md (absorbed)", "exec"), scope)
    assert model.config._attn_implementation == "sdpa"
    # 6 layers, every forward absorbed: the short prompt too (4 query heads a group x 7 tokens <= head_dim / 2)
    assert spy.absorbed == 6 * (scope["out"].shape[1] - ids.shape[1]) and spy.decoded == 0
    ref = model.generate(ids, past_key_values=LatentCache.from_pretrained(saved, model), max_new_tokens=256)
    assert torch.equal(scope["out"], ref) and scope["out"].shape[1] > ids.shape[1] + 16
