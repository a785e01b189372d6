"""``headlens generate`` as a library call: greedy continuations of the original model with transformers'
``DynamicCache`` and of the compressed model with :class:`~headlens.compress.cache.LatentCache`, side by side.

The compressed model is either made here (``k`` / ``latent``: the plans of :mod:`headlens.compress.plan` on the
original weights, whose LatentCache rebuilds the compressed model's values) or read from a ``compress --save-model``
directory (``compressed``: the exported model with ``LatentCache.from_pretrained``; the original is then the checkpoint
the directory records, or the one passed as ``source``).

What is measured, per prompt (batch 1, no padding), and defined so:

- a greedy continuation is ``N = max_new_tokens`` tokens, the argmax at every step, an end-of-text token not stopping
  it: one pass over the prompt gives token 1 (``prefill_seconds``), then ``N - 1`` one-token steps through the cache
  (``decode_seconds``); ``tokens_per_second`` is ``(N - 1) / decode_seconds`` over all prompts (None for N = 1);
- ``kv_bytes_per_token``: the bytes of every tensor the cache holds at the end (keys and values, or keys and value
  latents; ``LatentCache.nbytes()``), over the tokens it has seen (prompt + N - 1: the last token is never cached),
  summed over prompts; in the dtype the model runs in (``kv_bytes_per_value``);
- ``greedy_agreement``: the fraction of the N tokens the compressed continuation shares with the original's before
  their first difference (``first_divergence``, None when there is none): 1.0 is the same text; past a divergence
  the two read different texts, so later positions are not compared;
- ``kl_mean``: teacher-forced along the original continuation: both models read the prompt and the original's N
  tokens in one pass each (each through its own cache), and at the N positions that predict those tokens
  KL(original || compressed) of the next-token distributions, float64 log-softmax, in nats; the mean over every
  position of every prompt. ``top1_agreement``: at the same positions, how often the compressed model's argmax is
  the original's token.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from headlens import params
from headlens.compress.decode import OPENING_TOKENS, Greedy, greedy, kl_rows, next_token_logits, opening
from headlens.compress.plan import LATENT_KINDS
from headlens.errors import HeadlensError

if TYPE_CHECKING:
    from headlens.compress.pair import Pair

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_PROMPTS = 4  # without prompts: the openings (decode.OPENING_TOKENS tokens) of this many shipped eval texts

DEFINITIONS = [
    "greedy: N tokens, argmax at every step, an end-of-text token not stopping it; batch 1, no padding",
    "kv_bytes_per_token: bytes of every tensor the cache holds after the generation, over the tokens it has seen "
    "(prompt + N - 1), summed over the prompts; in the model's dtype (kv_bytes_per_value)",
    "tokens_per_second: the N - 1 one-token decode steps over their wall time (the prompt's pass is prefill_seconds)",
    "greedy_agreement: the fraction of the N tokens generated before the first position where the two continuations "
    "differ (1.0: the same tokens); the mean over prompts",
    "kl_mean: teacher-forced along the original's continuation, both models reading its tokens: KL(original || "
    "compressed) of the next-token distributions at the N positions that predict them, nats, float64; the mean "
    "over every position; top1_agreement: how often the compressed argmax is the original's token there",
]


@dataclass
class GenerateConfig:
    """What to generate and against which compressed model. ``compressed`` (a ``compress --save-model`` directory)
    or ``k`` / ``latent`` / ``layers`` (compress here), not both; a wrong type is one HeadlensError naming the field."""

    prompts: Sequence[str] | str | None = None  # None: the openings of an embedded model's shipped eval texts
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    compressed: str | os.PathLike | None = None  # a compress --save-model directory
    k: int | None = None  # latent size of every kv group when compressing here (None: head_dim // 4)
    latent: str | None = None  # plain (default) or data-aware, when compressing here
    layers: str | Sequence[int] | None = None  # layers to compress here (None: every layer)
    calib_texts: Sequence[str] | str | None = None  # fit data-aware latents (embedded models: shipped texts)
    max_calib_tokens: int = 2048
    dtype: str = "auto"  # auto (float32 on the CPU, the checkpoint's on an accelerator), float32, ...
    device: str | None = None  # where a model read from `compressed` runs (None: the source's, or $HEADLENS_DEVICE)
    progress: bool = True  # a progress bar on stderr (tqdm; hidden when stderr is no terminal)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Each field in its one form, or a HeadlensError naming the field."""
        from headlens.selection import DTYPE_CHOICES

        self.prompts = params.texts(self.prompts, "prompts", optional=True)
        self.max_new_tokens = params.integer(self.max_new_tokens, "max_new_tokens")
        self.compressed = params.path(self.compressed, "compressed")
        self.k = params.integer(self.k, "k", optional=True)
        if self.latent is not None:
            self.latent = params.choice(self.latent, "latent", LATENT_KINDS)
        self.layers = params.selection(self.layers, "layers")
        self.calib_texts = params.texts(self.calib_texts, "calib_texts", optional=True)
        self.max_calib_tokens = params.integer(self.max_calib_tokens, "max_calib_tokens")
        self.dtype = params.choice(self.dtype, "dtype", DTYPE_CHOICES)
        self.device = params.text(self.device, "device")
        self.progress = params.flag(self.progress, "progress")
        if self.max_new_tokens < 1:
            raise HeadlensError(f"`max_new_tokens` {self.max_new_tokens}: generate at least 1 token")
        if self.k is not None and self.k < 0:
            raise HeadlensError(f"`k` {self.k}: a latent size is a whole number, 0..head_dim")
        if self.device is not None and self.compressed is None:
            raise HeadlensError("`device` places the model read from `compressed`; without it the model runs where "
                                "its ModelSource says (its `device`)")
        if self.compressed is not None:
            given = [n for n in ("k", "latent", "layers", "calib_texts") if getattr(self, n) is not None]
            if given:
                raise HeadlensError(f"`compressed` carries its own latents: leave out {', '.join(f'`{n}`' for n in given)}"
                                    " (they compress the model here)")
        if self.prompts is not None:
            if not self.prompts:
                raise HeadlensError("`prompts` is empty: give at least one text, or leave it out (None)")
            for i, p in enumerate(self.prompts):
                if not p.strip():
                    raise HeadlensError(f"`prompts` item {i} is an empty text")
        if self.max_calib_tokens < 4:
            raise HeadlensError(f"`max_calib_tokens` {self.max_calib_tokens}: at least 4")


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Continuation:
    """One prompt: the two continuations and how far they agree (see the module docstring)."""

    prompt: str
    prompt_tokens: int
    original_ids: list[int]
    compressed_ids: list[int]
    original_text: str
    compressed_text: str
    kl: list[float]  # per position along the original continuation, nats
    top1: list[bool]  # per position: the compressed argmax is the original's token

    @property
    def first_divergence(self) -> int | None:
        return next((i for i, (a, b) in enumerate(zip(self.original_ids, self.compressed_ids)) if a != b), None)

    @property
    def greedy_agreement(self) -> float:
        first = self.first_divergence
        return 1.0 if first is None else first / len(self.original_ids)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens, "original": self.original_text,
                "compressed": self.compressed_text, "original_ids": self.original_ids,
                "compressed_ids": self.compressed_ids, "first_divergence": self.first_divergence,
                "greedy_agreement": self.greedy_agreement, "kl_mean": sum(self.kl) / len(self.kl),
                "kl": self.kl, "top1_agreement": sum(self.top1) / len(self.top1)}


