"""Run a prompt through the unmodified HuggingFace model and capture one layer's attention.

Hooks sit on the model's own modules (reached by their real paths), so captured values match
HuggingFace by construction:

- the attention input of a layer is the first input of its attention module (the output of the
  pre-attention norm in pre-norm families, the previous layer's output in post-norm BERT);
- attention probabilities come from the eager attention path: SDPA/flash kernels return none, so the
  requested layer's attention module runs with ``attn_implementation="eager"`` for the pass (on an SDPA model
  only that module, fed the mask the model built in its eager form; see :func:`probs_route`) and is switched
  back afterwards. HuggingFace's eager path applies each family's own masking, sliding windows and logit
  soft-capping.
"""

from __future__ import annotations

import copy
import inspect
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError
from headlens.io.placement import input_device
from headlens.residual.modules import (count_layers, final_norm, find_layer, find_module, first_tensor,
                                       hidden_states_input)
from headlens.residual.sites import SITES, SiteHook, attention_input_hook, site_hook

if TYPE_CHECKING:
    from headlens.residual.plan import SitePlan


@dataclass
class PromptCapture:
    """What one forward pass recorded at one layer."""

    input_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    attn_input: torch.Tensor  # (N, d): the attention module's input for every prompt token
    attn_probs: torch.Tensor | None  # (H, N, N) attention probabilities, query x key


@contextmanager
def eager_attention(model, modules=None) -> Iterator[list]:
    """Run the block with eager attention (which returns probabilities) in ``modules``, by default every module of
    ``model``; put the original implementation back afterwards, also when the block raises.

    Each module whose ``config`` names another attention implementation gets, for the block, a shallow copy of that
    config with ``_attn_implementation="eager"`` (modules that shared a config share its copy). The configs
    themselves are never modified, so restoring is putting the originals back. HuggingFace's attention modules read
    ``self.config._attn_implementation`` at forward time, and the model builds its masks from its own config, so
    the whole model (``modules=None``) runs as if loaded with ``attn_implementation="eager"``, also a family whose
    ``set_attn_implementation`` refuses to switch (Falcon). Yields the modules that were switched."""
    modules = list(model.modules()) if modules is None else list(modules)
    copies: dict[int, object] = {}
    switched: list[tuple[torch.nn.Module, object]] = []
    try:
        for mod in modules:
            cfg = mod.__dict__.get("config")
            if not hasattr(cfg, "_attn_implementation_internal") or cfg._attn_implementation in (None, "eager"):
                continue
            if id(cfg) not in copies:
                eager = copy.copy(cfg)
                eager._attn_implementation_internal = "eager"  # not the setter: it would reach the shared sub-configs
                copies[id(cfg)] = eager
            switched.append((mod, cfg))
            mod.config = copies[id(cfg)]
        yield [mod for mod, _ in switched]
    finally:
        for mod, cfg in reversed(switched):
            mod.config = cfg


# How capture_layer gets one layer's attention probabilities (the eager path computes them; SDPA and flash kernels
# return none):
#   "layer": only that layer's attention module runs eagerly, the mask the model built for SDPA handed over in
#            eager's form; no other layer computes probabilities and nothing collects them (extra memory: one
#            layer's H x N x N);
#   "model": the whole model runs eagerly, each layer's probabilities freed after the layer (no output_attentions,
#            so the extra memory is still one layer's H x N x N): a model that is not on SDPA (eager already, a
#            flash or flex kernel whose masks have no eager form), or Falcon with ALiBi, whose eager and SDPA paths
#            are different models in transformers (the eager one adds ALiBi twice), so one eager layer among SDPA
#            layers would show probabilities that neither model computes;
#   "collect": the last resort, when the attention module returns no probabilities on those routes: the whole
#            model eagerly with ``output_attentions=True`` (transformers keeps every layer's H x N x N), said on
#            stderr.
PROBS_ROUTES = ("layer", "model", "collect")


def probs_route(model, spec: ArchSpec, layer: int) -> tuple[str, str]:
    """(route, why) by which :func:`capture_layer` takes layer ``layer``'s probabilities (see PROBS_ROUTES); the
    "collect" fallback is decided during the pass, when a route returns none."""
    attn = find_module(model, spec, layer, attention_input_hook(spec).module)
    cfg = attn.__dict__.get("config")
    impl = getattr(cfg if cfg is not None else model.config, "_attn_implementation", None)
    if impl == "eager":
        return "model", "the model already runs eager attention"
    if impl != "sdpa":
        return "model", f"{impl} attention's masks have no eager form: the whole model runs eagerly"
    if getattr(cfg, "model_type", None) == "falcon" and getattr(cfg, "alibi", False):
        return "model", "Falcon with ALiBi: transformers' eager path adds ALiBi twice, its SDPA path once"
    if not hasattr(cfg, "_attn_implementation_internal") or _mask_parameter(attn) is None:
        return "model", f"{type(attn).__name__} has no config or attention mask to switch on its own"
    return "layer", f"only layer {layer}'s {type(attn).__name__} runs eagerly"


