"""What the latents of :mod:`headlens.compress.plan` lose in the running model, against the unmodified model.

:func:`measure` runs the eval texts through a loaded HuggingFace model and returns a :class:`Measurement`:

Per planned layer l (:class:`LayerErrors`), four relative errors side by side:

- ``predicted_error``: the plan's (:attr:`LayerPlan.predicted_error`, as the sweep computes it from the spectrum).
- ``value_path_error``: ``sqrt(sum_{g, tokens} ||M_g (v - v')||^2 / sum_{g, tokens} ||M_g (v - b)||^2)`` with v the
  values the original model computes, v' those of the compressed layer on the same inputs, b the value bias
  (``v - b = W_V^g x``), over the layer's kv groups and every eval token: the value path before attention mixes
  tokens. ``||M_g y|| = ||R_g y||`` with the group's triangular factor (:class:`GroupLatent`), so no (H/G) d-row
  matrix is formed. v and v' are read from the value (or fused qkv) projection's output in the running model.
- ``isolated_error``: only layer l compressed, fed the original model's inputs: ``||o' - o||_F / ||o - c||_F`` over
  the eval tokens, with o what the layer's output projection (the layout's ``o`` tensor: ``o_proj``, ``c_proj``,
  ``dense``...) writes in the original model, o' what it writes when the attention block that holds the value and
  output projections is re-run on the same inputs with layer l compressed, and ``c`` what the output projection
  writes for the value bias alone (``W_O b_v + b_o``, the same for every token because attention weights sum to
  one), so that the denominator is the part of o the values' linear map produces, as in ``value_path_error``.
  It includes the attention mixing the spectrum cannot see.
- ``accumulated_error``: every planned layer compressed at once, errors propagating: ``||o'' - o|| / ||o - c||``.

The output projection, not the spec's ``attn_out`` site, is measured: in sandwich-norm families (Gemma 2/3)
``attn_out`` is the post-attention norm's output, which renormalises the error away.

The whole model (all planned layers compressed): ``hidden_error``, the relative Frobenius error of the last
hidden states over all eval tokens (for a causal LM what its output embedding reads, i.e. after the final norm,
hooked; else the model's ``last_hidden_state``); for causal LMs (an output embedding, ``model.get_output_embeddings()``, on
a decoder family) the next-token KL(original || compressed) in nats at every position that has a next token in its
text (mean and 95th percentile, linear interpolation), top-1 agreement at those positions, and the perplexity
``exp(mean NLL)`` of the actual next tokens before and after, all from float64 log-softmaxes; for every
other model the cosine between the original and compressed mean-pooled last hidden states of each text (mean and
minimum) and nearest-neighbour agreement (the fraction of texts whose most similar other text, by that cosine, is
the same before and after; None for fewer than 2 texts). KV bytes per token come with it (:func:`kv_bytes`).

Texts run one at a time, unpadded (batch 1, so no attention mask and no pad token is involved, and the mean pool is
over every token of the text, special tokens included). Per text, for all configurations of :func:`measure_many`
together: one original forward pass, during which each planned layer's attention block is re-run once per
configuration with only that layer compressed (a forward hook on the block calls its ``forward`` again, so the
block's own hooks do not see the re-run; the outer pass continues with the original weights); then, per
configuration, one forward pass with its planned layers compressed. The per-layer sums are taken in the hooks, so
between the passes a text keeps only each planned layer's original value input, value output and output-projection
output (N x d each) and its original logits. KL per position is ``sum p log p - sum p z + logsumexp(z)`` (z the
compressed logits), float64. The weights are changed only through :mod:`headlens.compress.apply` (each
configuration's new value blocks computed once, written in and restored around each pass), so the model leaves
exactly as it came, hooks removed, also when an error is raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from headlens.compress.apply import applied, compressed, prepare_plans, value_tensor
from headlens.compress.key_measure import KeyLayerErrors, key_result, probed
from headlens.compress.plan import LayerPlan
from headlens.compress.model_loss import HeadInput, Original, embedding_numbers, tally_model
from headlens.compress.model_loss import final_outputs as _final
from headlens.compress.recorder import Recorder, Tally, find_site
from headlens.errors import HeadlensError
from headlens.io.placement import input_device

CAUSAL_LM = "causal-lm"
EMBEDDING = "embedding"
PREPARED_BYTES = 2 << 30  # the configurations' new value blocks are computed once while they fit in 2 GiB


@dataclass
class LayerErrors:
    """One compressed layer's four relative errors (see the module docstring), on the eval tokens."""

    layer: int
    kind: str  # "plain" or "data-aware"
    ks: list[int]  # k_g per kv group
    predicted_error: float
    value_path_error: float
    isolated_error: float
    accumulated_error: float
    group_value_path_errors: list[float] = field(default_factory=list)  # per kv group ||M_g (v - v')|| / ||M_g W_V x||

    def as_dict(self) -> dict:
        """The issue's per-layer record: ``layer, predicted_error, value_path_error, isolated_error,
        accumulated_error`` (plus ``kind`` and ``ks``)."""
        return {"layer": self.layer, "kind": self.kind, "ks": list(self.ks), "predicted_error": self.predicted_error,
                "value_path_error": self.value_path_error, "isolated_error": self.isolated_error,
                "accumulated_error": self.accumulated_error}