@dataclass
class CacheRun:
    """What one side (the original with DynamicCache, the compressed model with LatentCache) measured over every
    prompt."""

    model: str  # what ran: the checkpoint, or the exported model
    cache: str  # the cache class
    runs: list[Greedy] = field(default_factory=list)

    @property
    def kv_bytes_per_token(self) -> float:
        return sum(r.cache_bytes for r in self.runs) / max(sum(r.cached_tokens for r in self.runs), 1)

    @property
    def kv_bytes_per_value(self) -> int:
        return self.runs[0].bytes_per_value if self.runs else 0

    @property
    def tokens_per_second(self) -> float | None:
        steps, seconds = sum(len(r.tokens) - 1 for r in self.runs), sum(r.decode_seconds for r in self.runs)
        return steps / seconds if steps and seconds > 0 else None

    def to_json(self) -> dict:
        return {"model": self.model, "cache": self.cache, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_bytes_per_value": self.kv_bytes_per_value,
                "cached_tokens": sum(r.cached_tokens for r in self.runs),
                "kv_bytes": sum(r.cache_bytes for r in self.runs), "tokens_per_second": self.tokens_per_second,
                "prefill_seconds": sum(r.prefill_seconds for r in self.runs),
                "decode_seconds": sum(r.decode_seconds for r in self.runs)}


