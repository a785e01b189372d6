"""What the whole model loses on one text, for :func:`headlens.compress.measure.measure_many`: the final hidden
states (hooked where the output embedding reads them), the unmodified model's logits and log-probabilities kept
for every configuration, and each compressed pass's contribution to the hidden-state error, next-token KL, top-1
agreement and perplexity (causal LMs) or to the mean-pooled embeddings (other models), all in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from headlens.compress.recorder import Tally, sq_norm
from headlens.errors import HeadlensError

CHUNK = 256  # positions per log-softmax (a (CHUNK, vocab) float64 block at a time)
CACHE_ELEMENTS = 1 << 25  # a text's original log-probs (float64) are kept for every configuration up to 256 MiB


class HeadInput:
    """A forward hook on the output embedding keeping what it reads: the final hidden states the logits are
    computed from (after the final norm), without asking the model for every layer's hidden states."""

    def __init__(self, head: nn.Module | None):
        self.value: torch.Tensor | None = None
        self.handle = head.register_forward_hook(self._keep) if head is not None else None

    def _keep(self, _m, args, _out) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise HeadlensError("the model's output embedding was not called during the forward pass")
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def final_outputs(out, causal: bool, head: HeadInput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(last hidden states (N, d) float64, logits (N, V) float64 or None) of one forward's output: for a causal LM
    what its output embedding read, else the model's ``last_hidden_state``."""
    if not causal:
        h = getattr(out, "last_hidden_state", None)
        if h is None:
            raise HeadlensError("the model returned no last_hidden_state")
        return h[0].detach().to(torch.float64), None
    logits = getattr(out, "logits", None)
    if logits is None:
        raise HeadlensError("the model has an output embedding but its forward returned no logits")
    return head.take()[0].detach().to(torch.float64), logits[0].detach().to(torch.float64)


class Original:
    """One text's unmodified outputs, shared by every configuration: the last hidden states, the logits and, per
    chunk of positions, what KL needs of them (float64 log-probabilities ``lp``, probabilities ``p``, ``sum p lp``
    and the top-1 token), kept for every configuration while they fit in ``CACHE_ELEMENTS``."""

    def __init__(self, ids: torch.Tensor, final: tuple):
        self.h, self.logits = final
        self.target = ids[0, 1:].to(self.h.device) if self.logits is not None else None
        n = 0 if self.target is None else int(self.target.shape[0])
        self.chunks = [(a, min(n, a + CHUNK)) for a in range(0, n, CHUNK)]
        self.keep = self.logits is not None and 2 * self.logits.numel() <= CACHE_ELEMENTS
        self._cache: dict[int, tuple] = {}

    def chunk(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lp, p, sum_v p lp, argmax) for positions a..b-1."""
        got = self._cache.get(a)
        if got is None:
            lp = torch.log_softmax(self.logits[a:b], dim=-1)  # type: ignore[index]
            p = torch.exp(lp)
            got = (lp, p, (p * lp).sum(dim=-1), self.logits[a:b].argmax(dim=-1))  # type: ignore[index]
            if self.keep:
                self._cache[a] = got
        return got


def tally_model(tally: Tally, orig: Original, after: tuple, unchanged: bool = False) -> None:
    """Add one configuration's compressed pass of one text. KL(p || q) per position is computed as
    ``sum p lp - sum p z + logsumexp(z)`` with z the compressed logits (``log q = z - logsumexp(z)``, sum p = 1):
    two reductions over the vocabulary per configuration, all in float64."""
    h, (h2, logits2) = orig.h, after
    tally.h_lost += sq_norm(h2 - h)
    tally.h_total += sq_norm(h)
    tally.n_tokens += int(h.shape[0])
    if orig.logits is None:
        tally.pooled_before.append(h.mean(dim=0).cpu())  # unpadded: the attention-mask-weighted mean is the mean
        tally.pooled_after.append(h2.mean(dim=0).cpu())
        return
    kls = []
    for a, b in orig.chunks:
        lp, p, plp, top = orig.chunk(a, b)
        z = logits2[a:b]
        top2 = z.argmax(dim=-1)
        m = z.max(dim=-1, keepdim=True).values  # logsumexp with one temporary, exponentiated in place
        lse = (z - m).exp_().sum(dim=-1).log_() + m[:, 0]
        kl = (torch.zeros(b - a, dtype=torch.float64) if unchanged else
              (plp - torch.einsum("nv,nv->n", p, z) + lse).cpu())
        kls.append(kl)  # unchanged (nothing compressed): exactly 0, not round-off
        tally.top1 += int((top == top2).sum())
        t = orig.target[a:b, None]  # type: ignore[index]
        tally.nll_before -= float(lp.gather(1, t).sum())
        tally.nll_after -= float((z.gather(1, t)[:, 0] - lse).sum())
    tally.kl.append(torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64))
    tally.n_predicted += sum(b - a for a, b in orig.chunks)


def embedding_numbers(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float, float | None]:
    """(mean cosine, min cosine, nearest-neighbour agreement or None for fewer than 2 texts)."""
    E, F = torch.stack(before), torch.stack(after)  # (T, d)

    def unit(A: torch.Tensor) -> torch.Tensor:
        return A / torch.linalg.norm(A, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)

    E, F = unit(E), unit(F)
    cos = (E * F).sum(dim=-1)
    agree = None
    if E.shape[0] >= 2:
        def nearest(A: torch.Tensor) -> torch.Tensor:
            S = A @ A.T
            S.fill_diagonal_(-math.inf)
            return S.argmax(dim=-1)
        agree = float((nearest(E) == nearest(F)).double().mean())
    return float(cos.mean()), float(cos.min()), agree
