"""Run a prompt through the unmodified HuggingFace model and capture one layer's attention.

Hooks sit on the model's own modules (reached by their real paths), so captured values match
HuggingFace by construction:

- the attention input of a layer is the first input of its attention module (the output of the
  pre-attention norm in pre-norm families, the previous layer's output in post-norm BERT);
- attention probabilities come from the eager attention path: SDPA/flash kernels return none, so the
  forward runs with ``attn_implementation="eager"`` and is switched back afterwards. HuggingFace's eager
  path applies each family's own masking, sliding windows and logit soft-capping.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError


@dataclass
class PromptCapture:
    """What one forward pass recorded at one layer."""

    input_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    attn_input: torch.Tensor  # (N, d): the attention module's input for every prompt token
    attn_probs: torch.Tensor | None  # (H, N, N) attention probabilities, query x key


def load_tokenizer(directory: Path, trust_remote_code: bool = False):
    """The tokenizer saved next to a HuggingFace model."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not (directory / "config.json").exists():
        raise HeadlensError(f"{directory} has no config.json: a prompt needs a HuggingFace model directory")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise HeadlensError(f"cannot load a tokenizer from {directory} ({_first_line(exc)}): a prompt needs "
                            "the tokenizer files next to the weights") from None


def load_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The base model of a HuggingFace directory, default attention implementation, in eval mode."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(str(directory), dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise HeadlensError(f"cannot build the model from {directory} ({_first_line(exc)})") from None
    return model.eval()


def load_hf_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, tokenizer) from a HuggingFace directory; the base model, default attention implementation."""
    tokenizer = load_tokenizer(directory, trust_remote_code)
    return load_model(directory, dtype, trust_remote_code), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_module(model: torch.nn.Module, spec: ArchSpec, layer: int, rel: str) -> torch.nn.Module:
    """The module ``<...><layers_path>.<layer>.<rel>`` of ``model`` (any prefix)."""
    suffix = f"{spec.layers_path}.{layer}.{rel}"
    found = [(name, module) for name, module in model.named_modules()
             if name == suffix or name.endswith("." + suffix)]
    if found:
        # Multimodal models also hold a vision tower with the same layer names: take the language model's.
        lm = [m for n, m in found if "language_model" in n or "text_model" in n]
        return lm[0] if lm else found[0][1]
    raise HeadlensError(f"module '{suffix}' not found in the loaded {type(model).__name__}")


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run the block with eager attention (which returns probabilities), then restore the original."""
    original = getattr(model.config, "_attn_implementation", None)
    switched = original not in (None, "eager")
    if switched:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(original)


