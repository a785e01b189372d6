"""Where a model runs and in what precision: ``device``, ``dtype``, and accelerate's device maps.

One :class:`Placement` per :class:`~headlens.io.source.ModelSource`; every command that loads a model or runs
the weight-only Gram products asks it, so the rules live here once:

- ``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Without a
  value the environment variable ``HEADLENS_DEVICE`` gives the default, else ``auto``.
- ``dtype``: ``auto`` is the checkpoint's own ``torch_dtype`` on an accelerator and float32 on the CPU (or on a
  device map without an accelerator); an explicit precision is used as it is.
- ``device_map`` (``auto``, ``balanced``, ``sequential``, a JSON file mapping module names to devices, or a
  dict), ``max_memory`` (accelerate's ``0=20GiB,1=20GiB,cpu=60GiB``) and ``offload_dir`` go to
  ``from_pretrained`` unchanged: accelerate places the modules and adds its own hooks, headlens's hooks stay on
  the real modules and compose with them.

Every bad value is refused with one line naming it and the valid choices, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from headlens.errors import HeadlensError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DEVICE_MAPS = ("auto", "balanced", "sequential")
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
               "float16": torch.float16}
_MEMORY_KEYS = "a GPU index (0, 1, ...), cpu, mps or disk"


def default_device() -> str:
    """``HEADLENS_DEVICE`` where set (e.g. a test suite pinned to the CPU), else ``auto``."""
    return os.environ.get("HEADLENS_DEVICE", "").strip() or "auto"


def available_devices() -> str:
    """What this machine has, for the error messages: ``cpu, cuda:0, cuda:1`` / ``cpu, mps``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return ", ".join(found)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def parse_device(text: str | None) -> torch.device:
    """The torch device ``text`` names (``auto`` resolved), or HeadlensError naming what this machine has. With
    ``text`` None the environment variable ``HEADLENS_DEVICE`` names it (else ``auto``), and the errors say so."""
    from_env = text is None
    given = default_device() if from_env else str(text)
    name = given.strip().lower()
    # the environment variable is not a parameter: no backticks, so the command line keeps its name
    what = "the environment variable HEADLENS_DEVICE" if from_env else "`device`"
    unset = "; pass `device` or unset HEADLENS_DEVICE" if from_env else ""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise HeadlensError(f"{what} mps is not available on this machine (available: {available_devices()})"
                                f"{unset}")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise HeadlensError(f"{what} {given!r} is not a device: choose {DEVICE_CHOICES}{unset}")
    if not torch.cuda.is_available():
        raise HeadlensError(f"{what} {name} asked for, but CUDA is not available on this machine "
                            f"(available: {available_devices()}){unset}")
    index = int(m.group(1)) if m.group(1) else 0
    if index >= torch.cuda.device_count():
        raise HeadlensError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(available: {available_devices()}){unset}")
    return torch.device("cuda", index)