def _mask_parameter(module: torch.nn.Module) -> tuple[str, int | None] | None:
    """(name, positional index without self) of the attention module's mask parameter, or None."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name in ("attention_mask", "mask"):
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            return p.name, i if positional else None
    return None


def _eager_mask_hook(module: torch.nn.Module):
    """A forward pre-hook that hands ``module`` the mask a model running eager attention would have built, from the
    one it built for SDPA: boolean (True = attend) becomes HuggingFace's additive 0 / finfo.min mask in the
    hidden states' dtype, None (SDPA's ``is_causal``, wherever the causal pattern is all there is) the causal mask,
    as ``masking_utils.eager_mask`` writes them; an additive mask is already eager's."""
    found = _mask_parameter(module)
    assert found is not None
    name, index = found

    def pre(_m, args, kwargs):
        positional = name not in kwargs and index is not None and index < len(args)
        mask = args[index] if positional else kwargs.get(name)
        x = hidden_states_input(args, kwargs)
        low = torch.finfo(x.dtype).min
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            mask = torch.where(mask, torch.zeros((), dtype=x.dtype, device=mask.device), low)
        elif mask is None:
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", True) if causal is None else causal
            n = x.shape[-2]
            if not (causal and n > 1):  # SDPA: is_causal only for a decoder's prompt of two tokens or more
                return None
            allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # SDPA's is_causal: upper left
            mask = torch.where(allowed, torch.zeros((), dtype=x.dtype, device=x.device), low)[None, None]
        else:
            return None
        if positional:
            args = (*args[:index], mask, *args[index + 1:])
        else:
            kwargs = {**kwargs, name: mask}
        return args, kwargs

    return pre


def capture_layer(model, tokenizer, spec: ArchSpec, layer: int, prompt: str, want_probs: bool,
                  truncate: bool = False) -> PromptCapture:
    """One forward pass of ``prompt``; record ``layer``'s attention input and (optionally) probabilities.

    The probabilities are HuggingFace's eager attention probabilities of that layer (the ones
    ``output_attentions=True`` returns under ``attn_implementation="eager"``), taken on the route
    :func:`probs_route` names: on an SDPA model only that layer runs eagerly, so the pass holds one layer's
    H x N x N beyond the plain forward, not every layer's. The model's attention implementation is the same
    afterwards (every module's config), also when the forward raises."""
    hook = attention_input_hook(spec)
    attn = find_module(model, spec, layer, hook.module)
    if not prompt.strip():
        raise HeadlensError("`prompt` is empty")
    ids, tokens = prompt_ids(tokenizer, prompt, max_positions(model), truncate=truncate, vocab_size=vocab_size(model))
    seen: dict[str, torch.Tensor] = {}

    def keep_input(x: torch.Tensor) -> None:
        seen["input"] = x.detach()[0].to("cpu")  # (N, d)

    def post_hook(_module, _args, _kwargs, output):
        at = spec.probs_at  # where the module's output tuple holds them (T5: after its position bias)
        if isinstance(output, tuple) and len(output) > at and isinstance(output[at], torch.Tensor):
            seen["probs"] = output[at].detach()[0].to("cpu")  # (H, N, N)

    def run(route: str) -> None:
        handles = [register(attn, hook, keep_input)]
        if route == "layer":
            handles.append(attn.register_forward_pre_hook(_eager_mask_hook(attn), with_kwargs=True))
        if want_probs:
            handles.append(attn.register_forward_hook(post_hook, with_kwargs=True))
        extra = {"output_attentions": True} if route == "collect" else {}
        ctx = nullcontext() if route == "none" else eager_attention(model, list(attn.modules()) if route == "layer"
                                                                    else None)
        try:
            with ctx, torch.no_grad():
                model(input_ids=ids.to(input_device(model)), **extra)
        finally:
            for h in handles:
                h.remove()

    route, _why = probs_route(model, spec, layer) if want_probs else ("none", "")
    run(route)
    if want_probs and "probs" not in seen and "input" in seen:
        print(f"attention probabilities: layer {layer}'s {type(attn).__name__} returned none on the {route!r} "
              f"route; rerunning the whole model eagerly with output_attentions=True, which keeps every layer's "
              f"H x N x N", file=sys.stderr)
        seen.clear()
        run("collect")
    if "input" not in seen:
        raise HeadlensError(f"layer {layer}'s attention module was not called during the forward pass")
    probs = seen.get("probs")
    if want_probs and probs is None:
        raise HeadlensError(f"the attention module of layer {layer} returned no attention probabilities")
    return PromptCapture(input_ids=[int(t) for t in ids[0]], tokens=tokens, attn_input=seen["input"],
                         attn_probs=probs)