@dataclass
class GenerateResult:
    """What :func:`run_generate` measured: per side (``original``, ``compressed``) the cache bytes per token and the
    decode speed, per prompt the two continuations (``continuations``), and over all of them ``greedy_agreement``,
    ``kl_mean`` and ``top1_agreement``. ``to_json()`` is ``generate.json``."""

    model: dict  # name, source, family of the original checkpoint
    latents: dict  # kind, ks per layer, sum of k, where they come from
    dtype: str
    max_new_tokens: int
    original: CacheRun
    compressed: CacheRun
    continuations: list[Continuation]
    notes: list[str] = field(default_factory=list)

    @property
    def greedy_agreement(self) -> float:
        return sum(c.greedy_agreement for c in self.continuations) / len(self.continuations)

    @property
    def kl_mean(self) -> float:
        kl = [x for c in self.continuations for x in c.kl]
        return sum(kl) / len(kl)

    @property
    def top1_agreement(self) -> float:
        top = [x for c in self.continuations for x in c.top1]
        return sum(top) / len(top)

    @property
    def kv_bytes_ratio(self) -> float:
        """Compressed over original cache bytes per token."""
        return self.compressed.kv_bytes_per_token / self.original.kv_bytes_per_token

    def to_json(self) -> dict:
        from headlens.results import strict

        return strict({"model": self.model, "latents": self.latents, "dtype": self.dtype,
                       "max_new_tokens": self.max_new_tokens, "original": self.original.to_json(),
                       "compressed": self.compressed.to_json(), "kv_bytes_ratio": self.kv_bytes_ratio,
                       "greedy_agreement": self.greedy_agreement, "kl_mean": self.kl_mean,
                       "top1_agreement": self.top1_agreement,
                       "prompts": [c.to_json() for c in self.continuations], "definitions": DEFINITIONS,
                       "notes": self.notes})

    def __repr__(self) -> str:
        from headlens.results import short_repr

        def side(name: str, run: CacheRun) -> str:
            speed = run.tokens_per_second
            return (f"{name}: {run.cache}, {run.kv_bytes_per_token:.0f} B/token, "
                    + (f"{speed:.1f} tokens/s" if speed is not None else "no decode step"))

        return short_repr(self, f"{self.model.get('name', '?')} ({self.latents.get('what', '')}): "
                                f"{len(self.continuations)} prompt(s) x {self.max_new_tokens} tokens",
                          [side("original", self.original), side("compressed", self.compressed),
                           f"greedy agreement {self.greedy_agreement:.3f}, KL {self.kl_mean:.3g} nats, top-1 "
                           f"{100 * self.top1_agreement:.1f}%, cache {self.kv_bytes_ratio:.3f} of the original's"],
                          "original, compressed, continuations[i], to_json()")


# ------------------------------------------------------------------------------------------------ the run


def run_generate(source=None, cfg: GenerateConfig | None = None) -> GenerateResult:
    """Greedy continuations of the original model (``source``, a ModelSource; with ``cfg.compressed`` it may be
    left out: the directory's recorded original) with DynamicCache and of the compressed model with LatentCache,
    compared (:class:`GenerateResult`; the module docstring defines each number). ``cfg`` defaults to
    :class:`GenerateConfig`: k = head_dim / 4, plain latents on every layer, 32 tokens after the openings of the
    shipped eval texts."""
    from headlens.compress.pair import from_directory, on_the_fly
    from headlens.io.source import ModelSource

    cfg = GenerateConfig() if cfg is None else params.instance(cfg, "cfg", GenerateConfig,
                                                              "e.g. headlens.GenerateConfig(k=16)")
    cfg.check()
    if source is not None:
        params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-lm")')
    if cfg.compressed is not None:
        pair = from_directory(source, cfg)
    elif source is None:
        raise HeadlensError('`source` is required (e.g. headlens.ModelSource(embedded="tiny-lm")) unless '
                            "`compressed` names a compressed model directory")
    else:
        pair = on_the_fly(source, cfg)
    prompts, ids = _prompts(pair, cfg)
    return _compare(pair, prompts, ids, cfg)


