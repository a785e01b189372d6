"""Per-layer routing statistics, layer-to-layer transitions and the token x expert dispatch structure.

Definitions (DOMAIN.md): load share per expert (uniform is ``1/E``), its coefficient of variation and max/mean,
dead experts, load entropy ``H(f)/log E``, mean per-token routing entropy (labelled with the distribution it
is the entropy of), co-activation ``P(j | i)`` over all top-k pairs of a token, the overlap of consecutive
tokens' expert sets, and the dispatch matrix as CSR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from headlens.moe.capture import RouterLayer


def routing_distribution(logits: torch.Tensor, rule: str) -> tuple[torch.Tensor, str]:
    """Per-token distribution over experts (T, E), float64, and what it is.

    Router outputs whose rows already sum to 1 are taken as probabilities and not soft-maxed again; under
    ``sigmoid_grouped_topk`` it is the sigmoid scores normalised to sum 1, otherwise the softmax of the logits.
    """
    assert logits.dim() == 2, logits.shape  # (T, E)
    x = logits.double()
    if bool(torch.allclose(x.sum(-1), torch.ones(x.shape[0], dtype=x.dtype), atol=1e-4)) and bool((x >= 0).all()):
        return x, "router outputs (already probabilities)"
    if rule in ("sigmoid_grouped_topk", "sigmoid_topk"):
        s = torch.sigmoid(x)
        return s / s.sum(-1, keepdim=True), "sigmoid scores normalised to sum 1"
    return torch.softmax(x, -1), "softmax of the router logits"


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension (0 log 0 = 0)."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


@dataclass
class LayerStats:
    """One MoE layer's routing statistics over T tokens."""

    layer: int  # decoder layer index
    tokens: int  # T, real tokens routed
    experts: int  # E
    top_k: int  # k experts per token
    load_share: list[float]  # (E,) fraction of the T*k assignments per expert (uniform = 1/E)
    load_cv: float  # coefficient of variation of the expert counts
    load_max_over_mean: float  # busiest expert's count over the mean count
    dead_experts: list[int]  # experts no token chose
    load_entropy_norm: float  # H(load share) / log E
    routing_entropy_norm: float  # mean over tokens of H(routing distribution) / log E
    routing_entropy_kind: str  # which distribution that is (see routing_distribution)
    repeat_consecutive: float | None  # mean |S_t ∩ S_{t+1}| / k over consecutive tokens of the same text;
    #                                   None when no text has two tokens (nothing to compare)
    coactivation: list[list[float]]  # (E, E) P(j | i) over all top-k pairs of a token (diagonal 0)


def layer_stats(r: RouterLayer, num_experts: int, rule: str) -> LayerStats:
    """The statistics of one layer's routing ``r`` (E = ``num_experts``) under scoring rule ``rule``."""
    T, k = r.indices.shape
    E = num_experts
    assert r.logits.shape == (T, E) and r.weights.shape == (T, k) and r.seq.shape == (T,), (r.logits.shape, E)
    counts = torch.bincount(r.indices.flatten(), minlength=E).double()  # (E,)
    share = counts / counts.sum()
    mean = counts.mean()
    sel = torch.zeros(T, E, dtype=torch.float64)
    sel.scatter_(1, r.indices, 1.0)  # (T, E) token x expert selection
    co = sel.T @ sel  # (E, E): tokens choosing both i and j
    co.fill_diagonal_(0)
    cond = torch.where(counts[:, None] > 0, co / counts[:, None].clamp_min(1), torch.zeros_like(co))
    dist, kind = routing_distribution(r.logits, rule)
    same = r.seq[1:] == r.seq[:-1]  # (T-1,) consecutive tokens of one text
    overlap = (sel[1:] * sel[:-1]).sum(-1) / k  # (T-1,)
    return LayerStats(
        layer=r.layer, tokens=T, experts=E, top_k=k, load_share=share.tolist(),
        load_cv=float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
        load_max_over_mean=float(counts.max() / mean) if mean > 0 else 0.0,
        dead_experts=torch.nonzero(counts == 0).flatten().tolist(),
        load_entropy_norm=float(_entropy(share) / math.log(E)) if E > 1 else 1.0,  # one expert: uniform
        routing_entropy_norm=float(_entropy(dist).mean() / math.log(E)) if E > 1 else 0.0,
        routing_entropy_kind=kind,
        repeat_consecutive=float(overlap[same].mean()) if bool(same.any()) else None,
        coactivation=cond.tolist(),
    )


@dataclass
class Transition:
    """How tokens move between two consecutive MoE layers' top-1 experts."""

    source: int  # the earlier MoE layer
    target: int  # the next MoE layer
    counts: list[list[int]]  # (E, E): tokens with top-1 expert i at ``source`` and j at ``target``


def top1(r: RouterLayer) -> torch.Tensor:
    """(T,) each token's highest-weight expert."""
    return r.indices[torch.arange(len(r.indices)), r.weights.argmax(-1)]


def transitions(a: RouterLayer, b: RouterLayer, num_experts: int) -> torch.Tensor:
    """(E, E) counts of (top-1 expert at layer a, top-1 expert at layer b) over the same tokens."""
    assert a.indices.shape[0] == b.indices.shape[0], (a.indices.shape, b.indices.shape)
    ta, tb = top1(a), top1(b)
    m = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    m.index_put_((ta, tb), torch.ones_like(ta), accumulate=True)
    return m


def layer_transitions(layers: list[RouterLayer], num_experts: int) -> list[Transition]:
    """One :class:`Transition` per pair of consecutive MoE layers, in layer order."""
    return [Transition(source=a.layer, target=b.layer, counts=transitions(a, b, num_experts).tolist())
            for a, b in zip(layers, layers[1:])]


def dispatch_csr(r: RouterLayer, num_experts: int) -> dict[str, torch.Tensor]:
    """The token x expert dispatch matrix as CSR: row t holds token t's experts (sorted) and weights.

    Returns ``indptr`` (T+1,), ``indices`` (T*k,), ``data`` (T*k,) and ``shape`` (2,) = (T, E), the names
    the dump stores them under."""
    order = torch.argsort(r.indices, dim=1)  # (T, k)
    cols = torch.gather(r.indices, 1, order)
    vals = torch.gather(r.weights, 1, order)
    T, k = cols.shape
    return {"indptr": torch.arange(0, T * k + 1, k, dtype=torch.int64), "indices": cols.flatten().to(torch.int64),
            "data": vals.flatten().float(), "shape": torch.tensor([T, num_experts], dtype=torch.int64)}


def csr_to_dense(csr: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, E) dense dispatch weights from a :func:`dispatch_csr` dict."""
    T, E = (int(x) for x in csr["shape"])
    assert csr["indptr"].shape == (T + 1,), (csr["indptr"].shape, T)
    dense = torch.zeros(T, E, dtype=torch.float32)
    for t in range(T):
        a, b = int(csr["indptr"][t]), int(csr["indptr"][t + 1])
        dense[t, csr["indices"][a:b]] = csr["data"][a:b]
    return dense
