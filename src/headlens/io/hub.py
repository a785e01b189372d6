"""The HuggingFace hub through its local cache: find or download only the files of a repo that are needed.

:class:`HubRepo` fetches single files and snapshots, offline when ``HF_HUB_OFFLINE`` is set or the hub cannot
be reached (one quick TCP connect decides, so an unreachable hub fails in seconds, not after retries).
:func:`hub_tensors` opens a repo's weights lazily, downloading only the shards that hold the layers asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from headlens.arch import KeyMap, spec_for_type
from headlens.errors import HeadlensError
from headlens.io.quantized import logical_names, stored_names
from headlens.io.tensors import (
    SafetensorsSource,
    StateDictSource,
    TensorSource,
    open_path,
    read_safetensors_index,
)

# What a forward pass needs from a repo: config, weights, tokenizer files.
FULL_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


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
        f"`weights` DIR [{why}]"
    )


class HubRepo:
    """Downloads (or finds in the local cache) only the files of a hub repo that are needed."""

    def __init__(self, repo: str, revision: str | None, cache_dir: str | None):
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise HeadlensError(f"`hf_repo` {repo!r} is not a hub repo id of the form ORG/NAME")
        self.repo, self.revision, self.cache_dir = repo, revision, cache_dir

    def file(self, filename: str, required: bool = True) -> Path | None:
        """The local path of ``filename`` in the repo; None when it is absent and not ``required``."""
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
        """The local snapshot directory holding the repo's files that match ``patterns``."""
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


def hub_tensors(hub: HubRepo, snapshot: Path, model_type: str | None, layers: list[int] | None, full: bool,
                roles: tuple[str, ...] = ("v", "o", "qkv", "norm")) -> tuple[TensorSource, Path, list[str]]:
    """(tensors, snapshot directory, every tensor name of a sharded repo or []) of the repo whose config.json
    lies in ``snapshot``: all of it when ``full``, else only the shards holding ``layers``' ``roles`` tensors
    (``q``, ``k``, ``v``, ``o``, ``qkv``, ``norm``) and what shape inference reads."""
    if full:
        snapshot = hub.snapshot(FULL_MODEL_PATTERNS)
        if not any(snapshot.glob("*.safetensors")):  # older repos ship only pytorch_model*.bin
            snapshot = hub.snapshot(FULL_MODEL_PATTERNS + ["pytorch_model*.bin"])
        return open_path(snapshot), snapshot, []
    index_path = hub.file("model.safetensors.index.json", required=False)
    if index_path is None:
        single = hub.file("model.safetensors", required=False)
        if single is not None:
            return SafetensorsSource(single, description=f"{hub.repo}"), snapshot, []
        legacy = hub.file("pytorch_model.bin", required=False)
        if legacy is None:
            raise HeadlensError(f"hub repo {hub.repo} has neither model.safetensors(.index.json) nor "
                                f"pytorch_model.bin (or they are not in the local cache)")
        return StateDictSource([legacy], description=hub.repo), snapshot, []
    weight_map = read_safetensors_index(index_path)
    logical = logical_names(list(weight_map))  # a quantized weight's parts under its unquantized name
    wanted = _wanted_tensors(KeyMap(spec_for_type(model_type, logical), logical), layers, roles)
    wanted = stored_names(wanted, list(weight_map))  # and the parts (scales, zero points) it is stored as
    shards = sorted({weight_map[k] for k in wanted if k in weight_map})
    files: dict[str, Path] = {}
    for shard in shards:
        path = hub.file(shard)
        assert path is not None
        files.update({k: path for k, v in weight_map.items() if v == shard})
    return SafetensorsSource(files, description=hub.repo), snapshot, list(weight_map)


def _wanted_tensors(keymap: KeyMap, layers: list[int] | None, roles: tuple[str, ...]) -> set[str]:
    """Full names of ``roles``' tensors in ``layers`` (all layers when None), plus layer 0's tensors that shape
    inference reads."""
    wanted: set[str] = set()
    for layer in range(keymap.num_layers) if layers is None else layers:
        if 0 <= layer < keymap.num_layers:
            lk = keymap.layer(layer)
            wanted.update(k for k in (getattr(lk, role) for role in roles) if k)
    lk0 = keymap.layer(0)
    wanted.update(lk0.name(role) for role in ("o", keymap.spec.layout.anchor_role))
    return wanted
