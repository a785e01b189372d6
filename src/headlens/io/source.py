"""One model source for every command: where the model comes from, and how to load it.

:class:`ModelSource` holds what the user named (a local file or HuggingFace directory, a hub repo, or nothing
for the embedded default) and how to read it. It opens the weights lazily as a
:class:`~headlens.io.checkpoint.Checkpoint` (weight-only analyses) and loads the HuggingFace model and
tokenizer when a command runs text through the model. Device and precision handling live here, once.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from headlens.errors import HeadlensError
from headlens.io.checkpoint import Checkpoint, open_model, resolve_model_dir
from headlens.io.placement import Placement

@dataclass
class ModelSource:
    """A checkpoint to analyse: an embedded model by name (``embedded``: minilm, tiny-lm, tiny-moe), a local
    file or directory (``weights``) or a hub repo (``hf_repo``). With none of them it is the embedded default,
    all-MiniLM-L6-v2."""

    weights: str | os.PathLike | None = None  # a .safetensors / .pt / .bin file or a HuggingFace directory
    hf_repo: str | None = None  # a hub repo id ORG/NAME, read through the local hub cache
    revision: str | None = None  # hub branch, tag or commit
    cache_dir: str | None = None  # hub cache directory (default HF_HUB_CACHE)
    auto_infer: bool = False  # read heads / kv heads / head_dim from config.json
    num_heads: int | None = None  # query heads, for a bare state dict without config.json
    num_kv_heads: int | None = None  # kv heads (GQA/MQA), for a bare state dict
    trust_remote_code: bool = False  # allow a hub repo's own modeling code (never unless asked for)
    embedded: str | None = None  # an embedded model by name: minilm, tiny-lm, tiny-moe (headlens.io.embedded)
    device: str | None = None  # auto, cpu, cuda, cuda:N, mps (None: $HEADLENS_DEVICE, else auto)
    device_map: str | dict | None = None  # accelerate: auto, balanced, sequential, a JSON file or a dict
    max_memory: str | dict | None = None  # with device_map: 0=20GiB,1=20GiB,cpu=60GiB
    offload_dir: str | os.PathLike | None = None  # with device_map: where weights offloaded to disk go

    def __post_init__(self) -> None:
        self.placement = Placement(self.device, self.device_map, self.max_memory, self.offload_dir)
        self.placement.check()
        if self.weights is not None and self.hf_repo is not None:
            raise HeadlensError("give either `weights` or `hf_repo`, not both")
        if self.embedded is not None:
            from headlens.io.embedded import check_name

            check_name(self.embedded)
            other = "weights" if self.weights is not None else "hf_repo" if self.hf_repo is not None else None
            if other:
                raise HeadlensError(f"give either `model` {self.embedded} or `{other}`, not both: `model` names "
                                    "an embedded checkpoint")
        for name in ("revision", "cache_dir"):  # hub-only settings are refused rather than ignored
            if getattr(self, name) is not None and self.hf_repo is None:
                where = (f"`weights` {self.weights}" if self.weights is not None else
                         f"the embedded model {self.embedded or 'minilm'}")
                raise HeadlensError(f"`{name}` applies to `hf_repo` only; {where} is read from disk as it is")

    def _local(self) -> str | os.PathLike | None:
        """The local path to read: ``weights``, an embedded model's directory, or None for the default."""
        if self.weights is not None or self.embedded in (None, "minilm"):
            return self.weights
        from headlens.io.embedded import embedded_dir

        return embedded_dir(self.embedded)

    def checkpoint(self, layers: list[int] | None = None, full: bool = False,
                   roles: tuple[str, ...] = ("v", "o", "qkv", "norm")) -> Checkpoint:
        """Open the weights lazily. ``layers``/``roles`` limit what a hub repo downloads; ``full`` fetches
        everything a forward pass needs (config, all weights, tokenizer). Returns a :class:`Checkpoint`."""
        return open_model(weights=self._local(), hf_repo=self.hf_repo, revision=self.revision,
                          cache_dir=self.cache_dir, auto_infer=self.auto_infer, num_heads=self.num_heads,
                          num_kv_heads=self.num_kv_heads, layers=layers, full=full, roles=roles)

    def peek_config(self) -> dict | None:
        """The model's config.json without opening its weights (a hub repo fetches only that file), or None for a
        bare weights file without one. Lets a command choose its path (e.g. latent attention) before reading."""
        from headlens.io.checkpoint import embedded_model_dir, read_config

        if self.hf_repo is not None:
            from headlens.io.hub import HubRepo

            path = HubRepo(self.hf_repo, self.revision, self.cache_dir).file("config.json")
        else:
            local = self._local()
            where = embedded_model_dir() if local is None else Path(local).expanduser()
            path = (where if where.is_dir() else where.parent) / "config.json"
            if not where.exists() or not path.exists():
                return None
        return read_config(path) if path is not None else None

    def model_dir(self) -> tuple[str, Path, dict]:
        """(name, HuggingFace directory, config) for commands that only run the model (e.g. ``router``)."""
        return resolve_model_dir(self._local(), self.hf_repo, self.revision, self.cache_dir)

    def tokenizer(self, directory: Path):
        """The tokenizer saved next to the model in ``directory``."""
        return load_tokenizer(directory, self.trust_remote_code)

    @property
    def torch_device(self) -> torch.device:
        """The device the model's inputs go to and the weight-only products run on."""
        return self.placement.torch_device

    def dtype(self, name: str | torch.dtype = "auto", config: dict | None = None) -> torch.dtype:
        """The precision ``name`` means here (``auto``: the checkpoint's on an accelerator, float32 on the CPU);
        ``config`` is the checkpoint's config.json (read when needed and not given)."""
        if name == "auto" and config is None and self.placement.on_accelerator:
            config = self.peek_config()
        return self.placement.dtype(name, config)

    def model(self, directory: Path, dtype: torch.dtype | str = "auto"):
        """The base HuggingFace model of ``directory`` in eval mode (default attention implementation), placed
        as the source says (one device, or accelerate's device map)."""
        return load_model(directory, self.dtype(dtype), self.trust_remote_code, self.placement)

    def lm_model(self, directory: Path, dtype: torch.dtype | str = "auto", edits: str | None = None):
        """The model of ``directory`` with its language-model head where it is a decoder (its next-token logits
        are measured), else the base model; eval mode, default attention implementation, placed as the source
        says. ``edits`` names a caller that edits weights in place: a device map that offloaded some is refused
        then (accelerate reloads offloaded weights from storage at every pass)."""
        return load_lm_model(directory, self.dtype(dtype), self.trust_remote_code, self.placement, edits)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and its own progress bars ("Loading weights") while loading, and restore
    the caller's settings afterwards: headlens shows its own bars."""
    import logging

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    acc = logging.getLogger("accelerate")  # "Some parameters are on the meta device ...": said by headlens
    acc_level = acc.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    acc.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        acc.setLevel(acc_level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(directory: Path, trust_remote_code: bool = False):
    """The tokenizer saved next to a HuggingFace model."""
    from transformers import AutoTokenizer

    if not (directory / "config.json").exists():
        raise HeadlensError(f"{directory} has no config.json: a prompt needs a HuggingFace model directory")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise HeadlensError(f"cannot load a tokenizer from {directory} ({_first_line(exc)}): a prompt needs "
                            "the tokenizer files next to the weights") from None


def check_text_lengths(tokenizer, texts: list[str], limit: int | None, truncate: bool, what: str = "text",
                       max_tokens: int | None = None) -> None:
    """One rule for every command that reads texts: a text longer than the model's ``limit`` positions is
    refused, naming it (``what`` and its number) and its length, unless ``truncate`` lets it be cut. With a
    ``max_tokens`` cap, texts past the cap are not read and the cap itself may cut the last one read.
    Tokenizing quietly also keeps the tokenizer's own too-long warning off stderr."""
    used = 0
    for i, text in enumerate(texts if limit else []):
        if max_tokens is not None and used >= max_tokens:
            return
        with quiet_transformers():
            n = len(tokenizer(text)["input_ids"])
        if min(n, max_tokens - used if max_tokens is not None else n) > limit and not truncate:  # type: ignore[operator]
            preview = text if len(text) <= 40 else text[:37] + "..."
            raise HeadlensError(f"{what} {i + 1} ({preview!r}) has {n} tokens but the model takes at most {limit}: "
                                "shorten it or pass `truncate`")
        used += n


def _placed(placement: Placement, directory: Path, exc: BaseException) -> HeadlensError | None:
    """One line for a placement that cannot hold the model (accelerate's own message is a paragraph)."""
    text = str(exc)
    uncovered = "does not give any device for the following parameters:"
    if uncovered in text:
        names = [n.strip() for n in text.split(uncovered, 1)[1].split(",") if n.strip()]
        return HeadlensError(f"`device_map` places no device for {len(names)} parameter(s) of {directory.name} "
                             f"({names[0] if names else '?'}, ...): give every module a device (cpu, disk, a GPU)")
    if "offload" in text and "disk" in text:
        if placement.max_memory is None:
            return HeadlensError(f"the device map puts weights of {directory.name} on disk that accelerate must write "
                                 "out again (not safetensors, or stored in another layout, as MoE experts are): give "
                                 "`offload_dir` DIR for them")
        return HeadlensError(f"the model of {directory} does not fit the device map's memory (`max_memory` "
                             f"{placement.max_memory}): give `offload_dir` DIR to offload the rest to disk, or "
                             "allow more memory")
    return None


def _map_name(placement: Placement) -> str:
    value = placement.device_map
    return str(value) if isinstance(value, (str, os.PathLike)) else "the device map"


def _load(cls, directory: Path, dtype: torch.dtype, trust_remote_code: bool, placement: Placement | None,
          **extra):
    """``cls.from_pretrained`` of ``directory`` placed and in ``dtype``; a checkpoint stored quantized is loaded
    dequantized to ``dtype`` (:mod:`headlens.io.quantized_model`, which says so in one stderr line)."""
    import warnings

    from headlens.io import quantized_model

    kwargs = placement.load_kwargs() if placement is not None else {}
    if placement is not None and isinstance(kwargs.get("device_map"), dict) and placement.device_map is not None:
        from headlens.io.device_map import empty_model, fit_map, head_modules

        kwargs["device_map"] = fit_map(kwargs["device_map"], empty_model(cls, directory, trust_remote_code),
                                       directory.name, _map_name(placement),
                                       heads=lambda: head_modules(directory, trust_remote_code))
    quantized = quantized_model.inspect(directory)
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="accelerate")  # said by headlens
            if quantized is not None:
                return quantized_model.load(quantized, cls, dtype, trust_remote_code, kwargs, extra)
            return cls.from_pretrained(str(directory), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs,
                                       **extra)
    except (ValueError, RuntimeError, OSError) as exc:
        placed = _placed(placement, directory, exc) if kwargs and placement is not None else None
        if placed is not None:
            raise placed from None
        raise