@dataclass
class KVBytes:
    """KV-cache bytes per token, per layer of the model (every layer, compressed or not)."""

    bytes_per_value: float
    before: list[float]  # 2 * G * hd * bytes: full keys and values
    after: list[float]  # (G * hd + sum_g k_g) * bytes for a compressed layer (full keys, the latents); else before

    @property
    def total_before(self) -> float:
        """Bytes per token of the whole model's cache, uncompressed."""
        return float(sum(self.before))

    @property
    def total_after(self) -> float:
        """Bytes per token of the whole model's cache with the latents."""
        return float(sum(self.after))

    @property
    def saving(self) -> float:
        """``1 - total_after / total_before`` (0.0 for an empty cache)."""
        return 1.0 - self.total_after / self.total_before if self.total_before > 0 else 0.0


def kv_bytes(ck, plans: Mapping[int, LayerPlan], bytes_per_value: float, key_plans: Mapping | None = None,
             position_bytes: float = 0.0) -> KVBytes:
    """:class:`KVBytes` for the checkpoint ``ck`` with ``plans`` (layer -> plan) in place: per layer
    ``2 * G * hd * bytes_per_value`` before, ``(G * hd + sum_g k_g) * bytes_per_value`` after (keys full), or with
    ``key_plans`` (layer -> KeyLayerPlan) the kept form's numbers for a layer's keys (``sum_g k^K_g``, or K of a
    cross-head latent); ``position_bytes`` per token (the position a per-group rotary key latent layer keeps of each
    token) are added to every such layer."""
    if not bytes_per_value > 0:
        raise HeadlensError(f"`bytes_per_value` must be positive, got {bytes_per_value}")
    s = ck.shape
    _check_plans(plans, s.num_layers)
    full = s.num_kv_heads * s.head_dim
    before = [2.0 * full * bytes_per_value] * s.num_layers
    key_plans = key_plans or {}
    after = [float(((key_plans[l].numbers if l in key_plans else full) + (sum(plans[l].ks) if l in plans else full))
                   * bytes_per_value) + (float(position_bytes) if l in key_plans and key_plans[l].stores_positions
                                         else 0.0)
             for l in range(s.num_layers)]
    return KVBytes(bytes_per_value=float(bytes_per_value), before=before, after=after)