def capture_attention_inputs(model, tokenizer, spec: ArchSpec, texts: list[str], layers: list[int],
                             max_tokens: int, limit: int | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """Every selected layer's attention input over ``texts`` (one forward each, at most ``max_tokens`` tokens in
    all, each text cut at ``limit`` positions). Returns ({layer: (d, N) float64}, N)."""
    from tqdm.auto import tqdm

    hook = attention_input_hook(spec)
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def saver(layer: int):
        def save(x: torch.Tensor) -> None:
            store[layer].append(x.detach()[0].to("cpu", torch.float32))
        return save

    handles = [register(find_module(model, spec, layer, hook.module), hook, saver(layer)) for layer in layers]
    vocab = vocab_size(model)
    device = input_device(model)
    n = 0
    try:
        with torch.no_grad():
            for text in tqdm(texts, desc="calibration", unit="text", file=sys.stderr, disable=None):
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : (limit or None)]
                ids = ids[:, : max_tokens - n]
                if ids.shape[1] == 0:
                    break
                if vocab and int(ids.max()) >= vocab:
                    raise HeadlensError(f"the tokenizer gives token id {int(ids.max())}, but the model's vocabulary "
                                        f"has {vocab} entries: the tokenizer belongs to another model")
                model(input_ids=ids.to(device))
                n += ids.shape[1]
                if n >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(v).double().T if v else torch.zeros(0, 0, dtype=torch.float64)
            for layer, v in store.items()}, n


# ------------------------------------------------------------------------------------ residual sites


@dataclass
class SiteRecording:
    """What :func:`record_sites` captured: ``values[site][layer]`` is a CPU tensor (B, N, d).

    The ``final`` site (the final norm's output) is stored under layer ``-1``. ``missing`` says, for each
    requested site the family does not have, why (e.g. no resid_mid in a parallel-residual layer).
    """

    values: dict[str, dict[int, torch.Tensor]]
    missing: dict[str, str]
    hooks: dict[str, str]  # site -> "forward pre-hook on <module path>" / "forward hook on ..." / "by difference"
    plan: "SitePlan | None" = None  # where each site came from (the trace, or the spec table)


def _store(dtype: torch.dtype | None):
    def keep(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        out = t.to("cpu", dtype=dtype or t.dtype)
        return out.clone() if out.data_ptr() == t.data_ptr() else out  # never alias a live buffer

    return keep


def register(module: torch.nn.Module, hook: SiteHook, fn: Callable[[torch.Tensor], None]):
    """Register ``hook`` on ``module``; ``fn`` receives the captured hidden states. Returns the handle."""
    if hook.hook == "forward_pre":
        def pre(_m, args, kwargs):
            fn(hidden_states_input(args, kwargs))

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m, _args, _kwargs, output):
        fn(first_tensor(output))

    return module.register_forward_hook(post, with_kwargs=True)


