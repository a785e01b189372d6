"""headlens.compress.measure on a toy stack where every token attends only to itself: there the isolated
attention-output error (iii, ``LayerErrors.isolated_error``) equals the value-path error (ii,
``LayerErrors.value_path_error``).

Why, and why only for one query head and one kv head (H = G = 1): with attention the identity, what the output
projection writes for a token is ``o = sum_h W_O^h v_{g(h)} + b_o``, so the isolated error's numerator is
``||sum_h W_O^h (v - v')_{g(h)}||^2``, while the value-path error uses the stacked operator,
``sum_g ||M_g (v - v')_g||^2 = sum_h ||W_O^h (v - v')_{g(h)}||^2``. The two differ by the cross-head terms
``2 <W_O^h e_{g(h)}, W_O^h' e_{g(h')}>`` (h != h'), which vanish for every error e only when there is a single head.
With H = G = 1 the numerators are the same number, and so are the denominators (``||o - c||`` with
``c = W_O b_v + b_o`` against ``||W_O W_V x||``). The controls show the test can fail: with the model's own causal
attention, and with two heads (H = 2 over G = 1 or G = 2) under the same self-only mask, the two errors differ.

The model is a tiny Llama built here (hidden 32, head_dim 16, 2 layers, float64, seeded), saved with the shared
tiny BPE tokenizer so that :class:`headlens.io.source.ModelSource` opens it; the self-only attention is real
attention (scores, a mask that is -inf off the diagonal, softmax) registered through transformers'
``AttentionInterface``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import MAX_POS, TOKENIZER_VOCAB, build_tokenizer
from transformers import AttentionInterface

from headlens.compress.measure import measure
from headlens.compress.plan import plan_layers
from headlens.io.source import ModelSource

SELF_ONLY = "headlens_test_self_only"
HIDDEN, HEAD_DIM, LAYERS = 32, 16, 2
KS = {0: 5, 1: 9}  # k < head_dim: the latents lose something
CALIB = ["The cat sat on the mat. The quick brown fox jumps over the lazy dog.",
         "What is the capital of France? The capital of France is Paris.",
         "Time passes and people change, but the river keeps running to the sea.",
         "We read books, we write letters, we eat bread and drink water, we work and we sleep and we dream."]
TEXTS = ["The old man looked at the river and did not answer for a long time.",
         "Mary went to Paris and John went to London.",
         "One, two, three, four, five, six, seven, eight, nine, ten."]
SEEN: list[torch.Tensor] = []  # the attention probabilities of every self-only call since the last clear


def self_only_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention in which each token attends only to itself: eager attention (GQA repeat, scaled scores, softmax,
    (batch, seq, heads, head_dim) output) with the mask replaced by 0 on the diagonal and -inf elsewhere."""
    n_rep = module.num_key_value_groups
    key = key.repeat_interleave(n_rep, dim=1)  # (b, G, s, hd) -> (b, H, s, hd), as transformers' repeat_kv
    value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (b, H, s_q, s_k)
    s_q, s_k = scores.shape[-2:]
    diagonal = torch.eye(s_q, s_k, dtype=torch.bool, device=scores.device)
    mask = torch.zeros(s_q, s_k, dtype=scores.dtype, device=scores.device).masked_fill(~diagonal, float("-inf"))
    probs = torch.softmax(scores + mask, dim=-1)
    SEEN.append(probs.detach().clone())
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (b, s, H, hd)
    return out, probs


AttentionInterface.register(SELF_ONLY, self_only_attention)


def _build(tmp_path, heads: int, kv_heads: int, bias: bool, seed: int = 0):
    """(model in float64 with self-only attention, its Checkpoint, the tokenizer), saved under ``tmp_path``."""
    tok = build_tokenizer("none")
    cfg = transformers.LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=HIDDEN, intermediate_size=48,
                                   num_hidden_layers=LAYERS, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, attention_bias=bias,
                                   tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    assert sum(p.numel() for p in model.parameters()) < 100_000
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # HF starts biases at zero: random ones exercise c = W_O b_v + b_o
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "norm" in name:  # and norm gains at one
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    out = tmp_path / f"llama-h{heads}-g{kv_heads}-b{int(bias)}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ck = ModelSource(weights=str(out)).checkpoint()
    model.set_attn_implementation(SELF_ONLY)
    assert model.config._attn_implementation == SELF_ONLY
    return model, ck, tok


def _eager(model):
    causal = copy.deepcopy(model)
    causal.set_attn_implementation("eager")
    assert causal.config._attn_implementation == "eager"
    return causal


def _ids(tok, text):
    return tok(text, return_tensors="pt")["input_ids"]


