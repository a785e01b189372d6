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


def load_hf_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, tokenizer) from a HuggingFace directory; the base model, default attention implementation."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (directory / "config.json").exists():
        raise HeadlensError(f"{directory} has no config.json: a prompt needs a HuggingFace model directory")
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise HeadlensError(f"cannot load a tokenizer from {directory} ({_first_line(exc)}): a prompt needs "
                            "the tokenizer files next to the weights") from None
    try:
        model = AutoModel.from_pretrained(str(directory), dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise HeadlensError(f"cannot build the model from {directory} ({_first_line(exc)})") from None
    model.eval()
    return model, tokenizer


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


def tokenize(tokenizer, prompt: str, max_positions: int | None) -> tuple[torch.Tensor, list[str]]:
    if not prompt.strip():
        raise HeadlensError("--prompt is empty")
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if max_positions and ids.shape[1] > max_positions:
        raise HeadlensError(f"the prompt has {ids.shape[1]} tokens but the model takes at most {max_positions}")
    tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
    return ids, tokens


def capture_layer(model, tokenizer, spec: ArchSpec, layer: int, prompt: str, want_probs: bool) -> PromptCapture:
    """One forward pass of ``prompt``; record ``layer``'s attention input and (optionally) probabilities."""
    attn = find_module(model, spec, layer, spec.attn_module)
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    ids, tokens = tokenize(tokenizer, prompt, max_pos)
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
