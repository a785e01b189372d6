"""The two models ``headlens generate`` compares, loaded: the original (run with ``DynamicCache``) and the compressed
one (run with :class:`~headlens.compress.cache.LatentCache`).

- :func:`on_the_fly`: the original checkpoint, compressed here: plans of size ``k`` (:func:`headlens.compress.plan.
  plan_layers`) give the cache its encoders, and the same loaded model runs both sides, since the LatentCache
  rebuilds the compressed model's values from the original's (``U_g E_g v``).
- :func:`from_directory`: a ``compress --save-model`` directory: the exported model with its factors; the original
  is the checkpoint passed in, else the one the directory records, else (when that cannot be read here) the exported
  model itself with DynamicCache, which then compares the cache and not the compression (a note says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from headlens.compress.generate import GenerateConfig
from headlens.errors import HeadlensError


@dataclass
class Pair:
    """The two sides of a comparison, loaded: their models, the tokenizer, and how to make a fresh LatentCache."""

    original: object
    compressed: object
    tokenizer: object
    latent_cache: Callable[[], object]
    model: dict
    latents: dict
    original_what: str
    compressed_what: str
    embedded: str | None  # the embedded model whose shipped texts give the default prompts
    notes: list[str] = field(default_factory=list)


def check_decoder(model_type: str | None, name: str) -> None:
    """Refuse an encoder: it keeps no KV cache and generates nothing."""
    from headlens.arch import SPECS

    spec = SPECS.get(model_type or "")
    if spec is not None and not spec.decoder:
        raise HeadlensError(f"{name} is an encoder ({spec.family}): it keeps no KV cache and generates no text; "
                            "generate needs a decoder (compress measures an encoder's value latents)")


def _describe(config, dtype) -> str:
    return f"{getattr(config, 'model_type', '?')}, {str(dtype).replace('torch.', '')}"


def on_the_fly(source, cfg: GenerateConfig) -> Pair:
    """The original model and a LatentCache of plans fitted here (``cfg.k``, ``cfg.latent``, ``cfg.layers``)."""
    from headlens.compress.cache import LatentCache, encoders
    from headlens.compress.plan import plan_layers
    from headlens.compress.texts import shipped_model
    from headlens.residual.capture import capture_attention_inputs, max_positions
    from headlens.selection import parse_layers

    ck = source.checkpoint(full=True, roles=("q", "k", "v", "o", "qkv", "norm"))
    if ck.directory is None:
        raise HeadlensError("generate runs the model: pass a HuggingFace model directory (config.json, weights and "
                            "tokenizer), an embedded `model`, or `hf_repo`")
    check_decoder(ck.shape.model_type, ck.name)
    s = ck.shape
    layers = parse_layers(cfg.layers, s.num_layers)
    k = s.head_dim // 4 if cfg.k is None else cfg.k
    if k > s.head_dim:
        raise HeadlensError(f"`k` {k} is above head_dim {s.head_dim}: a kv group's latent holds 0..{s.head_dim} "
                            "numbers")
    kind = cfg.latent or "plain"
    dtype = source.dtype(cfg.dtype, ck.config)
    tok = source.tokenizer(ck.directory)
    model = source.lm_model(ck.directory, dtype)
    if model.get_output_embeddings() is None:
        raise HeadlensError(f"{ck.name} loads without a language-model head: generate needs a causal LM")
    embedded = shipped_model(source)
    notes = []
    X = None
    if kind == "data-aware":
        calib = cfg.calib_texts
        if calib is None:
            if embedded is None:
                raise HeadlensError("data-aware latents need `calib_texts` (calibration texts), or pass `latent` "
                                    "plain")
            from headlens.io.embedded import default_texts

            calib = default_texts(embedded).calib
            notes.append(f"calibration texts: {len(calib)} shipped for {embedded}")
        X, n = capture_attention_inputs(model, tok, ck.spec, calib, layers, cfg.max_calib_tokens,
                                        max_positions(ck.config or {}))
        if n < 4:
            raise HeadlensError(f"the calibration texts give {n} tokens: data-aware latents need at least 4")
    plans = plan_layers(ck, {layer: k for layer in layers}, kind, X, dtype)
    X = None
    latents = encoders(model, ck, plans)  # each encoder checked once (the rank condition)
    if k == 0:
        notes.append("k = 0: the compressed layers cache no values (their attention writes only the value bias)")
    what = f"{kind} k={k}" + ("" if len(layers) == s.num_layers else f" on layers {','.join(map(str, layers))}")
    return Pair(original=model, compressed=model, tokenizer=tok,
                latent_cache=lambda: LatentCache(latents, model.config),
                model={"name": ck.name, "source": ck.source, "family": ck.spec.family},
                latents={"what": what, "kind": kind, "source": "fitted here",
                         "ks": {str(p.layer): list(p.ks) for p in plans}, "latent_dims": sum(sum(p.ks) for p in plans)},
                original_what=f"{ck.name} ({_describe(model.config, dtype)})",
                compressed_what=f"{ck.name} + value latents {what}", embedded=embedded, notes=notes)


def from_directory(source, cfg: GenerateConfig) -> Pair:
    """The exported model of ``cfg.compressed`` with its LatentCache, against ``source`` (the original) when given,
    else the checkpoint the directory records."""
    from headlens.compress.cache import LatentCache, read_latents
    from headlens.compress.exported import read_record, recorded_source
    from headlens.io.checkpoint import read_config
    from headlens.io.embedded import EMBEDDED
    from headlens.io.source import ModelSource

    directory = Path(cfg.compressed)  # type: ignore[arg-type]
    record = read_record(directory)
    config = read_config(directory / "config.json")
    check_decoder(config.get("model_type"), f"`compressed` {directory}")
    device = cfg.device if cfg.device is not None else (source.device if source is not None else None)
    placed = {k: getattr(source, k) for k in ("device_map", "max_memory", "offload_dir")} if source is not None else {}
    exported = ModelSource(weights=directory, device=device, **placed)  # where the original goes, if given
    dtype = exported.dtype(cfg.dtype, config)
    model = exported.lm_model(directory, dtype)
    tok = exported.tokenizer(directory)
    if model.get_output_embeddings() is None:
        raise HeadlensError(f"`compressed` {directory} loads without a language-model head: generate needs a causal "
                            "LM")
    latents, cache_config, cache_notes, key_latents = read_latents(directory, model, with_keys=True)  # checked
    # against the exported model
    notes = list(cache_notes)
    src = record.get("source") if isinstance(record.get("source"), dict) else {}
    name = str(src.get("name") or directory.name)
    if source is not None:
        original_source, what = source, None
    else:
        original_source, what = recorded_source(record, device)
    if original_source is not None:
        _, original_dir, original_config = original_source.model_dir()
        original = original_source.lm_model(original_dir, dtype)
        where = what or str(original_dir)
        _check_same_model(original.config, model.config, where, directory)
        original_what = f"{where} ({_describe(original.config, dtype)})"
    else:
        original = model
        original_what = f"the exported model {directory} ({_describe(model.config, dtype)})"
        notes.append(f"the original, {what}, cannot be read here: the original side is the exported model with "
                     "DynamicCache, so this compares LatentCache with DynamicCache on the same weights (the cache), "
                     "not the compressed model with the original (the compression)")
    ks = {str(layer): lat.ks for layer, lat in sorted(latents.items())}
    kinds = sorted({str(entry.get("kind")) for entry in record["layers"] if isinstance(entry, dict)})
    info = record.get("info") if isinstance(record.get("info"), dict) else {}
    embedded = name if name in EMBEDDED and EMBEDDED[name].decoder else None
    if source is not None:
        from headlens.compress.texts import shipped_model

        embedded = shipped_model(source)
    return Pair(original=original, compressed=model, tokenizer=tok,
                latent_cache=lambda: LatentCache(latents, cache_config, list(cache_notes), key_latents=key_latents or None,
                                                 model=model),
                model={"name": name, "source": str(src.get("source") or ""), "compressed": str(directory)},
                latents={"what": str(info.get("configuration") or "/".join(kinds)), "kind": "/".join(kinds),
                         "source": str(directory), "ks": ks, "latent_dims": sum(sum(v) for v in ks.values())},
                original_what=original_what, compressed_what=f"the exported model {directory}", embedded=embedded,
                notes=notes)


def _check_same_model(original, exported, where: str, directory: Path) -> None:
    """Refuse an original that is not the architecture and vocabulary the compressed model was made from."""
    a = (getattr(original, "model_type", None), getattr(original, "vocab_size", None),
         getattr(original, "num_hidden_layers", None), getattr(original, "hidden_size", None))
    b = (getattr(exported, "model_type", None), getattr(exported, "vocab_size", None),
         getattr(exported, "num_hidden_layers", None), getattr(exported, "hidden_size", None))
    if a != b:
        raise HeadlensError(f"the original {where} (model_type, vocab, layers, hidden size {a}) is not the model "
                            f"`compressed` {directory} was made from {b}")