def _check_placement(model, edits: str | None = None) -> None:
    """With ``edits`` (a caller that edits weights in place), refuse weights a device map offloaded; then say in
    one stderr line where the map put the modules (accelerate's own warning is silenced)."""
    from headlens.io.placement import offloaded

    moved = offloaded(model) if edits else []
    if moved:
        raise HeadlensError(f"{edits} replaces weights in place, but the device map offloaded {len(moved)} "
                            f"weight(s) ({moved[0]}, ...), which accelerate reloads from storage at every pass: "
                            "give `max_memory` that holds the model, or a larger device")
    mapping = getattr(model, "hf_device_map", None)
    if not mapping or (set(mapping) == {""} and mapping[""] != "disk"):  # one device for the whole model
        return
    import sys
    from collections import Counter

    counts = Counter(str(d) for d in mapping.values())
    where = ", ".join(f"{n} on {d}" for d, n in counts.items())
    print(f"device map: {len(mapping)} module group(s): {where}", file=sys.stderr)


def load_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False,
               placement: Placement | None = None, edits: str | None = None):
    """The base model of a HuggingFace directory, default attention implementation, in eval mode, placed by
    ``placement`` (default: the CPU)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    from headlens.arch import SPECS

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
            spec = SPECS.get(getattr(config, "model_type", None))  # its model_class where AutoModel builds more
            cls = getattr(transformers, spec.model_class) if spec is not None and spec.model_class else AutoModel
        model = _load(cls, directory, dtype, trust_remote_code, placement)
        _check_placement(model, edits)
    except HeadlensError:
        raise
    except Exception as exc:
        raise HeadlensError(f"cannot build the model from {directory} ({_first_line(exc)})") from None
    return model.eval()


def load_hf_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, tokenizer) from a HuggingFace directory; the base model, default attention implementation."""
    tokenizer = load_tokenizer(directory, trust_remote_code)
    return load_model(directory, dtype, trust_remote_code), tokenizer


def load_lm_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False,
                  placement: Placement | None = None, edits: str | None = None):
    """A decoder family's ``AutoModelForCausalLM`` (refused, one line, when the checkpoint lacks weights the head
    needs, e.g. an untied ``lm_head`` missing from a base-model checkpoint: transformers would draw them at
    random), else :func:`load_model`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from headlens.arch import SPECS

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise HeadlensError(f"cannot read the config of {directory} ({_first_line(exc)})") from None
    spec = SPECS.get(getattr(config, "model_type", None))
    if spec is None or not spec.decoder or spec.model_class:
        return load_model(directory, dtype, trust_remote_code, placement, edits)
    try:
        model, info = _load(AutoModelForCausalLM, directory, dtype, trust_remote_code, placement,
                            output_loading_info=True)
        _check_placement(model, edits)
    except HeadlensError:
        raise
    except Exception as exc:
        raise HeadlensError(f"cannot build the causal language model of {directory} ({_first_line(exc)})") from None
    missing = [k for k in info.get("missing_keys", ()) if k]
    if missing:
        raise HeadlensError(f"{directory} lacks {len(missing)} weight(s) its causal LM needs ({missing[0]}"
                            f"{', ...' if len(missing) > 1 else ''}): they would be random")
    return model.eval()
