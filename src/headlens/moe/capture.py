"""Capture what each MoE layer's router chose, hooked on the unmodified HuggingFace model.

The MoE families transformers ships (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3) route through a
module ``mlp.gate`` (Llama 4: ``feed_forward.router``) that returns ``(router_logits, top-k weights, top-k indices)`` after applying the family's
own scoring rule. headlens hooks that module and keeps, per MoE layer and real (unpadded) token, the logits,
the selected experts and their weights; dense layers (``mlp_only_layers``, ``decoder_sparse_step``,
``first_k_dense_replace``) have no router and are listed as skipped.

Scoring rules (DOMAIN.md), recorded in the dump and used for the routing distribution:
- ``softmax_topk``: softmax over experts, top-k, then renormalised over the k when ``norm_topk_prob``
  (Qwen3-MoE, Qwen2-MoE, OLMoE as configured; Mixtral always);
- ``softmax_group_limited_topk``: softmax, then top-k inside the best expert groups, times
  ``routed_scaling_factor`` (DeepSeek-V2 with ``topk_method="group_limited_greedy"``);
- ``sigmoid_grouped_topk``: sigmoid scores plus a correction bias choose groups then experts; weights are
  the sigmoid scores of the chosen experts, optionally renormalised, times ``routed_scaling_factor``
  (DeepSeek-V3);
- ``sigmoid_topk``: top-k of the logits, each chosen expert weighted by the sigmoid of its logit, not
  renormalised, beside a shared expert (Llama 4, whose router is ``feed_forward.router``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from headlens.errors import HeadlensError

# Config keys whose non-zero value says "this checkpoint routes tokens to experts" (a family fact: Qwen-MoE and
# OLMoE say num_experts, Mixtral num_local_experts, DeepSeek n_routed_experts).
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def is_moe_config(config: dict) -> bool:
    """Whether a (text) config dict names experts under one of :data:`MOE_CONFIG_KEYS`."""
    return any(config.get(k) for k in MOE_CONFIG_KEYS)


@dataclass
class RouterLayer:
    """What one MoE layer routed: T tokens, E experts, top-k."""

    layer: int  # decoder layer index
    logits: torch.Tensor  # (T, E) router logits (float32)
    indices: torch.Tensor  # (T, k) selected experts
    weights: torch.Tensor  # (T, k) routing weights of the selected experts
    seq: torch.Tensor  # (T,) which input text each token came from (for consecutive-token statistics)


# Where each family keeps its router and what the router returns (family facts as data): the module path suffix
# inside a layer, and how to read (logits, top-k weights, top-k indices) off its output.
def _gate_output(_module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, weights, indices = output  # Qwen-MoE, Mixtral, OLMoE, DeepSeek: the gate applies its own rule
    return logits, weights, indices


def _llama4_output(module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, logits = output  # Llama 4: top-k of the logits; sigmoid of the chosen logits, the rest 0 (T, E)
    indices = torch.topk(logits, module.top_k, dim=-1).indices  # (T, k), the experts the router kept
    return logits, scores.gather(-1, indices), indices


ROUTER_SITES = {("mlp", "gate"): _gate_output, ("feed_forward", "router"): _llama4_output}


def router_sites(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, Callable]]:
    """{layer index: (router module, its output reader)} for every layer with a top-k expert router at one of
    :data:`ROUTER_SITES`."""
    found: dict[int, tuple[torch.nn.Module, Callable]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 3 and tuple(parts[-2:]) in ROUTER_SITES and parts[-3].isdigit():
            if "router" in type(module).__name__.lower():
                found[int(parts[-3])] = (module, ROUTER_SITES[tuple(parts[-2:])])
    return dict(sorted(found.items()))


def find_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer index: router module} for every MoE layer."""
    return {layer: module for layer, (module, _) in router_sites(model).items()}