@dataclass
class Measurement:
    """Everything :func:`measure` found for one set of plans. Fields that do not apply are None."""

    task: str  # "causal-lm" or "embedding"
    n_texts: int
    n_tokens: int  # eval tokens over all texts
    n_predicted: int  # next-token positions (n_tokens - n_texts); 0 for an embedding model
    layers: list[LayerErrors]  # one per planned layer, in layer order
    kv: KVBytes
    hidden_error: float  # ||h'' - h||_F / ||h||_F of the last hidden states, every planned layer compressed
    kl_mean: float | None = None  # nats
    kl_p95: float | None = None
    top1_agreement: float | None = None
    ppl_before: float | None = None  # exp(nll_before); math.inf where that overflows float64 (see perplexity)
    ppl_after: float | None = None
    nll_before: float | None = None  # mean next-token loss (nats) of the actual next tokens: log(ppl), always finite
    nll_after: float | None = None
    embedding_cosine_mean: float | None = None
    embedding_cosine_min: float | None = None
    neighbour_agreement: float | None = None
    key_layers: list[KeyLayerErrors] = field(default_factory=list)  # with key latents measured (else empty)

    def summary(self) -> dict:
        """The issue's ``compress_summary.json`` fields for this configuration (without ``target`` and ``latent``,
        which the caller knows): KV bytes, saving, the model-level numbers (None where they do not apply),
        ``hidden_error``, ``n_texts``, ``n_tokens`` and ``layers``."""
        return {"task": self.task, "n_texts": self.n_texts, "n_tokens": self.n_tokens,
                "kv_bytes_per_token_before": self.kv.total_before, "kv_bytes_per_token_after": self.kv.total_after,
                "saving": self.kv.saving, "hidden_error": self.hidden_error, "kl_mean": self.kl_mean,
                "kl_p95": self.kl_p95, "top1_agreement": self.top1_agreement, "ppl_before": self.ppl_before,
                "ppl_after": self.ppl_after, "nll_before": self.nll_before, "nll_after": self.nll_after,
                "embedding_cosine_mean": self.embedding_cosine_mean,
                "embedding_cosine_min": self.embedding_cosine_min, "neighbour_agreement": self.neighbour_agreement,
                "layers": [e.as_dict() for e in self.layers],
                "key_layers": [e.as_dict() for e in self.key_layers]}


# ------------------------------------------------------------------------------------------------ checks


def _check_plans(plans: Mapping[int, LayerPlan], num_layers: int) -> None:
    if not isinstance(plans, Mapping):
        raise HeadlensError("`plans` must map each layer to its LayerPlan")
    for layer, plan in plans.items():
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise HeadlensError(f"`plans` has a plan for layer {layer}, out of range: the model has {num_layers} "
                                f"layers (valid 0..{num_layers - 1})")
        if plan.layer != layer:
            raise HeadlensError(f"`plans` holds layer {plan.layer}'s plan under layer {layer}")


def _token_ids(tokenizer, texts: list[str], limit: int | None, vocab: int | None, truncate: bool) -> list[torch.Tensor]:
    """Each text's token ids (1, N), refused (one line) when shorter than 2 tokens, longer than ``limit``
    (unless ``truncate``) or outside the model's vocabulary."""
    from headlens.io.source import quiet_transformers

    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise HeadlensError(f"`texts` item {i + 1} is a {type(text).__name__}, not a string")
        preview = text if len(text) <= 40 else text[:37] + "..."
        with quiet_transformers():
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        n = int(ids.shape[-1]) if ids.ndim == 2 else 0
        if n < 2:
            raise HeadlensError(f"`texts` item {i + 1} ({preview!r}) has {n} token(s): every eval text needs at "
                                "least 2 (a next token to predict)")
        if limit and n > limit:
            if not truncate:
                raise HeadlensError(f"`texts` item {i + 1} ({preview!r}) has {n} tokens but the model takes at most "
                                    f"{limit}: shorten it or pass `truncate`")
            ids = ids[:, :limit]
        if vocab and int(ids.max()) >= vocab:
            raise HeadlensError(f"the tokenizer gives token id {int(ids.max())}, but the model's vocabulary has "
                                f"{vocab} entries: `tokenizer` belongs to another model")
        out.append(ids)
    return out


# ------------------------------------------------------------------------------------------------ the passes


def _forward(model: nn.Module, ids: torch.Tensor, use_cache: bool):
    kwargs = {"use_cache": False} if use_cache else {}
    return model(input_ids=ids, **kwargs)


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``, or ``math.inf`` where that is beyond float64 (a mean loss above ~709.8 nats: a model
    that puts next to no probability on the actual tokens)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else 0.0


def measure(model: nn.Module, ck, tokenizer, plans: Mapping[int, LayerPlan], texts: Sequence[str], *,
            bytes_per_value: float | None = None, truncate: bool = False, disable: bool | None = None) -> Measurement:
    """Measure ``plans`` (layer -> :class:`LayerPlan`, fitted on ``ck``'s weights) in ``model`` (loaded from the
    :class:`~headlens.io.checkpoint.Checkpoint` ``ck``) on the eval ``texts``, against the unmodified model.

    Returns a :class:`Measurement`: per planned layer the predicted, value-path, isolated and accumulated errors,
    the whole model's hidden-state error, KL / top-1 / perplexity (causal LMs) or embedding cosine and neighbour
    agreement (other models), and the KV bytes per token (``bytes_per_value`` defaults to the size of the model's
    value weights' dtype). ``truncate`` cuts texts longer than the model's positions instead of refusing them;
    ``disable`` hides the progress bar (None: shown only on a terminal). The model is left exactly as it came
    (weights, hooks, train/eval mode), also on error.

    Raises HeadlensError (one line) for an empty ``texts``, a text shorter than 2 tokens, a plan for a layer out of
    range, plans that do not fit the model, or a model whose value or output projections cannot be found.
    """
    return measure_many(model, ck, tokenizer, [plans], texts, bytes_per_value=bytes_per_value, truncate=truncate,
                        disable=disable)[0]