def parse_max_memory(text: str | dict | None) -> dict | None:
    """accelerate's ``max_memory`` dict from ``0=20GiB,1=20GiB,cpu=60GiB`` (or a dict, checked the same way)."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    if isinstance(text, dict):
        items = [(str(k), str(v)) for k, v in text.items()]
        shown = ",".join(f"{k}={v}" for k, v in items)
    else:
        shown = text.strip()
        if not shown:
            raise HeadlensError("`max_memory` is empty: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
        items = []
        for part in shown.split(","):
            key, eq, size = part.partition("=")
            if not eq or not key.strip() or not size.strip():
                raise HeadlensError(f"`max_memory` {shown!r}: {part!r} is not DEVICE=SIZE; write e.g. "
                                    "0=20GiB,1=20GiB,cpu=60GiB")
            items.append((key.strip().lower(), size.strip()))
    out: dict = {}
    for key, size in items:
        if key.isdigit():
            k: int | str = int(key)
            if int(key) >= torch.cuda.device_count():
                raise HeadlensError(f"`max_memory` {shown!r}: GPU {key} does not exist (available: "
                                    f"{available_devices()})")
        elif key in ("cpu", "disk", "mps"):
            k = key
        else:
            raise HeadlensError(f"`max_memory` {shown!r}: {key!r} is not a device: use {_MEMORY_KEYS}")
        if k in out:
            raise HeadlensError(f"`max_memory` {shown!r}: {key} is given twice")
        try:
            value = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except Exception:
            value = -1
        if not isinstance(value, int) or value <= 0:
            raise HeadlensError(f"`max_memory` {shown!r}: {size!r} is not a size; write e.g. 20GiB, 500MB or "
                                "a number of bytes")
        out[k] = value
    return out


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """``auto``/``balanced``/``sequential``, a dict, or the dict a JSON file holds (module name -> device)."""
    if value is None or isinstance(value, dict):
        return _check_map(value, "the device map") if isinstance(value, dict) else None
    text = str(value).strip()
    if text in DEVICE_MAPS:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise HeadlensError(f"`device_map` {text!r}: choose {', '.join(DEVICE_MAPS)} or a JSON file mapping module "
                            "names to devices")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadlensError(f"`device_map` {text}: cannot read it as JSON ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise HeadlensError(f"`device_map` {text}: expected a JSON object mapping module names to devices")
    return _check_map(mapping, text)


def _check_map(mapping: dict, where: str) -> dict:
    out = {}
    for name, dev in mapping.items():
        if isinstance(dev, bool) or not isinstance(dev, (int, str)) or dev == "auto":
            _bad_map_device(where, name, dev)
        if dev == "disk":
            out[str(name)] = "disk"
            continue
        text = f"cuda:{int(dev)}" if isinstance(dev, int) or dev.isdigit() else dev
        try:
            device = parse_device(text)
        except HeadlensError as exc:
            raise HeadlensError(f"`device_map` {where} places {name!r} on {dev!r}: "
                                f"{str(exc).replace('`device` ', '', 1)}") from None
        out[str(name)] = device.index if device.type == "cuda" else str(device)
    return out


def _bad_map_device(where: str, name, dev):
    raise HeadlensError(f"`device_map` {where}: module {name!r} is placed on {dev!r}; use cpu, disk, mps, a GPU "
                        "index or cuda:N")


def check_offload_dir(text: str | os.PathLike, create: bool = False) -> Path:
    """``offload_dir`` as a Path that can be written (made, with ``create``, only when the model loads: a run
    refused before that leaves nothing behind), or one line saying why not."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise HeadlensError(f"`offload_dir` {path} exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HeadlensError(f"`offload_dir` {path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HeadlensError(f"`offload_dir` {path} is not writable: choose a directory you can write to")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HeadlensError(f"`offload_dir` {path} cannot be created ({exc.strerror or exc})") from None
    return path


@dataclass
class Placement:
    """Where the model goes; see the module docstring. Checked by :meth:`check` (ModelSource calls it)."""

    device: str | None = None  # auto, cpu, cuda, cuda:N, mps; None: HEADLENS_DEVICE or auto
    device_map: str | dict | None = None  # auto, balanced, sequential, a JSON file or a dict
    max_memory: str | dict | None = None  # accelerate's syntax: 0=20GiB,1=20GiB,cpu=60GiB
    offload_dir: str | os.PathLike | None = None  # where accelerate writes the weights offloaded to disk

    def check(self) -> None:
        """Refuse bad values (one line each) before anything is read."""
        if self.device_map is not None and self.device is not None:
            raise HeadlensError("give either `device` or `device_map`, not both: a device map places every module")
        if self.device_map is None:
            for name in ("max_memory", "offload_dir"):
                if getattr(self, name) is not None:
                    raise HeadlensError(f"`{name}` applies with `device_map` (e.g. `device_map` auto)")
            self.torch_device  # noqa: B018 - raises for a device that is not there
        else:
            parse_device_map(self.device_map)
            parse_max_memory(self.max_memory)
            if self.offload_dir is not None:
                check_offload_dir(self.offload_dir)

    @property
    def torch_device(self) -> torch.device:
        """The one device of the model (the first accelerator a device map uses, else the CPU), inputs go there."""
        if self.device_map is None:
            return parse_device(self.device)
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    @property
    def on_accelerator(self) -> bool:
        return self.torch_device.type != "cpu"

    def dtype(self, name: str | torch.dtype, config: dict | None) -> torch.dtype:
        """The precision for ``name``: an explicit one as it is; ``auto`` the checkpoint's ``torch_dtype`` (or
        ``dtype``) on an accelerator, float32 on the CPU."""
        if isinstance(name, torch.dtype):
            return name
        if name != "auto":
            if name not in DTYPE_NAMES:
                raise HeadlensError(f"`dtype` {name!r}: choose auto, {', '.join(DTYPE_NAMES)}")
            return DTYPE_NAMES[name]
        if not self.on_accelerator:
            return torch.float32
        cfg = config or {}
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        stored = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype")
        return DTYPE_NAMES.get(str(stored).replace("torch.", ""), torch.float32)

    def compute_dtype(self) -> torch.dtype:
        """The precision of the weight-only Gram products: float64, except on MPS (no float64 there)."""
        return torch.float32 if self.torch_device.type == "mps" else torch.float64

    def load_kwargs(self) -> dict:
        """What ``from_pretrained`` takes for this placement (nothing for the CPU: the default load)."""
        if self.device_map is not None:
            kw: dict = {"device_map": parse_device_map(self.device_map)}
            memory = parse_max_memory(self.max_memory)
            if memory is not None:
                kw["max_memory"] = memory
            if self.offload_dir is not None:
                kw["offload_folder"] = str(check_offload_dir(self.offload_dir, create=True))
            return kw
        device = self.torch_device
        return {} if device.type == "cpu" else {"device_map": {"": str(device)}}

def input_device(model) -> torch.device:
    """Where a forward pass's input ids go: the input embedding's device (a device map may place it anywhere;
    an offloaded one sits on ``meta`` and accelerate's hooks move the inputs, so the CPU)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    p = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return p.device if p is not None else torch.device("cpu")


def offloaded(model) -> list[str]:
    """The parameters a device map offloaded (to disk, or to the CPU behind a GPU): accelerate keeps them on
    ``meta`` and loads them only while their module runs."""
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]