@contextmanager
def record_sites(
    model: torch.nn.Module,
    spec: ArchSpec,
    sites: tuple[str, ...] | list[str] = ("resid_pre",),
    layers: list[int] | None = None,
    store_dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Iterator[SiteRecording]:
    """Record named residual-stream sites of ``layers`` (all by default) during forwards inside the block.

    The sites come from the model's :class:`~headlens.residual.plan.SitePlan` (the hook-site table checked against
    a traced forward of one layer): ``resid_pre`` is a forward pre-hook on the layer (its ``hidden_states`` input,
    equal to ``output_hidden_states[l]``), ``resid_post`` a forward hook on the layer, ``resid_mid`` a hook on the
    module that carries the stream between the two joins, ``attn_out`` / ``mlp_out`` forward hooks on the modules
    whose outputs are added to the stream, or the difference of the stream around their join where no module
    outputs what is added (Granite); ``final`` is the final norm's output. Only requested sites are kept, moved to
    CPU as they arrive (``store_dtype``, e.g. float16, to halve memory).

    With ``verify`` the first forward checks the residual identities of every layer
    (:mod:`headlens.residual.verify`) and raises HeadlensError, naming the family and the site, when they fail.
    All hooks are removed on exit, also when the forward raises.
    """
    from headlens.residual.plan import site_plan
    from headlens.residual.verify import SiteStream

    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise HeadlensError(f"unknown site {unknown[0]!r}: choose from {', '.join(SITES)}")
    n_layers = count_layers(model, spec)
    layers = list(range(n_layers)) if layers is None else list(layers)
    plan = site_plan(model, spec)
    rec = SiteRecording(values={s: {} for s in sites}, missing={}, hooks={}, plan=plan)
    for site in (s for s in sites if s != "final"):
        if site in plan.missing:
            rec.missing[site] = plan.missing[site]
        else:
            rec.hooks[site] = plan.describe(site, spec)
    stream = SiteStream(plan, rec.values, _store(store_dtype), layers, list(range(n_layers)) if verify else [],
                        lambda site: plan.describe(site, spec))
    handles: list = []
    try:
        for layer in sorted(set(layers) | stream.pending):
            _path, mod = find_layer(model, spec, layer)
            for site, hook in plan.hooks.items():
                handles.append(register(mod.get_submodule(hook.module) if hook.module else mod, hook,
                                        stream.saver(layer, site)))
            handles.append(mod.register_forward_hook(stream.layer_done(layer, mod)))  # after the site hooks
        if "final" in sites:
            _record_final(model, spec, rec, handles, _store(store_dtype))
        yield rec
    finally:
        for h in handles:
            h.remove()


def _record_final(model, spec: ArchSpec, rec: SiteRecording, handles: list, keep) -> None:
    """Hook the final norm's output into ``rec.values["final"][-1]`` (or say why there is none)."""
    hook = site_hook(spec, "final")
    fin = final_norm(model, spec) if not isinstance(hook, str) else None
    if isinstance(hook, str) or fin is None:
        rec.missing["final"] = hook if isinstance(hook, str) else f"{spec.family} has no final norm after the last layer"
        return

    def save(x: torch.Tensor) -> None:
        rec.values["final"][-1] = keep(x)

    handles.append(register(fin[1], hook, save))
    rec.hooks["final"] = hook.describe(spec, fin[0])


def prompt_ids(tokenizer, prompt: str, max_positions: int | None, truncate: bool = False,
               vocab_size: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Token ids (1, N) and each token decoded on its own (the notebook's ``labels``).

    One-line errors: an empty prompt, a prompt that tokenizes to no tokens (e.g. a tokenizer without a
    vocabulary), one longer than ``max_positions`` (unless ``truncate``), and ids the model's embedding of
    ``vocab_size`` rows cannot look up (a tokenizer from another model)."""
    if not prompt.strip():
        raise HeadlensError("the prompt is empty")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.ndim != 2 or ids.shape[1] == 0:
        try:
            size = f" (vocabulary of {len(tokenizer)})"
        except TypeError:
            size = ""
        raise HeadlensError(f"`prompt` tokenizes to no tokens with {type(tokenizer).__name__}{size}: the model "
                            "directory lacks its tokenizer files (tokenizer.json, tokenizer_config.json, ...) or has "
                            "another model's")
    if max_positions and ids.shape[1] > max_positions:
        if not truncate:
            raise HeadlensError(f"the prompt has {ids.shape[1]} tokens but the model takes at most {max_positions}: "
                                f"shorten it or pass `truncate`")
        ids = ids[:, :max_positions]
    top = int(ids.max())
    if vocab_size and (top >= vocab_size or int(ids.min()) < 0):
        raise HeadlensError(f"the tokenizer gives token id {top}, but the model's vocabulary has {vocab_size} "
                            "entries: the tokenizer next to the weights belongs to another model")
    return ids, [tokenizer.decode([int(t)]) for t in ids[0]]


def vocab_size(config) -> int | None:
    """Rows of the model's input embedding (a model), or its config's ``vocab_size`` (a config object or dict)."""
    get_emb = getattr(config, "get_input_embeddings", None)
    if callable(get_emb):
        emb = get_emb()
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    config = getattr(config, "config", config)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None and get("vocab_size") is None:
        return vocab_size(text)
    value = get("vocab_size")
    return value if isinstance(value, int) and value > 0 else None


def max_positions(config) -> int | None:
    """Longest input the model takes (a model, a config object or a config dict)."""
    config = getattr(config, "config", config)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None and get("max_position_embeddings") is None:
        return max_positions(text)
    return get("max_position_embeddings") or get("n_positions")