def scoring_rule(model: torch.nn.Module) -> str:
    """The family's scoring rule, read off its router modules (what they hold decides how they route)."""
    sites = list(router_sites(model).values())
    routers = [m for m, _ in sites]
    if any(hasattr(r, "e_score_correction_bias") for r in routers):
        return "sigmoid_grouped_topk"  # DeepSeek-V3: sigmoid + correction bias, groups then experts
    if any(getattr(r, "topk_method", None) == "group_limited_greedy" for r in routers):
        return "softmax_group_limited_topk"  # DeepSeek-V2: softmax, best groups, then experts
    if any(reader is _llama4_output for _, reader in sites):
        return "sigmoid_topk"  # Llama 4: top-k of the logits, each weighted by its sigmoid (not renormalised)
    return "softmax_topk"


# Per router call: (logits (B*S, E), top-k weights (B*S, k), top-k indices (B*S, k)), on the CPU.
_Store = dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def _hook_for(store: _Store, layer: int, reader: Callable):
    def hook(module, _args, output):
        logits, weights, indices = reader(module, output)
        store[layer].append((logits.detach().float().cpu(), weights.detach().float().cpu(), indices.detach().cpu()))
    return hook


def _prepare_padding(tokenizer) -> None:
    """Right padding with some pad token, so the attention mask marks the real tokens at the start."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"


def _run_batches(model, tokenizer, texts: list[str], batch_size: int, max_positions: int | None,
                 progress: Callable[[int], object] | None) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Forward ``texts`` in padded batches. Returns (mask (P,) of the real tokens over all P padded positions of
    all batches, the text index of every position (P,), the real token ids of each text)."""
    from headlens.io.placement import input_device

    masks, seq_ids, all_ids = [], [], []
    device = input_device(model)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=bool(max_positions),
                            max_length=max_positions)
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
            m = enc["attention_mask"].bool()  # (B, S)
            masks.append(m.flatten())  # (B*S,), row-major like the routers' flattened tokens
            seq_ids.append((torch.arange(len(batch)) + start)[:, None].expand_as(m).flatten())
            all_ids.extend(enc["input_ids"][i][m[i]].tolist() for i in range(len(batch)))
            if progress:
                progress(len(batch))
    return torch.cat(masks), torch.cat(seq_ids), all_ids


def _gather(store: _Store, mask: torch.Tensor, seq: torch.Tensor) -> list[RouterLayer]:
    """Each layer's router calls concatenated, padding positions dropped (``mask`` and ``seq``: (P,))."""
    real_seq = seq[mask]  # (T,)
    out = []
    for layer, parts in store.items():
        logits = torch.cat([p[0] for p in parts])  # (P, E) over all padded positions P
        weights = torch.cat([p[1] for p in parts])  # (P, k)
        indices = torch.cat([p[2] for p in parts])  # (P, k)
        assert logits.shape[0] == weights.shape[0] == indices.shape[0] == mask.shape[0], (layer, logits.shape,
                                                                                          mask.shape)
        assert weights.shape == indices.shape, (weights.shape, indices.shape)
        out.append(RouterLayer(layer=layer, logits=logits[mask], indices=indices[mask], weights=weights[mask],
                               seq=real_seq))
    return out


def capture_routing(model, tokenizer, texts: list[str], batch_size: int = 8, max_positions: int | None = None,
                    progress: Callable[[int], object] | None = None) -> tuple[list[RouterLayer], int, list[list[int]]]:
    """Run ``texts`` through ``model`` in padded batches; return every MoE layer's routing of the real tokens.

    Padding tokens are dropped with the attention mask. Returns (one :class:`RouterLayer` per MoE layer, in
    layer order, each with T rows; T, the number of real tokens; the token ids of each text). ``progress`` is
    called with the number of texts after each batch.
    """
    routers = router_sites(model)
    if not routers:
        raise HeadlensError(f"no MoE layers in {type(model).__name__}: it has no top-k expert router")
    store: _Store = {layer: [] for layer in routers}
    handles = [m.register_forward_hook(_hook_for(store, layer, reader)) for layer, (m, reader) in routers.items()]
    _prepare_padding(tokenizer)
    try:
        mask, seq, all_ids = _run_batches(model, tokenizer, texts, batch_size, max_positions, progress)
    finally:
        for h in handles:
            h.remove()
    return _gather(store, mask, seq), int(mask.sum()), all_ids
