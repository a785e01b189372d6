"""Mixture-of-experts routers: capture, statistics, dispatch structure, and dumps that reload.

The MoE families transformers ships (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3) route through a
module ``mlp.gate`` that returns ``(router_logits, top-k weights, top-k indices)`` after applying the family's
own scoring rule. headlens hooks that module on the unmodified model and keeps, per MoE layer and token,
the logits, the selected experts and their weights; dense layers (``mlp_only_layers``,
``decoder_sparse_step``, ``first_k_dense_replace``) have no router and are listed as skipped.

Scoring rules (DOMAIN.md), recorded in the dump and used for the routing distribution:
- ``softmax_topk``: softmax over experts, top-k, then renormalised over the k when ``norm_topk_prob``
  (Qwen3-MoE, Qwen2-MoE, OLMoE as configured; Mixtral always);
- ``softmax_group_limited_topk``: softmax, then top-k inside the best expert groups, times
  ``routed_scaling_factor`` (DeepSeek-V2 with ``topk_method="group_limited_greedy"``);
- ``sigmoid_grouped_topk``: sigmoid scores plus a correction bias choose groups then experts; weights are
  the sigmoid scores of the chosen experts, optionally renormalised, times ``routed_scaling_factor``
  (DeepSeek-V3). Its "routing distribution" is the sigmoid scores normalised to sum 1.
Router outputs whose rows already sum to 1 are taken as probabilities and not soft-maxed again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from headlens.errors import HeadlensError


@dataclass
class RouterLayer:
    """What one MoE layer routed: T tokens, E experts, top-k."""

    layer: int
    logits: torch.Tensor  # (T, E) router logits (float32)
    indices: torch.Tensor  # (T, k) selected experts
    weights: torch.Tensor  # (T, k) routing weights of the selected experts
    seq: torch.Tensor  # (T,) which input sequence each token came from (for consecutive-token statistics)


def scoring_rule(model: torch.nn.Module) -> str:
    """The family's scoring rule, read off its router modules (what they hold decides how they route)."""
    routers = list(find_routers(model).values())
    if any(hasattr(r, "e_score_correction_bias") for r in routers):
        return "sigmoid_grouped_topk"  # DeepSeek-V3: sigmoid + correction bias, groups then experts
    if any(getattr(r, "topk_method", None) == "group_limited_greedy" for r in routers):
        return "softmax_group_limited_topk"  # DeepSeek-V2: softmax, best groups, then experts
    return "softmax_topk"


def routing_distribution(logits: torch.Tensor, rule: str) -> tuple[torch.Tensor, str]:
    """Per-token distribution over experts (T, E) and what it is."""
    x = logits.double()
    if bool(torch.allclose(x.sum(-1), torch.ones(x.shape[0], dtype=x.dtype), atol=1e-4)) and bool((x >= 0).all()):
        return x, "router outputs (already probabilities)"
    if rule == "sigmoid_grouped_topk":
        s = torch.sigmoid(x)
        return s / s.sum(-1, keepdim=True), "sigmoid scores normalised to sum 1"
    return torch.softmax(x, -1), "softmax of the router logits"


