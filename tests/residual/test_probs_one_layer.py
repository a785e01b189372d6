"""Attention probabilities with one layer's extra memory (issue 13).

``capture_layer(..., want_probs=True)`` used to switch the whole model to eager attention and pass
``output_attentions=True``, so transformers kept every layer's H x N x N. Now, on an SDPA model, only the requested
layer's attention module runs eagerly (a shallow copy of its config, the model's SDPA mask handed over in eager's
form) and nothing collects attentions. Checked here on every tiny family:

- (a) the probabilities are HuggingFace's own: those of the same checkpoint loaded with
  ``attn_implementation="eager"`` and run with ``output_attentions=True``, in the same dtype; bit for bit at layer 0
  (same inputs), within float32 rounding above it (the layers below ran SDPA, not eager); causal decoders put no
  probability on later tokens (Falcon's used to: its ``set_attn_implementation`` refuses, and
  ``output_attentions=True`` took its eager code with SDPA's boolean mask);
- (b) only the requested layer's attention module returns probabilities, and the model is called without
  ``output_attentions``; the whole-model "collect" route is taken only when a module returns none, and says so;
- (c) the model's attention implementation (its config and every module's) and its hooks are what they were,
  also when the forward raises.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import FAMILIES, MODEL_TYPES, PROMPT, variants_of

from headlens.arch import SPECS
from headlens.io.source import load_hf_model
from headlens.residual.capture import capture_layer, probs_route
from headlens.residual.modules import count_layers, find_module
from headlens.residual.sites import attention_input_hook

transformers.logging.set_verbosity_error()

# One variant per family: the one with the most structure (GQA, else MQA, else MHA).
WIDEST = [(f, next(v for v in ("gqa", "mqa", "mha") if v in variants_of(f))) for f in FAMILIES]
IDS = [f"{f}-{v}" for f, v in WIDEST]
# Families that load on SDPA and take the one-layer route (Llama-like, a post-norm encoder, a fused-qkv decoder).
ONE_LAYER = ["qwen3", "llama", "gemma3", "bert", "gpt2", "falcon", "t5"]
# Families that take the whole-model eager route: eager-only models, and Falcon with ALiBi.
WHOLE_MODEL = {"gemma2": "already runs eager", "gptj": "already runs eager", "bloom": "already runs eager",
               "gpt_neo": "already runs eager", "falcon_rw": "ALiBi"}


def _variant(family: str) -> str:
    return dict(WIDEST)[family]


def _load(ckpts, family: str, dtype=torch.float32):
    """(model as headlens loads it, its eager twin loaded by HF, tokenizer, spec)."""
    path = ckpts.path(family, _variant(family), "hf_dir")
    model, tok = load_hf_model(path, dtype)
    eager = type(model).from_pretrained(str(path), attn_implementation="eager", dtype=dtype).eval()
    assert eager.config._attn_implementation == "eager"
    return model, eager, tok, SPECS[MODEL_TYPES[family]]


def _ids(tok) -> torch.Tensor:
    return tok(PROMPT, return_tensors="pt")["input_ids"]


def _attn_modules(model, spec) -> list[torch.nn.Module]:
    rel = attention_input_hook(spec).module
    return [find_module(model, spec, layer, rel) for layer in range(count_layers(model, spec))]


def _configs(model) -> dict[str, tuple[int, str | None]]:
    """Every module's config (identity and attention implementation)."""
    return {name: (id(cfg), cfg._attn_implementation) for name, m in model.named_modules()
            if hasattr(cfg := m.__dict__.get("config"), "_attn_implementation_internal")}


def _count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------ (a) the probabilities are HF's


@pytest.mark.parametrize("family,variant", WIDEST, ids=IDS)
def test_probabilities_are_hf_eager_output_attentions(ckpts, family, variant):
    model, eager, tok, spec = _load(ckpts, family)
    ids = _ids(tok)
    with torch.no_grad():
        want = eager(input_ids=ids, output_attentions=True).attentions
    n = ids.shape[1]
    for layer in range(count_layers(model, spec)):
        got = capture_layer(model, tok, spec, layer, PROMPT, want_probs=True).attn_probs
        ref = want[layer][0]
        assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape == (4, n, n)
        if layer == 0:  # the same inputs: the same eager computation, bit for bit
            assert torch.equal(got, ref), (family, float((got - ref).abs().max()))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        if spec.decoder:
            assert torch.count_nonzero(torch.triu(got, diagonal=1)) == 0  # nothing on later tokens
        torch.testing.assert_close(got.sum(-1), torch.ones(4, n), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "bert", "falcon", "falcon_rw", "t5"])
def test_probabilities_keep_the_models_dtype_bit_for_bit(ckpts, family):
    """bfloat16: the mask handed to the one eager layer is eager's own (0 and bfloat16's finfo.min)."""
    model, eager, tok, spec = _load(ckpts, family, torch.bfloat16)
    with torch.no_grad():
        ref = eager(input_ids=_ids(tok), output_attentions=True).attentions[0][0]
    got = capture_layer(model, tok, spec, 0, PROMPT, want_probs=True).attn_probs
    assert got.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(got, ref)


# ----------------------------------------------------- (b) one layer's probabilities, nothing collected