def _prompts(pair: Pair, cfg: GenerateConfig) -> tuple[list[str], list[torch.Tensor]]:
    """The prompts and their (1, P) token ids: ``cfg.prompts``, or the first :data:`OPENING_TOKENS` tokens of the
    first :data:`DEFAULT_PROMPTS` eval texts shipped with the embedded model; each checked to fit the model's
    positions with the tokens to generate."""
    from headlens.io.source import quiet_transformers
    from headlens.residual.capture import max_positions

    tok = pair.tokenizer
    if cfg.prompts is None:
        if pair.embedded is None:
            raise HeadlensError("`prompts` is required: default prompts (openings of the shipped eval texts) exist "
                                "only for the embedded models")
        from headlens.io.embedded import default_texts

        openings = [opening(tok, t) for t in default_texts(pair.embedded).eval[:DEFAULT_PROMPTS]]
        with quiet_transformers():
            texts = [tok.decode(ids[0].tolist(), skip_special_tokens=True) for ids in openings]
        pair.notes.append(f"prompts: the first {OPENING_TOKENS} tokens of {len(texts)} eval texts shipped for "
                          f"{pair.embedded}")
    else:
        texts = list(cfg.prompts)
    limit = max_positions(pair.original.config)
    out = []
    for i, text in enumerate(texts):
        with quiet_transformers():
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
        if ids.shape[1] == 0:
            raise HeadlensError(f"prompt {i + 1} ({text!r}) has no tokens")
        if limit and ids.shape[1] + cfg.max_new_tokens > limit:
            raise HeadlensError(f"prompt {i + 1} has {ids.shape[1]} tokens: with `max_new_tokens` "
                                f"{cfg.max_new_tokens} that is {ids.shape[1] + cfg.max_new_tokens} positions, but the "
                                f"model takes at most {limit}")
        out.append(ids)
    return texts, out


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _compare(pair: Pair, prompts: list[str], ids_list: list[torch.Tensor], cfg: GenerateConfig) -> GenerateResult:
    from tqdm.auto import tqdm

    from headlens.io.source import quiet_transformers

    n, tok = cfg.max_new_tokens, pair.tokenizer
    original = CacheRun(pair.original_what, "DynamicCache")
    compressed = CacheRun(pair.compressed_what, "LatentCache")
    greedy(pair.original, ids_list[0], _dynamic(pair.original), 2)  # warm both up: the first pass pays once-only costs
    greedy(pair.compressed, ids_list[0], pair.latent_cache(), 2)
    continuations = []
    with tqdm(total=2 * n * len(prompts), desc="generating", unit="token", file=sys.stderr,
              disable=None if cfg.progress else True) as bar:
        for prompt, ids in zip(prompts, ids_list):
            a = greedy(pair.original, ids, _dynamic(pair.original), n)
            bar.update(n)
            b = greedy(pair.compressed, ids, pair.latent_cache(), n)
            bar.update(n)
            original.runs.append(a)
            compressed.runs.append(b)
            forced = torch.cat([ids, torch.tensor([a.tokens[:-1]], dtype=torch.long)], dim=1)
            p = next_token_logits(pair.original, forced, _dynamic(pair.original), n)
            q = next_token_logits(pair.compressed, forced, pair.latent_cache(), n)
            want = torch.tensor(a.tokens)
            with quiet_transformers():
                texts = [tok.decode(t, skip_special_tokens=True) for t in (a.tokens, b.tokens)]
            continuations.append(Continuation(prompt, int(ids.shape[1]), a.tokens, b.tokens, *texts,
                                              kl=kl_rows(p, q).tolist(), top1=(q.argmax(-1) == want).tolist()))
    dtype = str(next(pair.compressed.parameters()).dtype).replace("torch.", "")
    return GenerateResult(model=pair.model, latents=pair.latents, dtype=dtype, max_new_tokens=n, original=original,
                          compressed=compressed, continuations=continuations, notes=pair.notes)