def measure_many(model: nn.Module, ck, tokenizer, configs: Sequence[Mapping[int, LayerPlan]], texts: Sequence[str],
                 *, bytes_per_value: float | None = None, truncate: bool = False, disable: bool | None = None,
                 desc: str = "eval", key_plans: Sequence[Mapping | None] | None = None,
                 position_bytes: float = 0.0) -> list[Measurement]:
    """:func:`measure` for several configurations (each a layer -> plan mapping) at once, one
    :class:`Measurement` each, equal to what :func:`measure` returns for it alone.

    Per text the unmodified model runs once for all of them (its hidden states, logits and each planned layer's
    inputs and outputs are shared); each configuration adds its isolated re-runs of its planned layers' attention
    blocks and one forward pass with its layers compressed.

    ``key_plans``: per configuration its key latents (layer -> :class:`~headlens.compress.keys.KeyLayerPlan`, or
    None / empty for values only). Where any configuration has some, every pass runs through
    :func:`~headlens.compress.key_attention.key_attention`: the original pass adds per layer the isolated key logit
    error, attention KL and attention-output errors (keys alone, values alone, both), and each configuration's
    compressed pass has its keys replaced by the latents' (:class:`KeyLayerErrors`, ``Measurement.key_layers``);
    ``position_bytes`` per token count the positions such a cache keeps."""
    from tqdm.auto import tqdm

    from headlens.residual.capture import max_positions, vocab_size
    from headlens.residual.modules import count_layers

    if isinstance(texts, str):
        raise HeadlensError("`texts` is one string: pass a list of eval texts")
    texts = list(texts)
    if not texts:
        raise HeadlensError("`texts` is empty: measuring needs at least one eval text")
    configs = list(configs)
    if not configs:
        raise HeadlensError("no configurations to measure")
    L = ck.shape.num_layers
    for plans in configs:
        _check_plans(plans, L)
    n_model = count_layers(model, ck.spec)
    if n_model != L:
        raise HeadlensError(f"`model` has {n_model} layers but {ck.name} has {L}")
    ordered = [[plans[layer] for layer in sorted(plans)] for plans in configs]
    ids_list = _token_ids(tokenizer, texts, max_positions(model), vocab_size(model), truncate)
    if bytes_per_value is None:
        bytes_per_value = value_tensor(model, ck, 0).param.element_size()
    key_plans = list(key_plans) if key_plans is not None else [None] * len(configs)
    if len(key_plans) != len(configs):
        raise HeadlensError(f"`key_plans` has {len(key_plans)} entries for {len(configs)} configurations")
    key_plans = [dict(k) if k else {} for k in key_plans]
    kvs = [kv_bytes(ck, plans, bytes_per_value, kp, position_bytes) for plans, kp in zip(configs, key_plans)]
    keys_on = any(key_plans)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    causal = head is not None and ck.spec.decoder
    device = input_device(model)
    use_cache = "use_cache" in inspect.signature(model.forward).parameters
    prepared = [prepare_plans(model, ck, plans) for plans in ordered]  # every plan fits the model, checked and
    # its new value blocks computed before any forward pass; kept for the passes unless they would take too much
    keep = sum(p.nbytes for p in prepared) <= PREPARED_BYTES
    if not keep:
        prepared.clear()
    site_of: dict[int, object] = {}
    per_config = []
    for c, plans in enumerate(ordered):
        sites = {}
        for plan in plans:
            base = site_of.get(plan.layer)
            if base is None:
                base = site_of[plan.layer] = find_site(model, ck, plan)
                sites[plan.layer] = base
            else:  # the same modules and original weights: only the plan (and its R factors) differ
                sites[plan.layer] = dataclasses.replace(base, plan=plan, R=[g.R.to(base.R[0].device, torch.float64)
                                                                            for g in plan.groups])
            if keep:
                sites[plan.layer] = dataclasses.replace(sites[plan.layer], prepared=prepared[c].only(plan.layer))
        per_config.append((sites, Tally()))
    was_training = model.training
    model.eval()
    head_in = HeadInput(head if causal else None)
    key_ctx = contextlib.nullcontext(None)
    if keys_on:
        from headlens.compress.cache import encoders
        from headlens.compress.key_attention import key_attention

        value_factors = [encoders(model, ck, plans) for plans in ordered]
        layers = sorted({layer for c in configs for layer in c} | {layer for kp in key_plans for layer in kp})
        key_ctx = key_attention(model, ck, layers)
    try:
        with key_ctx as keys, torch.no_grad(), probed(keys, model), Recorder(model, ck, per_config) as rec:
            if keys is not None:
                keys.quiet = rec.quiet
                keys.configs = [{layer: (kp.get(layer), vf.get(layer)) for layer in set(kp) | set(vf)}
                                for kp, vf in zip(key_plans, value_factors)]
            bar = tqdm(total=len(ids_list) * len(configs), desc=desc, unit="pass", file=sys.stderr, disable=disable)
            with bar:
                for ids in ids_list:
                    ids = ids.to(device)
                    rec.start_text()
                    if keys is not None:
                        keys.start("orig")
                    orig = Original(ids, _final(_forward(model, ids, use_cache), causal, head_in))
                    for c, plans in enumerate(ordered):
                        rec.mode, rec.current = "acc", c
                        if keys is not None:
                            keys.start("acc", c)
                        with (applied(prepared[c]) if keep else compressed(model, ck, plans)):
                            if keys is not None and keys.via_cache and key_plans[c]:  # keys replaced in the cache
                                after = _final(model(input_ids=ids, **keys.forward_kwargs(model)), causal, head_in)
                            else:
                                after = _final(_forward(model, ids, use_cache), causal, head_in)
                        rec.mode = "orig"
                        tally_model(per_config[c][1], orig, after, unchanged=not plans and not key_plans[c])
                        bar.update(1)
                    rec.check_text()
    finally:
        head_in.remove()
        model.train(was_training)
    out = [_result(sites, tally, kv, causal, len(texts)) for (sites, tally), kv in zip(per_config, kvs)]
    if keys_on:
        for c, m in enumerate(out):
            m.key_layers = key_result(key_plans[c], keys.sums[c] if c < len(keys.sums) else {}, keys.info)
    return out


