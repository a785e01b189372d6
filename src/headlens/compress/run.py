"""``headlens compress`` as a library call: fit the latents, measure every configuration, return the result.

:func:`run_compress` opens the model once, captures the calibration tokens (one pass over ``calib`` texts, for
data-aware latents), fits each layer's full-size latents per kind (:func:`headlens.compress.allocate.full_plans`),
cuts them to each configuration's sizes and measures all configurations together on the eval texts
(:func:`headlens.compress.measure.measure_many`: one original pass per text, then per configuration the isolated
re-runs and one compressed pass).

Configurations (:mod:`headlens.compress.configs`): per budget value (``target_errors``, ``target_energies``, one
``budget`` file, or uniform sizes ``ks``) and latent kind, the budgeted allocation and, always, the uniform allocation
with the same total KV bytes (for ``ks`` the configuration is itself uniform); with ``keys``, the keys alone and keys
with values too, fitted by :func:`_key_plans` in the same calibration pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from headlens import params
from headlens.compress.allocate import cut_all, full_plans, read_budget
from headlens.compress.configs import (Configuration, allocated_configurations, budget_keys, configurations,
                                       frequency_notes, key_configurations, zero_notes)
from headlens.compress.heldout import held_out_errors
from headlens.compress.heldout import warnings as heldout_warnings
from headlens.compress.keys import cut_keys
from headlens.compress.measure import Measurement, measure_many
from headlens.compress.plan import LATENT_KINDS
from headlens.errors import HeadlensError
from headlens.selection import DTYPE_CHOICES

MIN_EVAL_TOKENS = 4  # an eval text needs a few tokens: 3 next-token predictions at the least


def _in_unit(values: Sequence[float] | None, name: str) -> None:
    for v in values or ():
        if not (math.isfinite(v) and 0 < v < 1):
            raise HeadlensError(f"`{name}` {v:g}: a target lies strictly between 0 and 1")


@dataclass
class CompressConfig:
    """What to compress and how. Exactly one budget source: ``target_errors`` (default
    :data:`~headlens.compress.configs.DEFAULT_TARGET_ERRORS` when none is given), ``target_energies``, ``ks`` or ``budget``. One value stands
    for a list of one (``ks=16``, ``latents="plain"``); a wrong type is one HeadlensError naming the field."""

    layers: str | Sequence[int] | None = None  # layer selection ("0:4", "1,3", a list); None: every layer
    target_errors: Sequence[float] | float | None = None  # per kv group the smallest latent with error <= each
    target_energies: Sequence[float] | float | None = None  # or with kept energy >= each
    ks: Sequence[int] | int | str | None = None  # uniform latent sizes (0..head_dim), each its own configuration
    budget: str | os.PathLike | None = None  # a sweep_budget.csv made by `headlens sweep` for this model
    latents: Sequence[str] | str = LATENT_KINDS  # plain, data-aware, or both
    kv_bytes: int = 2  # bytes per cached number
    max_calib_tokens: int = 2048
    truncate: bool = False
    dtype: str = "auto"  # auto (float32 on the CPU, the checkpoint's on an accelerator), float32, ...
    generate: int | None = None  # per configuration, this many greedy tokens with its LatentCache (decoders only)
    keys: str = "none"  # key latents: none (values only), plain (weights) or data-aware (calibration queries/keys)
    key_ks: Sequence[int] | int | str | None = None  # key latent sizes: one for all, or one per budget value
    savings: Sequence[float] | float | None = None  # budget: a saving of the whole KV cache (keys and values), each
    kv_budget: float | None = None  # budget: KV bytes per token of the whole cache
    allocate: str | None = None  # how a budget's bytes are spent (ALLOCATIONS); None: the budget's own rule
    # (a target's error or energy, greedy for `savings` and `kv_budget`)

    def __post_init__(self) -> None:
        self._coerce()

    def _coerce(self) -> None:
        """Each field in its one form (lists as lists), or a HeadlensError naming the field and the type expected."""
        self.layers = params.selection(self.layers, "layers")
        for name in ("target_errors", "target_energies"):
            if getattr(self, name) is not None:
                setattr(self, name, params.numbers(getattr(self, name), name))
        if isinstance(self.ks, str):
            from headlens.selection import _int_list

            self.ks = _int_list(self.ks, "ks", "give whole latent sizes separated by commas, e.g. 16,32")
        elif self.ks is not None:
            self.ks = params.integers(self.ks, "ks")
        self.budget = params.path(self.budget, "budget")
        kinds = params.choices(self.latents, "latents", (*LATENT_KINDS, "both"))
        self.latents = list(dict.fromkeys(k for kind in kinds for k in (LATENT_KINDS if kind == "both" else (kind,))))
        for name in ("kv_bytes", "max_calib_tokens"):
            setattr(self, name, params.integer(getattr(self, name), name))
        self.truncate = params.flag(self.truncate, "truncate")
        self.dtype = params.choice(self.dtype, "dtype", DTYPE_CHOICES)
        self.generate = params.integer(self.generate, "generate", optional=True)
        from headlens.compress.keys import KEY_KINDS

        self.keys = params.choice(self.keys, "keys", KEY_KINDS)
        if isinstance(self.key_ks, str):
            from headlens.selection import _int_list

            self.key_ks = _int_list(self.key_ks, "key_ks", "give whole key latent sizes separated by commas, e.g. 8,16")
        elif self.key_ks is not None:
            self.key_ks = params.integers(self.key_ks, "key_ks")
        if self.savings is not None:
            self.savings = params.numbers(self.savings, "savings")
        if self.kv_budget is not None:
            one = params.numbers(self.kv_budget, "kv_budget")
            if len(one) != 1:
                raise HeadlensError(f"`kv_budget` takes one number of bytes per token, got {len(one)}")
            self.kv_budget = one[0]
        if self.allocate is not None:
            from headlens.compress.allocation import ALLOCATIONS

            self.allocate = params.choice(self.allocate, "allocate", ALLOCATIONS)

    def validate(self) -> None:
        self._coerce()  # fields may have been set after construction
        given = [n for n, v in (("target_errors", self.target_errors), ("target_energies", self.target_energies),
                                ("ks", self.ks), ("budget", self.budget), ("savings", self.savings),
                                ("kv_budget", self.kv_budget is not None)) if v]
        if len(given) > 1:
            raise HeadlensError(f"give one budget: {' or '.join('`' + g + '`' for g in given)}, not several")
        for name in ("target_errors", "target_energies", "ks", "savings"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise HeadlensError(f"`{name}` is empty: give at least one value, or leave it out (None)")
        _in_unit(self.target_errors, "target_errors")  # type: ignore[arg-type]
        _in_unit(self.target_energies, "target_energies")  # type: ignore[arg-type]
        _in_unit(self.savings, "savings")  # type: ignore[arg-type]
        if self.kv_budget is not None and not (math.isfinite(self.kv_budget) and self.kv_budget > 0):
            raise HeadlensError(f"`kv_budget` {self.kv_budget:g}: KV bytes per token are positive")
        if self.allocate is not None and self.budget_kind() in ("k", "file"):
            raise HeadlensError(f"`allocate` {self.allocate} spends a budget of bytes: give `savings`, `kv_budget` "
                                "or a target (`target_errors`, `target_energies`), not "
                                + ("`ks`" if self.ks else "`budget`"))
        for k in self.ks or ():  # type: ignore[union-attr]
            if k < 0:
                raise HeadlensError(f"`ks` {k}: a latent size is a whole number, 0..head_dim")
        if not self.latents:
            raise HeadlensError("`latents` is empty: choose plain, data-aware or both")
        if not 1 <= self.kv_bytes <= 8:
            raise HeadlensError(f"`kv_bytes` {self.kv_bytes}: bytes per cached value are 1..8")
        if self.max_calib_tokens < 4:
            raise HeadlensError(f"`max_calib_tokens` {self.max_calib_tokens}: at least 4")
        if self.key_ks is not None:
            if self.keys == "none":
                raise HeadlensError("`key_ks` sizes key latents: choose `keys` plain or data-aware too")
            if not self.key_ks or any(k < 0 for k in self.key_ks):  # type: ignore[union-attr]
                raise HeadlensError(f"`key_ks` {self.key_ks}: give key latent sizes, whole numbers 0..head_dim")
        if self.generate is not None and self.generate < 1:
            raise HeadlensError(f"`generate` {self.generate}: generate at least 1 token, or leave it out (None)")

    def budget_kind(self) -> str:
        return ("target-energy" if self.target_energies else "k" if self.ks else "file" if self.budget
                else "saving" if self.savings else "kv-budget" if self.kv_budget is not None else "target-error")

    def allocation(self) -> str:
        """How the budget's bytes are spent: ``allocate``, else the budget's own rule (a target's error or energy,
        uniform for ``ks``, greedy for a budget of bytes: it beat uniform at every saving measured, bench_allocate)."""
        if self.allocate is not None:
            return self.allocate
        return {"target-error": "error", "target-energy": "energy", "saving": "greedy",
                "kv-budget": "greedy"}.get(self.budget_kind(), "uniform")

    def needs_calibration(self) -> bool:
        return self.calibration_reason() is not None

    def calibration_reason(self) -> str | None:
        """Why the run needs calibration texts (None: it does not)."""
        if "data-aware" in self.latents or self.keys == "data-aware":
            return "data-aware latents"
        if self.allocation() in ("fisher", "greedy"):
            return f"the {self.allocation()} allocation"
        return None


@dataclass
class CompressResult:
    """What :func:`run_compress` measured: per configuration (``configurations[i]``) its :class:`Measurement`
    (``measurements[i]``: per-layer errors, KL, top-1, perplexity or embedding cosine, KV bytes). ``to_json()``
    is ``compress_summary.json``; ``print(result)`` shows one line per configuration."""

    model: dict  # the checkpoint's description and weights digest
    name: str
    task: str  # causal-lm or embedding
    layers: list[int]
    config: CompressConfig
    calibration_tokens: int
    ridge: dict[int, float]  # layer -> ridge added to X X^T for the data-aware latents (0.0: none needed)
    configurations: list[Configuration]
    measurements: list[Measurement]  # one per configuration
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went
    kept: tuple | None = field(default=None, repr=False)  # (model, ck, tokenizer, plans per configuration, key plans
    # per configuration) when kept
    cache_checks: list | None = None  # with `generate`: per configuration its LatentCache measured (CacheCheck)
    generate_prompt: str | None = None  # the prompt of those generations
    notes: list[str] = field(default_factory=list)  # what the run chose or removed (shipped texts, k = 0 groups)
    heldout: dict = field(default_factory=dict)  # configuration name -> its errors on held-out calibration tokens

    def pairs(self) -> list[tuple[Configuration, Measurement]]:
        return list(zip(self.configurations, self.measurements))

    def to_json(self) -> dict:
        """Everything measured as strict JSON data: what ``compress_summary.json`` holds
        (:func:`headlens.compress.summary.summary`; a perplexity beyond float64 is null with a flag)."""
        from headlens.compress.summary import summary

        return summary(self)

    def __repr__(self) -> str:
        from headlens.results import short_repr

        lines = []
        for c, m in self.pairs():
            what = (f"KL {m.kl_mean:.4f} nats, ppl {m.ppl_before:.4g} -> {m.ppl_after:.4g}" if m.kl_mean is not None
                    else f"cosine {m.embedding_cosine_mean:.4f}" if m.embedding_cosine_mean is not None else "")
            lines.append(f"{c.name}: {100 * m.kv.saving:.1f}% of the KV cache saved; {what}")
        return short_repr(self, f"{self.name} ({self.task}): {len(self.configurations)} configuration(s) on "
                                f"{len(self.layers)} layer(s)", lines, "configurations[i], measurements[i], notes, "
                                "to_json(), save_model(name, dir), latent_cache(name)")

    def save_model(self, name: str, out_dir, info: dict | None = None):
        """Write configuration ``name`` as a compressed HuggingFace directory
        (:func:`headlens.compress.apply.save_compressed_model`); needs ``run_compress(..., keep_model=True)``."""
        from headlens.compress.apply import save_compressed_model

        if self.kept is None:
            raise HeadlensError("the model was not kept: run with `keep_model` to save a configuration")
        names = [c.name for c in self.configurations]
        if name not in names:
            raise HeadlensError(f"no configuration {name!r}: choose one of {', '.join(names)}")
        model, ck, tok, plans, key_plans = self.kept
        i = names.index(name)
        return save_compressed_model(model, ck, list(plans[i].values()), out_dir, tokenizer=tok, info=info,
                                     key_plans=key_plans[i] or None)

    def latent_cache(self, name: str):
        """A fresh :class:`~headlens.compress.cache.LatentCache` of configuration ``name`` for the kept model
        (``kept[0]``, its original value weights): ``model.generate(ids, past_key_values=result.latent_cache(name))``
        runs the compressed model with a cache holding ``sum_g k_g`` numbers per token and layer for the values.
        Needs ``run_compress(..., keep_model=True)``."""
        from headlens.compress.cache import LatentCache

        if self.kept is None:
            raise HeadlensError("the model was not kept: run with `keep_model` True to build a configuration's "
                                "LatentCache")
        names = [c.name for c in self.configurations]
        if name not in names:
            raise HeadlensError(f"no configuration {name!r}: choose one of {', '.join(names)}")
        model, ck, _, plans, key_plans = self.kept
        keys = key_plans[names.index(name)]
        if keys:
            return LatentCache.from_plans(model, ck, list(plans[names.index(name)].values()),
                                          key_latents={layer: p.cache_latents() for layer, p in keys.items()})
        return LatentCache.from_plans(model, ck, list(plans[names.index(name)].values()))


def run_compress(source, cfg: CompressConfig | None = None, eval_texts: Sequence[str] | str | None = None,
                 calib_texts: Sequence[str] | str | None = None, *, on_start: Callable[[dict], None] | None = None,
                 disable: bool | None = None, keep_model: bool = False) -> CompressResult:
    """Fit, put in and measure the latents ``cfg`` describes (default :class:`CompressConfig`: error targets
    0.1, 0.2, 0.4, plain and data-aware) on ``source`` (a ModelSource), on ``eval_texts`` (never used to fit),
    with ``calib_texts`` for data-aware latents. For an embedded model either may be left out: the texts shipped
    with it are used (:func:`headlens.io.embedded.default_texts`; ``result.notes`` says so). ``on_start`` gets a
    dict describing the run before the eval passes; ``keep_model`` keeps the loaded model in the result, for
    :meth:`CompressResult.save_model`. With ``cfg.generate`` (decoders) each configuration also generates that many
    greedy tokens after the opening of the first eval text with its
    :class:`~headlens.compress.cache.LatentCache`, whose bytes per token, read from its tensors, are checked against
    the planned ones (``result.cache_checks``). Returns a :class:`CompressResult`."""
    from headlens.circuits.sweep_parts import weights_digest
    from headlens.compress.texts import compress_texts
    from headlens.io.source import ModelSource, check_text_lengths
    from headlens.residual.capture import capture_attention_inputs, max_positions
    from headlens.selection import parse_layers

    params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-lm")')
    cfg = CompressConfig() if cfg is None else params.instance(cfg, "cfg", CompressConfig,
                                                              "e.g. headlens.CompressConfig(ks=[16])")
    cfg.validate()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    texts = compress_texts(source, cfg.needs_calibration(), eval_texts, calib_texts, cfg.calibration_reason())
    eval_texts, calib_texts, notes = texts.eval, texts.calib, list(texts.notes)
    ck = source.checkpoint(full=True, roles=("q", "k", "v", "o", "qkv", "norm"))
    if ck.directory is None:
        raise HeadlensError("compress runs the model: pass a HuggingFace model directory (config.json, weights and "
                            "tokenizer), an embedded `model`, or `hf_repo`")
    s = ck.shape
    if cfg.generate and not ck.spec.decoder:
        raise HeadlensError(f"`generate` {cfg.generate}: {ck.name} is an encoder ({ck.spec.family}): it keeps no KV "
                            "cache and generates no text; leave `generate` out")
    layers = parse_layers(cfg.layers, s.num_layers)
    for k in cfg.ks or ():
        if k > s.head_dim:
            raise HeadlensError(f"`ks` {k} is above head_dim {s.head_dim}: a kv group's latent holds "
                                f"0..{s.head_dim} numbers")
    digest = weights_digest(ck)
    budget_ks = read_budget(cfg.budget, ck, digest, tuple(cfg.latents)) if cfg.budget else None
    dtype = source.dtype(cfg.dtype, ck.config)  # auto: float32 on the CPU, the checkpoint's on an accelerator
    cfg = dataclasses.replace(cfg, dtype=str(dtype).replace("torch.", ""))
    tok = source.tokenizer(ck.directory)
    limit = max_positions(ck.config or {})
    check_text_lengths(tok, eval_texts, limit, cfg.truncate, "eval text")
    _check_short(tok, eval_texts)
    model = source.lm_model(ck.directory, dtype, edits="compress")  # value weights are replaced in place
    seconds["load"] = time.perf_counter() - t0
    X: dict[int, torch.Tensor] = {}
    n_calib = 0
    key_ctx = contextlib.nullcontext(None)
    if cfg.keys != "none":
        from headlens.compress.key_attention import key_attention

        key_ctx = key_attention(model, ck, layers)
    with key_ctx as key_state:
        if key_state is not None:
            key_state.probe(model)  # the layers' rotary structure, checked
            key_state.start("capture")
        if cfg.needs_calibration():
            t = time.perf_counter()
            check_text_lengths(tok, calib_texts, limit, cfg.truncate, "calibration text", cfg.max_calib_tokens)  # type: ignore[arg-type]
            X, n_calib = capture_attention_inputs(model, tok, ck.spec, calib_texts, layers, cfg.max_calib_tokens, limit)  # type: ignore[arg-type]
        key_full = _key_plans(model, ck, layers, cfg.keys, key_state) if key_state is not None else {}
    if cfg.needs_calibration():
        if n_calib < 4:
            raise HeadlensError(f"the calibration texts give {n_calib} tokens: data-aware latents need at least 4")
        seconds["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    full = {kind: full_plans(ck, layers, kind, X if kind == "data-aware" else None, dtype) for kind in cfg.latents}
    seconds["fit"] = time.perf_counter() - t
    if cfg.budget_kind() in ("saving", "kv-budget") or cfg.allocate is not None:  # a budget of bytes, allocated
        confs = allocated_configurations(cfg, model, ck, tok, full, key_full, layers, texts.calib, POSITION_BYTES,
                                         seconds, disable)
    else:
        confs = configurations(cfg, full, ck, budget_ks, None if cfg.budget is None else str(cfg.budget))
        if key_full:
            confs = confs + key_configurations(cfg, confs, key_full, ck, budget_keys(cfg, ck, digest), notes)
    heldout = {}
    if "data-aware" in cfg.latents:
        t = time.perf_counter()
        heldout = held_out_errors(ck, X, confs, full.get("plain"), dtype)
        notes += heldout_warnings(heldout, n_calib)
        seconds["heldout"] = time.perf_counter() - t
    X.clear()
    ridge = {layer: max(g.ridge for g in p.groups) for layer, p in full.get("data-aware", {}).items()}
    removed = zero_notes(confs)
    notes += removed
    if on_start is not None:
        on_start({"name": ck.name, "shape": s, "layers": layers, "calibration_tokens": n_calib,
                  "eval_texts": len(eval_texts), "configurations": len(confs), "notes": removed})
    # identical (kind, sizes, key sizes) are measured once
    keys = [(c.latent if c.ks else None, tuple((layer, tuple(v)) for layer, v in sorted(c.ks.items())),
             tuple((layer, tuple(v)) for layer, v in sorted((c.key_ks or {}).items()))) for c in confs]
    unique = list(dict.fromkeys(keys))
    plan_sets = [cut_all(full[kind], dict((layer, list(v)) for layer, v in sizes)) if kind else {}
                 for kind, sizes, _ in unique]
    key_sets = [{layer: cut_keys(key_full[layer], list(v)) for layer, v in ksz} for _, _, ksz in unique]
    t = time.perf_counter()
    measured = measure_many(model, ck, tok, plan_sets, eval_texts, bytes_per_value=cfg.kv_bytes,
                            truncate=cfg.truncate, disable=disable, key_plans=key_sets,
                            position_bytes=POSITION_BYTES)
    seconds["eval"] = time.perf_counter() - t
    by_key = dict(zip(unique, measured))
    plans_of = dict(zip(unique, plan_sets))
    key_plans_of = dict(zip(unique, key_sets))
    checks, prompt = None, None
    if cfg.generate:
        t = time.perf_counter()
        checks_of, prompt = _check_caches(model, ck, tok, eval_texts[0], unique, plan_sets, key_sets, measured, cfg,
                                          disable)
        checks = [checks_of[k] for k in keys]
        seconds["generate"] = time.perf_counter() - t
    notes += frequency_notes(confs, [by_key[k] for k in keys])
    seconds["total"] = time.perf_counter() - t0
    return CompressResult(model={**ck.describe(), "weights_digest": digest}, name=ck.name, task=measured[0].task,
                          layers=layers, config=cfg, calibration_tokens=n_calib, ridge=ridge, configurations=confs,
                          measurements=[by_key[k] for k in keys], seconds=seconds,
                          kept=(model, ck, tok, [plans_of[k] for k in keys], [key_plans_of[k] for k in keys])
                          if keep_model else None,
                          cache_checks=checks, generate_prompt=prompt, notes=notes, heldout=heldout)


def _check_caches(model, ck, tok, text: str, unique: list, plan_sets: list, key_sets: list, measured: list,
                  cfg: CompressConfig, disable: bool | None) -> tuple[dict, str]:
    """({configuration key: CacheCheck}, the prompt): each distinct configuration generates ``cfg.generate`` greedy
    tokens after the opening of ``text`` with its LatentCache (:func:`headlens.compress.decode.check_cache`)."""
    import sys

    from tqdm.auto import tqdm

    from headlens.compress.decode import check_cache, opening
    from headlens.io.source import quiet_transformers

    ids = opening(tok, text)
    with quiet_transformers():
        prompt = tok.decode(ids[0].tolist(), skip_special_tokens=True)
    out = {}
    n = int(cfg.generate)  # type: ignore[arg-type]
    with tqdm(total=n * len(unique), desc="generating", unit="token", file=sys.stderr, disable=disable) as bar:
        for key, plans, kp, m in zip(unique, plan_sets, key_sets, measured):
            out[key] = check_cache(model, ck, tok, ids, list(plans.values()), n, m.kv.total_after, cfg.kv_bytes,
                                   key_plans=kp)
            bar.update(n)
    return out, prompt


POSITION_BYTES = 4  # per cached token: the int32 position a rotary key latent is turned back by


def _key_plans(model, ck, layers: list[int], kind: str, state) -> dict:
    """Full-size key plans per layer (k = head_dim): from the captured moments (data-aware) or the weights."""
    from headlens.compress.keys import plain_moments, plan_keys

    out = {}
    if kind == "data-aware":
        for layer, m in state.key_moments().items():
            out[layer] = plan_keys(m, kind)
    else:
        for layer in layers:
            info = state.info[layer]
            m = plain_moments(model, ck, layer, info.rotary, info.pairs, bias_subtracted=state.bias.get(layer) is not None)
            out[layer] = plan_keys(m, kind)
    missing = [layer for layer in layers if layer not in out]
    if missing:
        raise HeadlensError(f"layer {missing[0]}'s attention was not called in the calibration passes: no key latent")
    return out


def _check_short(tok, texts: list[str]) -> None:
    from headlens.io.source import quiet_transformers

    for i, text in enumerate(texts):
        with quiet_transformers():
            n = len(tok(text)["input_ids"])
        if n < MIN_EVAL_TOKENS:
            preview = text if len(text) <= 40 else text[:37] + "..."
            raise HeadlensError(f"eval text {i + 1} ({preview!r}) has {n} token(s): every eval text needs at least "
                                f"{MIN_EVAL_TOKENS}")
