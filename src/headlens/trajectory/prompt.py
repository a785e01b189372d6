"""The prompt-dependent numbers of one checkpoint: the first token's pull and the routers' specialisation.

:func:`prompt_numbers` runs the checkpoint's own HuggingFace model on the texts, one forward each, and returns:

- per (layer, head): ``first_token_share``, the attention probability that query positions 1..N-1 put on key
  position 0, averaged over those queries and the texts (the attention-sink share; position 0 itself is left out,
  as a causal query there can only attend to itself). The probabilities are HuggingFace's eager attention
  probabilities (``output_attentions=True`` with the model switched to eager attention for the pass).
- per layer: ``resid_norm_first`` (the L2 norm of position 0's residual stream at the layer's input, ``resid_pre``,
  mean over texts) and ``resid_norm_rest`` (the mean norm of the other positions), recorded at the hook sites the
  residual plan verifies on the first forward (:func:`headlens.residual.capture.record_sites`).
- per MoE layer (MoE checkpoints): the router statistics of ``headlens router``
  (:func:`headlens.moe.statistics.layer_stats`): ``router_entropy`` (mean per-token routing entropy / log E),
  ``router_load_entropy`` (entropy of the expert load / log E), ``router_load_max_over_mean`` and
  ``router_dead_experts``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from headlens.errors import HeadlensError

if TYPE_CHECKING:
    from headlens.io.source import ModelSource

FORMAT = 1  # what a prompt part holds; parts of another format are computed again


def prompt_numbers(source: "ModelSource", texts: list[str], dtype_name: str, max_tokens: int,
                   truncate: bool = False) -> dict[str, Any]:
    """``{"heads": [{layer, head, first_token_share}], "layers": [{layer, resid_norm_first, resid_norm_rest,
    router_* (MoE layers)}], "tokens": N, "texts": T}`` (see the module docstring). Texts longer than the model's
    positions are refused, or cut with ``truncate``; at most ``max_tokens`` tokens are run in all."""
    from headlens.circuits.sweep import model_for_texts
    from headlens.residual.capture import eager_attention, input_device, record_sites

    ck = source.checkpoint(full=True, roles=("norm",))
    tok, model, limit = model_for_texts(source, ck, texts, source.dtype(dtype_name), max_tokens, truncate,
                                        "the prompt-dependent part")
    device = input_device(model)
    share_sum: torch.Tensor | None = None  # (L, H)
    queries = 0
    first_sum: torch.Tensor | None = None  # (L,)
    rest_sum: torch.Tensor | None = None
    rest_n = 0
    used = n_texts = 0
    with eager_attention(model), record_sites(model, ck.spec, ("resid_pre",)) as rec, torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"][:, : (limit or None)][:, : max_tokens - used]
            if ids.shape[1] < 2:
                break
            out = model(input_ids=ids.to(device), output_attentions=True)
            probs = torch.stack([a[0].to("cpu", torch.float64) for a in out.attentions])  # (L, H, N, N)
            share = probs[:, :, 1:, 0].sum(-1)  # (L, H): key 0's probability summed over queries 1..N-1
            resid = rec.values["resid_pre"]
            layers = sorted(resid)
            norms = torch.stack([resid[layer][0].to(torch.float64).norm(dim=-1) for layer in layers])  # (L, N)
            resid.clear()  # one text's stream at a time
            share_sum = share if share_sum is None else share_sum + share
            first_sum = norms[:, 0] if first_sum is None else first_sum + norms[:, 0]
            rest = norms[:, 1:].sum(-1)
            rest_sum = rest if rest_sum is None else rest_sum + rest
            queries += ids.shape[1] - 1
            rest_n += ids.shape[1] - 1
            used += ids.shape[1]
            n_texts += 1
            if used >= max_tokens:
                break
    if share_sum is None or first_sum is None or rest_sum is None:
        raise HeadlensError("the calibration texts give fewer than 2 tokens: the first token's attention share needs "
                            "at least one query after it")
    L, H = share_sum.shape
    heads = [{"layer": layer, "head": h, "first_token_share": float(share_sum[layer, h] / queries)}
             for layer in range(L) for h in range(H)]
    layer_rows = [{"layer": layer, "resid_norm_first": float(first_sum[layer] / n_texts),
                   "resid_norm_rest": float(rest_sum[layer] / rest_n)} for layer in range(L)]
    router = _router_numbers(model, tok, texts[:n_texts], ck.config or {}, limit)
    for row in layer_rows:
        row.update(router.get(row["layer"], {}))
    return {"heads": heads, "layers": layer_rows, "tokens": used, "texts": n_texts, "format": FORMAT}


def _router_numbers(model, tok, texts: list[str], config: dict, limit: int | None) -> dict[int, dict[str, Any]]:
    """{MoE layer: router statistics} (empty for a dense checkpoint)."""
    from headlens.moe.capture import capture_routing, is_moe_config, scoring_rule
    from headlens.moe.statistics import layer_stats

    if not is_moe_config(config.get("text_config") or config):
        return {}
    layers, _n, _ids = capture_routing(model, tok, texts, max_positions=limit)
    rule = scoring_rule(model)
    out = {}
    for r in layers:
        s = layer_stats(r, int(r.logits.shape[1]), rule)
        out[r.layer] = {"router_entropy": s.routing_entropy_norm, "router_load_entropy": s.load_entropy_norm,
                        "router_load_max_over_mean": s.load_max_over_mean,
                        "router_dead_experts": len(s.dead_experts)}
    return out