def _result(sites: dict, tally: Tally, kv: KVBytes, causal: bool, n_texts: int) -> Measurement:
    layers = []
    for layer in sorted(sites):
        s = sites[layer]
        G = len(s.out_slices)
        lost = [tally.vp_lost[(s.layer, g)] for g in range(G)]
        total = [tally.vp_total[(s.layer, g)] for g in range(G)]
        layers.append(LayerErrors(
            layer=s.layer, kind=s.plan.kind, ks=s.plan.ks, predicted_error=s.plan.predicted_error,
            value_path_error=_ratio(sum(lost), sum(total)),
            isolated_error=_ratio(tally.o_iso[s.layer], tally.o_total[s.layer]),
            accumulated_error=_ratio(tally.o_acc[s.layer], tally.o_total[s.layer]),
            group_value_path_errors=[_ratio(a, b) for a, b in zip(lost, total)]))
    m = Measurement(task=CAUSAL_LM if causal else EMBEDDING, n_texts=n_texts, n_tokens=tally.n_tokens,
                    n_predicted=tally.n_predicted, layers=layers, kv=kv,
                    hidden_error=_ratio(tally.h_lost, tally.h_total))
    if causal:
        kl = torch.cat(tally.kl).numpy()
        m.kl_mean, m.kl_p95 = float(kl.mean()), float(np.percentile(kl, 95))
        m.top1_agreement = tally.top1 / tally.n_predicted
        m.nll_before = tally.nll_before / tally.n_predicted
        m.nll_after = tally.nll_after / tally.n_predicted
        m.ppl_before, m.ppl_after = perplexity(m.nll_before), perplexity(m.nll_after)
    else:
        m.embedding_cosine_mean, m.embedding_cosine_min, m.neighbour_agreement = embedding_numbers(
            tally.pooled_before, tally.pooled_after)
    return m