def find_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer index: router module} for every layer whose ``mlp.gate`` is a top-k expert router."""
    routers: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-2:] == ["mlp", "gate"] and parts[-3].isdigit():
            if "router" in type(module).__name__.lower():
                routers[int(parts[-3])] = module
    return dict(sorted(routers.items()))


def capture_routing(model, tokenizer, texts: list[str], batch_size: int = 8, max_positions: int | None = None,
                    progress=None) -> tuple[list[RouterLayer], int, list[list[int]]]:
    """Run ``texts`` through ``model`` in padded batches; return every MoE layer's routing of the real tokens.

    Padding tokens are dropped with the attention mask. Returns (layers, number of tokens, token ids per text).
    """
    routers = find_routers(model)
    if not routers:
        raise HeadlensError(f"no MoE layers in {type(model).__name__}: it has no top-k expert router")
    store: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {l: [] for l in routers}

    def hook_for(layer):
        def hook(_m, _args, output):
            logits, weights, indices = output
            store[layer].append((logits.detach().float().cpu(), weights.detach().float().cpu(),
                                 indices.detach().cpu()))
        return hook

    handles = [m.register_forward_hook(hook_for(l)) for l, m in routers.items()]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    masks, seq_ids, all_ids = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = texts[start:start + batch_size]
                enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=bool(max_positions),
                                max_length=max_positions)
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                m = enc["attention_mask"].bool()
                masks.append(m.flatten())
                seq_ids.append((torch.arange(len(batch)) + start)[:, None].expand_as(m).flatten())
                all_ids.extend(enc["input_ids"][i][m[i]].tolist() for i in range(len(batch)))
                if progress:
                    progress(len(batch))
    finally:
        for h in handles:
            h.remove()
    mask = torch.cat(masks)
    seq = torch.cat(seq_ids)[mask]
    out = []
    for layer, parts in store.items():
        logits = torch.cat([p[0] for p in parts])[mask]
        weights = torch.cat([p[1] for p in parts])[mask]
        indices = torch.cat([p[2] for p in parts])[mask]
        out.append(RouterLayer(layer=layer, logits=logits, indices=indices, weights=weights, seq=seq))
    return out, int(mask.sum()), all_ids


# ------------------------------------------------------------------------------------------ statistics


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


@dataclass
class LayerStats:
    layer: int
    tokens: int
    experts: int
    top_k: int
    load_share: list[float]  # fraction of the T*k assignments per expert (uniform = 1/E)
    load_cv: float  # coefficient of variation of the expert counts
    load_max_over_mean: float
    dead_experts: list[int]
    load_entropy_norm: float  # H(load share) / log E
    routing_entropy_norm: float  # mean over tokens of H(routing distribution) / log E
    routing_entropy_kind: str
    repeat_consecutive: float  # mean |S_t ∩ S_{t+1}| / k over consecutive tokens of the same text
    coactivation: list[list[float]]  # P(j | i) over all top-k pairs of a token (diagonal 0)


def layer_stats(r: RouterLayer, num_experts: int, rule: str) -> LayerStats:
    T, k = r.indices.shape
    E = num_experts
    counts = torch.bincount(r.indices.flatten(), minlength=E).double()  # (E,)
    share = counts / counts.sum()
    mean = counts.mean()
    sel = torch.zeros(T, E, dtype=torch.float64)
    sel.scatter_(1, r.indices, 1.0)  # (T, E) token x expert selection
    co = sel.T @ sel  # (E, E): tokens choosing both i and j
    co.fill_diagonal_(0)
    cond = torch.where(counts[:, None] > 0, co / counts[:, None].clamp_min(1), torch.zeros_like(co))
    dist, kind = routing_distribution(r.logits, rule)
    same = r.seq[1:] == r.seq[:-1]
    overlap = (sel[1:] * sel[:-1]).sum(-1) / k
    return LayerStats(
        layer=r.layer, tokens=T, experts=E, top_k=k, load_share=share.tolist(),
        load_cv=float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
        load_max_over_mean=float(counts.max() / mean) if mean > 0 else 0.0,
        dead_experts=torch.nonzero(counts == 0).flatten().tolist(),
        load_entropy_norm=float(_entropy(share) / math.log(E)),
        routing_entropy_norm=float(_entropy(dist).mean() / math.log(E)),
        routing_entropy_kind=kind,
        repeat_consecutive=float(overlap[same].mean()) if bool(same.any()) else float("nan"),
        coactivation=cond.tolist(),
    )


def transitions(a: RouterLayer, b: RouterLayer, num_experts: int) -> torch.Tensor:
    """(E, E) counts of (top-1 expert at layer a, top-1 expert at layer b) over the same tokens."""
    ta = a.indices[torch.arange(len(a.indices)), a.weights.argmax(-1)]
    tb = b.indices[torch.arange(len(b.indices)), b.weights.argmax(-1)]
    m = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    m.index_put_((ta, tb), torch.ones_like(ta), accumulate=True)
    return m


def dispatch_csr(r: RouterLayer, num_experts: int) -> dict[str, torch.Tensor]:
    """The token x expert dispatch matrix as CSR: row t holds token t's experts (sorted) and weights."""
    order = torch.argsort(r.indices, dim=1)
    cols = torch.gather(r.indices, 1, order)
    vals = torch.gather(r.weights, 1, order)
    T, k = cols.shape
    return {"indptr": torch.arange(0, T * k + 1, k, dtype=torch.int64), "indices": cols.flatten().to(torch.int64),
            "data": vals.flatten().float(), "shape": torch.tensor([T, num_experts], dtype=torch.int64)}