def _watch(model, spec):
    """Hooks recording which attention modules returned a probability tensor, and the model's call kwargs."""
    returned: list[int] = []
    calls: list[dict] = []

    def watch(layer):
        def hook(_m, _args, output):
            at = spec.probs_at
            if isinstance(output, tuple) and len(output) > at and isinstance(output[at], torch.Tensor):
                returned.append(layer)
        return hook

    handles = [m.register_forward_hook(watch(layer)) for layer, m in enumerate(_attn_modules(model, spec))]
    handles.append(model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(dict(kw)), with_kwargs=True))
    return returned, calls, handles


@pytest.mark.parametrize("family", ONE_LAYER)
def test_only_the_requested_layer_computes_probabilities(ckpts, family):
    model, _, tok, spec = _load(ckpts, family)
    assert model.config._attn_implementation == "sdpa"
    for layer in range(count_layers(model, spec)):
        assert probs_route(model, spec, layer)[0] == "layer"
        returned, calls, handles = _watch(model, spec)
        try:
            cap = capture_layer(model, tok, spec, layer, PROMPT, want_probs=True)
        finally:
            for h in handles:
                h.remove()
        assert cap.attn_probs is not None
        assert returned == [layer]  # the old whole-model eager pass gave [0, 1]
        assert len(calls) == 1 and not calls[0].get("output_attentions")


@pytest.mark.parametrize("family", sorted(WHOLE_MODEL))
def test_the_whole_model_route_collects_nothing(ckpts, family):
    """Eager-only models and Falcon with ALiBi run every layer eagerly, but without output_attentions: each
    layer's probabilities are freed after it, so the extra memory is still one layer's."""
    model, _, tok, spec = _load(ckpts, family)
    route, why = probs_route(model, spec, 1)
    assert route == "model" and WHOLE_MODEL[family] in why
    _, calls, handles = _watch(model, spec)
    try:
        capture_layer(model, tok, spec, 1, PROMPT, want_probs=True)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 1 and not calls[0].get("output_attentions")


def test_a_module_that_returns_no_probabilities_falls_back_and_says_so(ckpts, capsys):
    """The "collect" route (output_attentions=True over the whole eager model) only when the cheap route yields
    nothing: here a hook drops the probabilities unless the model was asked for attentions."""
    model, eager, tok, spec = _load(ckpts, "qwen3")
    attn = _attn_modules(model, spec)[1]
    asked: list[bool] = []
    handles = [model.register_forward_pre_hook(lambda _m, _a, kw: asked.append(bool(kw.get("output_attentions"))),
                                               with_kwargs=True),
               attn.register_forward_hook(lambda _m, _a, out: out if asked[-1] else (out[0], None))]
    try:
        got = capture_layer(model, tok, spec, 1, PROMPT, want_probs=True).attn_probs
    finally:
        for h in handles:
            h.remove()
    assert asked == [False, True]
    assert "rerunning the whole model eagerly with output_attentions=True" in capsys.readouterr().err
    with torch.no_grad():
        ref = eager(input_ids=_ids(tok), output_attentions=True).attentions[1][0]
    assert torch.equal(got, ref)  # every layer eager: bit for bit
    assert model.config._attn_implementation == "sdpa"


def test_no_probabilities_asked_runs_the_model_as_it_is(ckpts):
    model, _, tok, spec = _load(ckpts, "llama")
    returned, calls, handles = _watch(model, spec)
    try:
        cap = capture_layer(model, tok, spec, 1, PROMPT, want_probs=False)
    finally:
        for h in handles:
            h.remove()
    assert cap.attn_probs is None and returned == [] and len(calls) == 1


# ------------------------------------------------------------------------ (c) restored afterwards


@pytest.mark.parametrize("family", ["qwen3", "bert", "falcon", "falcon_rw", "gemma2"])
def test_attention_implementation_and_hooks_are_restored(ckpts, family):
    model, _, tok, spec = _load(ckpts, family)
    ids = _ids(tok)
    with torch.no_grad():
        before_out = model(input_ids=ids)  # HF installs its own output-recording hooks lazily
    configs, hooks = _configs(model), _count_hooks(model)
    top = model.config._attn_implementation
    capture_layer(model, tok, spec, 1, PROMPT, want_probs=True)
    assert _configs(model) == configs and _count_hooks(model) == hooks
    assert model.config._attn_implementation == top
    with torch.no_grad():
        after_out = model(input_ids=ids)
    assert torch.equal(before_out[0], after_out[0])  # still the SDPA (or eager) model it was


@pytest.mark.parametrize("family", ["qwen3", "falcon_rw"])
def test_restored_when_the_forward_raises(ckpts, family):
    """A forward that raises inside the eager pass (here in the requested layer's attention) leaves the model as
    it was: the configs swapped back, no hook of capture_layer's left behind."""
    model, _, tok, spec = _load(ckpts, family)
    with torch.no_grad():
        model(input_ids=_ids(tok))
    configs, hooks = _configs(model), _count_hooks(model)
    attn = _attn_modules(model, spec)[1]

    def boom(m, _args, _out):
        assert m.config._attn_implementation == "eager"  # raised while switched
        raise RuntimeError("boom")

    handle = attn.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_layer(model, tok, spec, 1, PROMPT, want_probs=True)
    finally:
        handle.remove()
    assert _configs(model) == configs and _count_hooks(model) == hooks
    assert attn.config is model.config
