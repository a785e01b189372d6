"""Route texts through a mixture-of-experts checkpoint and collect every MoE layer's statistics.

:func:`route` is the library entry point behind ``headlens router``: texts -> tokenizer -> model -> router
capture (:mod:`headlens.moe.capture`) -> per-layer statistics and transitions (:mod:`headlens.moe.statistics`)
-> a :class:`RouterResult`, whose ``report`` is what the dump (:mod:`headlens.moe.dump`) stores::

    from headlens.io.source import ModelSource
    from headlens.moe.router import route
    r = route(ModelSource(weights="path/to/moe"), ["some text", "another text"])
    r.report.stats[0].load_cv
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from headlens import params
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource
from headlens.moe.capture import RouterLayer, capture_routing, is_moe_config, scoring_rule
from headlens.moe.dump import RouterReport, prompt_hash
from headlens.moe.statistics import layer_stats, layer_transitions


@dataclass
class RouterConfig:
    """How to route (no argparse here: the CLI builds this)."""

    batch_size: int = 8  # texts per forward pass (padded to the longest of the batch)
    color_layer: int | None = None  # MoE layer whose top expert colours the text page; None: the first MoE layer
    dtype: torch.dtype | str = "auto"  # precision the model runs in (auto: float32 on the CPU)
    progress: bool = True  # a progress bar on stderr while routing (tqdm; hidden when stderr is no terminal)
    truncate: bool = False  # cut texts longer than the model's positions instead of refusing them

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise HeadlensError naming a field of the wrong type or out of range."""
        from headlens.selection import DTYPE_CHOICES

        self.batch_size = params.integer(self.batch_size, "batch_size")
        self.color_layer = params.integer(self.color_layer, "color_layer", optional=True)
        self.progress = params.flag(self.progress, "progress")
        self.truncate = params.flag(self.truncate, "truncate")
        if not isinstance(self.dtype, torch.dtype):
            self.dtype = params.choice(self.dtype, "dtype", DTYPE_CHOICES)
        if self.batch_size < 1:
            raise HeadlensError(f"`batch_size` must be at least 1, got {self.batch_size}")


@dataclass
class RouterResult:
    """What :func:`route` returns: the report, the routing tensors, and the texts' tokens."""

    report: RouterReport  # statistics per MoE layer and transitions, as the dump's JSON stores them
    layers: list[RouterLayer]  # per MoE layer: logits (T, E), indices and weights (T, k), text index (T,)
    texts: list[str]  # the routed texts
    token_ids: list[list[int]]  # per text, its real (unpadded) token ids; T tokens in all
    token_pieces: list[list[str]]  # per text, each token decoded on its own
    color_layer: int  # the MoE layer whose top expert colours the text page

    def to_json(self) -> dict:
        """The report (statistics per MoE layer, transitions) with the texts and their tokens, as strict JSON data;
        the routing tensors (``layers``) are what ``headlens router`` writes to ``router_dump.safetensors``."""
        from headlens.results import strict

        return strict({"report": self.report.to_json(), "texts": self.texts, "token_ids": self.token_ids,
                       "token_pieces": self.token_pieces, "color_layer": self.color_layer})

    def __repr__(self) -> str:
        from headlens.results import short_repr

        r = self.report
        lines = [f"layer {s.layer:>3}: load CV {s.load_cv:.3f}, dead {len(s.dead_experts)}, load entropy "
                 f"{s.load_entropy_norm:.3f}, routing entropy {s.routing_entropy_norm:.3f}" for s in r.stats]
        return short_repr(self, f"{r.model.get('name', '?')}: {len(r.moe_layers)} MoE layers ({r.experts} experts, "
                                f"top-{r.top_k}, {r.rule}), {r.tokens} tokens from {len(self.texts)} text(s)", lines,
                          "report.stats[i], layers[i].logits / indices / weights, token_pieces, to_json()")


def _moe_text_config(name: str, config: dict) -> dict:
    """The language-model config, checked to name experts."""
    cfg = config.get("text_config") or config
    if not is_moe_config(cfg):
        raise HeadlensError(f"no MoE layers in {name}: its config ({cfg.get('model_type')}) has no experts")
    return cfg


def _check_color_layer_range(color_layer: int | None, name: str, n_layers: int) -> None:
    if color_layer is not None and not 0 <= color_layer < n_layers:
        raise HeadlensError(f"`color_layer` {color_layer} is out of range: {name} has {n_layers} layers "
                            f"(valid 0..{n_layers - 1})")


def _capture(model, tokenizer, texts: list[str], cfg: RouterConfig, max_positions: int | None):
    """:func:`capture_routing` with the progress bar ``cfg`` asks for."""
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), desc="routing", unit="text", file=sys.stderr,
              disable=None if cfg.progress else True) as bar:
        return capture_routing(model, tokenizer, texts, cfg.batch_size, max_positions, progress=bar.update)


def _resolve_color_layer(color_layer: int | None, moe: list[int]) -> int:
    chosen = moe[0] if color_layer is None else color_layer
    if chosen not in moe:
        raise HeadlensError(f"`color_layer` {chosen} is not a MoE layer: choose one of {moe}")
    return chosen


def _quantization(model) -> dict | None:
    """How the loaded model's checkpoint stores its weights (None: unquantized), as the other commands' JSON says."""
    q = getattr(model, "headlens_quantization", None)
    return q.to_json() if q is not None else None


def route(source: ModelSource, texts: list[str] | str, cfg: RouterConfig | None = None) -> RouterResult:
    """Run ``texts`` (one string or several, batched) through the MoE model ``source`` names and return the
    routing of every real token at every MoE layer with its statistics (:class:`RouterResult`)."""
    from headlens.io.source import check_text_lengths
    from headlens.residual.capture import max_positions

    params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-moe")')
    cfg = RouterConfig() if cfg is None else params.instance(cfg, "cfg", RouterConfig,
                                                            "e.g. headlens.RouterConfig(batch_size=4)")
    cfg.check()
    texts = params.texts(texts, "texts")
    if not texts or not all(t.strip() for t in texts):
        raise HeadlensError("`texts` is empty" if not texts else "`texts` holds an empty text")
    name, directory, config = source.model_dir()
    text_cfg = _moe_text_config(name, config)
    n_layers = int(text_cfg.get("num_hidden_layers") or 0)
    _check_color_layer_range(cfg.color_layer, name, n_layers)
    tokenizer = source.tokenizer(directory)
    check_text_lengths(tokenizer, texts, max_positions(config), cfg.truncate)
    model = source.model(directory, cfg.dtype)
    layers, n_tokens, ids = _capture(model, tokenizer, texts, cfg, max_positions(config))
    rule = scoring_rule(model)
    E = int(layers[0].logits.shape[1])
    k = int(layers[0].indices.shape[1])
    moe = [r.layer for r in layers]
    color_layer = _resolve_color_layer(cfg.color_layer, moe)
    report = RouterReport(
        model={"name": name, "source": str(directory), "model_type": text_cfg.get("model_type"),
               "revision": source.revision, "quantization": _quantization(model)},
        rule=rule, experts=E, top_k=k, moe_layers=moe, dense_layers=[l for l in range(n_layers) if l not in moe],
        tokens=n_tokens, prompt_sha256=prompt_hash(texts), stats=[layer_stats(r, E, rule) for r in layers],
        transitions=layer_transitions(layers, E))
    pieces = [[tokenizer.decode([tid]) for tid in seq] for seq in ids]
    return RouterResult(report=report, layers=layers, texts=texts, token_ids=ids, token_pieces=pieces,
                        color_layer=color_layer)