def capture_layer(model, tokenizer, spec: ArchSpec, layer: int, prompt: str, want_probs: bool,
                  truncate: bool = False) -> PromptCapture:
    """One forward pass of ``prompt``; record ``layer``'s attention input and (optionally) probabilities."""
    attn = find_module(model, spec, layer, spec.attn_module)
    if not prompt.strip():
        raise HeadlensError("--prompt is empty")
    ids, tokens = prompt_ids(tokenizer, prompt, max_positions(model), truncate=truncate)
    seen: dict[str, torch.Tensor] = {}

    def pre_hook(_module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen["input"] = x.detach()[0].to("cpu")  # (N, d)

    def post_hook(_module, _args, _kwargs, output):
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
            seen["probs"] = output[1].detach()[0].to("cpu")  # (H, N, N)

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if want_probs:
        handles.append(attn.register_forward_hook(post_hook, with_kwargs=True))
    try:
        ctx = eager_attention(model) if want_probs else nullcontext()
        with ctx, torch.no_grad():
            model(input_ids=ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
    if "input" not in seen:
        raise HeadlensError(f"layer {layer}'s attention module was not called during the forward pass")
    probs = seen.get("probs")
    if want_probs and probs is None:
        raise HeadlensError(f"the attention module of layer {layer} returned no attention probabilities")
    return PromptCapture(input_ids=[int(t) for t in ids[0]], tokens=tokens, attn_input=seen["input"],
                         attn_probs=probs)


# ------------------------------------------------------------------------------------ residual sites

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "final")


@dataclass
class SiteRecording:
    """What :func:`record_sites` captured: ``values[site][layer]`` is a CPU tensor (B, N, d).

    The ``final`` site (the final norm's output) is stored under layer ``-1``. ``missing`` says, for each
    requested site the family does not have, why (e.g. no resid_mid in a parallel-residual layer).
    """

    values: dict[str, dict[int, torch.Tensor]]
    missing: dict[str, str]
    hooks: dict[str, str]  # site -> "forward pre-hook on <module path>" / "forward hook on ..."


def find_layer(model: torch.nn.Module, spec: ArchSpec, layer: int) -> tuple[str, torch.nn.Module]:
    """(path, module) of decoder/encoder layer ``layer`` (language model first in multimodal models)."""
    suffix = f"{spec.layers_path}.{layer}"
    found = [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not found:
        raise HeadlensError(f"layer module '{suffix}' not found in the loaded {type(model).__name__}")
    lm = [(n, m) for n, m in found if "language_model" in n or "text_model" in n]
    return (lm or found)[0]


def _final_norm(model: torch.nn.Module, spec: ArchSpec) -> tuple[str, torch.nn.Module] | None:
    if not spec.final_norm:
        return None
    layer_list = f"{spec.layers_path}."
    found = [(n, m) for n, m in model.named_modules()
             if (n == spec.final_norm or n.endswith("." + spec.final_norm)) and layer_list not in n]
    lm = [(n, m) for n, m in found if "language_model" in n or "text_model" in n]
    return (lm or found or [None])[0]


def _first_tensor(obj) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    if hasattr(obj, "last_hidden_state"):
        return obj.last_hidden_state
    raise HeadlensError(f"cannot find a tensor in a module output of type {type(obj).__name__}")


def _store(dtype: torch.dtype | None):
    def keep(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        out = t.to("cpu", dtype=dtype or t.dtype)
        return out.clone() if out.data_ptr() == t.data_ptr() else out  # never alias a live buffer

    return keep


@contextmanager
def record_sites(
    model: torch.nn.Module,
    spec: ArchSpec,
    sites: tuple[str, ...] | list[str] = ("resid_pre",),
    layers: list[int] | None = None,
    store_dtype: torch.dtype | None = None,
) -> Iterator[SiteRecording]:
    """Record named residual-stream sites of ``layers`` (all by default) during forwards inside the block.

    Hooks sit on the unmodified HuggingFace modules: ``resid_pre`` is a forward pre-hook on the layer (its
    ``hidden_states`` input, equal to ``output_hidden_states[l]``), ``resid_post`` a forward hook on the layer,
    ``resid_mid`` a pre-hook on the module that reads the stream after the attention block, ``attn_out`` /
    ``mlp_out`` forward hooks on what each branch adds to the stream, ``final`` the final norm's output.
    Only requested sites are kept, moved to CPU as they arrive (``store_dtype``, e.g. float16, to halve
    memory). All hooks are removed on exit, also when the forward raises.
    """
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise HeadlensError(f"unknown site {unknown[0]!r}: choose from {', '.join(SITES)}")
    layers = list(range(_count_layers(model, spec))) if layers is None else list(layers)
    keep = _store(store_dtype)
    rec = SiteRecording(values={s: {} for s in sites}, missing={}, hooks={})
    handles: list = []
    parallel = bool(spec.parallel_flag and getattr(model.config, spec.parallel_flag, False))

    def pre_input(site: str, layer: int):
        def hook(_m, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            rec.values[site][layer] = keep(x)
        return hook

    def post_output(site: str, layer: int):
        def hook(_m, _args, _kwargs, output):
            rec.values[site][layer] = keep(_first_tensor(output))
        return hook

    try:
        for layer in layers:
            path, mod = find_layer(model, spec, layer)
            for site in sites:
                if site == "resid_pre":
                    handles.append(mod.register_forward_pre_hook(pre_input(site, layer), with_kwargs=True))
                    rec.hooks[site] = f"forward pre-hook on {spec.layers_path}.<l> (its hidden_states input)"
                elif site == "resid_post":
                    handles.append(mod.register_forward_hook(post_output(site, layer), with_kwargs=True))
                    rec.hooks[site] = f"forward hook on {spec.layers_path}.<l> (its output)"
                elif site == "resid_mid":
                    if parallel or not spec.mid_input:
                        rec.missing[site] = (f"{spec.family} layers add attention and MLP to the same stream "
                                             "in parallel: there is no resid_mid")
                        continue
                    sub = mod.get_submodule(spec.mid_input)
                    handles.append(sub.register_forward_pre_hook(pre_input(site, layer), with_kwargs=True))
                    rec.hooks[site] = f"forward pre-hook on {spec.layers_path}.<l>.{spec.mid_input} (its input)"
                elif site in ("attn_out", "mlp_out"):
                    rel = spec.attn_out if site == "attn_out" else spec.mlp_out
                    sub = mod.get_submodule(rel)
                    handles.append(sub.register_forward_hook(post_output(site, layer), with_kwargs=True))
                    rec.hooks[site] = f"forward hook on {spec.layers_path}.<l>.{rel} (output)"
        if "final" in sites:
            fin = _final_norm(model, spec)
            if fin is None:
                rec.missing["final"] = f"{spec.family} has no final norm after the last layer"
            else:
                handles.append(fin[1].register_forward_hook(post_output("final", -1), with_kwargs=True))
                rec.hooks["final"] = f"forward hook on {fin[0]} (output)"
        yield rec
    finally:
        for h in handles:
            h.remove()


def _count_layers(model: torch.nn.Module, spec: ArchSpec) -> int:
    path, _ = find_layer(model, spec, 0)
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    return len(parent)


def prompt_ids(tokenizer, prompt: str, max_positions: int | None, truncate: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Token ids (1, N) and each token decoded on its own (the notebook's ``labels``)."""
    if not prompt.strip():
        raise HeadlensError("the prompt is empty")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if max_positions and ids.shape[1] > max_positions:
        if not truncate:
            raise HeadlensError(f"the prompt has {ids.shape[1]} tokens but the model takes at most {max_positions}: "
                                f"shorten it or pass --truncate")
        ids = ids[:, :max_positions]
    return ids, [tokenizer.decode([int(t)]) for t in ids[0]]


def max_positions(config) -> int | None:
    """Longest input the model takes (a model, a config object or a config dict)."""
    config = getattr(config, "config", config)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None and get("max_position_embeddings") is None:
        return max_positions(text)
    return get("max_position_embeddings") or get("n_positions")
