"""A ``compress --save-model`` directory read back: the exported model, its tokenizer, and the model it came from.

:func:`load_compressed` is ``headlens.load_compressed(DIR)``: the model and tokenizer of the directory, the model in
the type it is stored in and in eval mode, checked against the latent factors next to it, so that
``model.generate(ids, past_key_values=LatentCache.from_pretrained(DIR))`` runs. :func:`recorded_source` finds the
original checkpoint that ``headlens_latent.json`` names (``source``), where it can still be read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from headlens import params
from headlens.errors import HeadlensError


def read_record(compressed: str | os.PathLike) -> dict:
    """``headlens_latent.json`` of the directory ``compressed`` (the plan and where the model came from), checked to
    be one ``compress --save-model`` wrote with its factors and model files beside it; HeadlensError otherwise."""
    from headlens.compress.apply import FACTORS_FILE, LATENT_PLAN_FILE

    params.path(compressed, "compressed", optional=False)
    d = Path(compressed)
    if not d.is_dir():
        raise HeadlensError(f"`compressed` {d}: no such directory")
    path = d / LATENT_PLAN_FILE
    if not path.is_file():
        raise HeadlensError(f"`compressed` {d} has no {LATENT_PLAN_FILE}: it is not a directory "
                            "`compress --save-model` wrote")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("layers"), list):
            raise ValueError("no list of layers")
    except (OSError, ValueError) as exc:
        raise HeadlensError(f"{path} is not a latent plan ({exc})") from None
    missing = [name for name in ("config.json", FACTORS_FILE) if not (d / name).is_file()]
    if not any(p.name != FACTORS_FILE for p in d.glob("*.safetensors")):
        missing.append("the model weights (*.safetensors)")
    if missing:
        raise HeadlensError(f"`compressed` {d} lacks {', '.join(missing)}: it is not a complete directory "
                            "`compress --save-model` wrote")
    return record


def stored_dtype(config: dict) -> torch.dtype:
    """The float type config.json says the weights are stored in (``dtype`` / ``torch_dtype``), float32 if none."""
    from headlens.io.placement import DTYPE_NAMES

    named = config.get("dtype") or config.get("torch_dtype")
    return DTYPE_NAMES.get(str(named).replace("torch.", ""), torch.float32)


def load_compressed(compressed: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: str | None = None):
    """(model, tokenizer) of a ``compress --save-model`` directory: the exported model (value weights replaced by
    ``W_V^g Q_g``) as its family's causal LM, in eval mode, in ``dtype`` (None: the type it is stored in, config.json's
    ``dtype``; ``"auto"``: float32 on the CPU) on ``device`` (None: ``$HEADLENS_DEVICE``, else the CPU or CUDA), ready
    for ``model.generate(ids, past_key_values=headlens.LatentCache.from_pretrained(compressed))``.

    The latent factors are checked against the model (layers, kv heads, head_dim, hidden size, ``E_g U_g = I``): a
    directory without ``headlens_latent.json``, its factors or its weights, or with factors of another model, is
    one HeadlensError."""
    from headlens.compress.cache import LatentCache
    from headlens.io.checkpoint import read_config
    from headlens.io.source import ModelSource

    read_record(compressed)
    directory = Path(compressed)
    config = read_config(directory / "config.json")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        from headlens.selection import DTYPE_CHOICES

        dtype = params.choice(dtype, "dtype", DTYPE_CHOICES)
    source = ModelSource(weights=directory, device=params.text(device, "device"))
    want = stored_dtype(config) if dtype is None else source.dtype(dtype, config)
    model = source.lm_model(directory, want)
    LatentCache.from_pretrained(directory, model)  # the factors fit this model, or one line saying why not
    return model, source.tokenizer(directory)


def recorded_source(record: dict, device: str | None = None):
    """(a ModelSource for the checkpoint ``record["source"]`` names, or None where it cannot be read here; a few
    words naming it). An embedded model is found by its name, a hub repo through the local hub cache, a local
    directory at its path."""
    from headlens.io.embedded import NAMES, embedded_dir
    from headlens.io.source import ModelSource

    src = record.get("source") if isinstance(record.get("source"), dict) else {}
    name, where = str(src.get("name") or "?"), str(src.get("source") or "")
    if name in NAMES:
        try:
            if not where or Path(where).resolve() == embedded_dir(name).resolve() or not Path(where).exists():
                return ModelSource(embedded=name, device=device), f"the embedded {name}"
        except (HeadlensError, OSError):
            pass
    if where.startswith("hub:"):
        repo, _, revision = where[4:].partition("@")
        try:
            source = ModelSource(hf_repo=repo, revision=revision or None, device=device)
            source.peek_config()  # its config.json, from the local cache or the hub
            return source, f"{repo}" + (f"@{revision}" if revision else "")
        except HeadlensError:
            return None, f"{repo} (not in the local hub cache)"
    if where and (Path(where) / "config.json").is_file():
        return ModelSource(weights=where, device=device), where
    return None, f"{name} ({where or 'no path recorded'}: not found)"