def csr_to_dense(csr: dict[str, torch.Tensor]) -> torch.Tensor:
    T, E = (int(x) for x in csr["shape"])
    dense = torch.zeros(T, E, dtype=torch.float32)
    for t in range(T):
        a, b = int(csr["indptr"][t]), int(csr["indptr"][t + 1])
        dense[t, csr["indices"][a:b]] = csr["data"][a:b]
    return dense


# ---------------------------------------------------------------------------------------------- dumps


@dataclass
class RouterReport:
    model: dict
    rule: str
    experts: int
    top_k: int
    moe_layers: list[int]
    dense_layers: list[int]
    tokens: int
    prompt_sha256: str
    stats: list[LayerStats]
    transitions: dict[str, list[list[int]]] = field(default_factory=dict)  # "a->b": (E, E) counts

    def to_json(self) -> dict:
        return asdict(self)


def prompt_hash(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def write_dump(path: Path, report: RouterReport, layers: list[RouterLayer]) -> tuple[Path, Path]:
    """``<path>.safetensors`` (per-layer logits, indices, weights, CSR dispatch, transitions) + ``<path>.json``."""
    from safetensors.torch import save_file

    from headlens.io.files import atomic_path, write_json

    tensors: dict[str, torch.Tensor] = {}
    for r in layers:
        p = f"layer{r.layer}."
        tensors[p + "logits"] = r.logits.float().contiguous()
        tensors[p + "indices"] = r.indices.to(torch.int64).contiguous()
        tensors[p + "weights"] = r.weights.float().contiguous()
        tensors[p + "seq"] = r.seq.to(torch.int64).clone()
        for key, v in dispatch_csr(r, report.experts).items():
            tensors[p + "dispatch." + key] = v.clone()
    for key, m in report.transitions.items():
        tensors["transitions." + key.replace("->", "_to_")] = torch.tensor(m, dtype=torch.int64)
    st = Path(str(path) + ".safetensors")
    js = Path(str(path) + ".json")
    with atomic_path(st) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "headlens-router-dump", "rule": report.rule})
    write_json(js, report.to_json())
    return st, js


def load_dump(path: str | Path) -> tuple[RouterReport, list[RouterLayer], dict[str, torch.Tensor]]:
    """Reload a dump written by :func:`write_dump` (``path`` with or without its suffix)."""
    from headlens.io.files import read_json_and_tensors

    meta, tensors = read_json_and_tensors(path, "router dump")
    stats = [LayerStats(**s) for s in meta.pop("stats")]
    report = RouterReport(stats=stats, **meta)
    layers = [RouterLayer(layer=l, logits=tensors[f"layer{l}.logits"], indices=tensors[f"layer{l}.indices"],
                          weights=tensors[f"layer{l}.weights"], seq=tensors[f"layer{l}.seq"])
              for l in report.moe_layers]
    dispatch = {k: v for k, v in tensors.items() if ".dispatch." in k}
    return report, layers, dispatch