def _calibration(model, tok) -> dict[int, torch.Tensor]:
    """Layer -> the inputs of its v_proj on the calibration texts, X (d, N) float64."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda _m, args, _out, i=i: seen[i].append(args[0][0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for text in CALIB:
                model(input_ids=_ids(tok, text))
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(xs).T.contiguous() for i, xs in seen.items()}


def _plans(ck, ks, kind, calibration) -> dict:
    return {p.layer: p for p in plan_layers(ck, ks, kind, calibration, load_dtype=torch.float64)}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The H = G = 1 model (with random attention biases), its checkpoint, tokenizer and calibration tokens."""
    model, ck, tok = _build(tmp_path_factory.mktemp("self_mask"), heads=1, kv_heads=1, bias=True)
    return model, ck, tok, _calibration(model, tok)


def test_attention_is_the_identity(single):
    """The registered attention is in use, its probabilities are the identity, and what o_proj writes for each
    token is o_proj(v_proj(x)) of that token alone."""
    model, _, tok, _ = single
    ids = _ids(tok, TEXTS[0])
    n = ids.shape[1]
    attn = model.model.layers[0].self_attn
    got = {}
    hooks = [attn.v_proj.register_forward_hook(lambda _m, args, out: got.update(x=args[0], v=out)),
             attn.o_proj.register_forward_hook(lambda _m, _a, out: got.update(o=out))]
    SEEN.clear()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(SEEN) == LAYERS
    for probs in SEEN:
        assert probs.shape == (1, 1, n, n)
        assert torch.equal(probs[0, 0], torch.eye(n, dtype=probs.dtype))
    with torch.no_grad():
        want = attn.o_proj(attn.v_proj(got["x"]))
    torch.testing.assert_close(got["o"], want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
def test_isolated_equals_value_path(single, kind):
    model, ck, tok, calib = single
    r = measure(model, ck, tok, _plans(ck, KS, kind, calib), TEXTS, disable=True)
    assert [e.layer for e in r.layers] == [0, 1]
    for e in r.layers:
        assert e.kind == kind and e.ks == [KS[e.layer]]
        assert e.value_path_error > 1e-3  # k < head_dim: there is an error to compare
        assert e.isolated_error == pytest.approx(e.value_path_error, rel=1e-9)
    # layer 0 is the first layer: with every planned layer compressed its inputs are still the original ones
    assert r.layers[0].accumulated_error == pytest.approx(r.layers[0].isolated_error, rel=1e-9)


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
def test_layer0_alone_accumulated_equals_isolated(single, kind):
    model, ck, tok, calib = single
    r = measure(model, ck, tok, _plans(ck, {0: KS[0]}, kind, calib), TEXTS, disable=True)
    (e,) = r.layers
    assert e.value_path_error > 1e-3
    assert e.isolated_error == pytest.approx(e.value_path_error, rel=1e-9)
    assert e.accumulated_error == pytest.approx(e.isolated_error, rel=1e-9)


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
def test_causal_attention_breaks_the_equality(single, kind):
    """Control: the same weights with the model's own causal attention mix tokens, and the two errors part."""
    model, ck, tok, calib = single
    causal = _eager(model)
    r = measure(causal, ck, tok, _plans(ck, KS, kind, calib), TEXTS, disable=True)
    e = r.layers[0]
    assert abs(e.isolated_error - e.value_path_error) > 1e-6, (e.isolated_error, e.value_path_error)


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (2, 2)])
def test_several_heads_break_the_equality(tmp_path, heads, kv_heads):
    """Control: self-only attention with two query heads. The value-path error sums ||W_O^h e_{g(h)}||^2 over the
    heads, the isolated error takes ||sum_h W_O^h e_{g(h)}||^2 of what o_proj writes: the cross-head terms
    2 <W_O^1 e_{g(1)}, W_O^2 e_{g(2)}> (random W_O^1, W_O^2 are not orthogonal to each other) make them differ.
    (For G = 1 the two heads even read the same error e; for G = 2 each its own.)"""
    model, ck, tok = _build(tmp_path, heads=heads, kv_heads=kv_heads, bias=False)
    calib = _calibration(model, tok)
    SEEN.clear()
    r = measure(model, ck, tok, _plans(ck, KS, "plain", calib), TEXTS, disable=True)
    assert SEEN and all(torch.equal(p[0, h], torch.eye(p.shape[-1], dtype=p.dtype))
                        for p in SEEN for h in range(heads))  # still self-only, in every head
    for e in r.layers:
        assert e.value_path_error > 1e-3
        assert abs(e.isolated_error - e.value_path_error) > 1e-6, (e.layer, e.isolated_error, e.value_path_error)
