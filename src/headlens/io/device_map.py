"""A device map given by module names, fitted to the model it places before accelerate sees it.

Module names depend on the class that loads a checkpoint: the base model (``sphere``, ``ov``, ``router``,
``diagram``) names its blocks ``layers.0``, a causal LM (``compress``) ``model.layers.0``. :func:`fit_map` takes a
map written either way and returns it in the names of the class about to load (an empty copy of it is built on
the ``meta`` device: no weight is read), so one map file serves every command. It also refuses, in one line:

- keys that match no module (naming them and a few of the model's own names); a key naming a module of the
  checkpoint's full architecture that this class does not load (``lm_head`` when ``sphere`` loads the base model)
  is dropped: it places nothing here;
- a map that places only some modules (naming the modules left without a device);
- two keys that become the same module with different devices.

A tied output embedding (``lm_head`` sharing the input embedding's weight) left out of the map goes where the map
puts the input embedding: it is the same tensor.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from headlens.errors import HeadlensError

SHOWN = 6  # names shown in a message


def empty_model(cls, directory: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model ``cls`` builds from ``directory``'s config, on the ``meta`` device (no memory, no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from headlens.io.source import quiet_transformers

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        with init_empty_weights():
            if hasattr(cls, "from_config"):  # an Auto class
                return cls.from_config(config, trust_remote_code=trust_remote_code)
            return cls._from_config(config)


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, m in model.named_modules() if m is target), None)


def block_names(model: nn.Module) -> list[str]:
    """The names a map usually places, for the messages: the model's top modules, a list of layers as its first
    and last item (``layers.0``, ``layers.5``)."""
    out = []
    prefix = getattr(model, "base_model_prefix", "")
    roots = [(f"{prefix}.", getattr(model, prefix))] if prefix and isinstance(getattr(model, prefix, None),
                                                                                 nn.Module) else [("", model)]
    for lead, root in roots:
        for name, child in root.named_children():
            if isinstance(child, nn.ModuleList) and len(child):
                out += [f"{lead}{name}.0", f"{lead}{name}.{len(child) - 1}"] if len(child) > 1 else [f"{lead}{name}.0"]
            elif any(True for _ in child.parameters()):
                out.append(f"{lead}{name}")
    if roots[0][1] is not model:
        out += [name for name, child in model.named_children() if name != prefix and any(True for _ in
                                                                                           child.parameters())]
    return out


def _uncovered(model: nn.Module, covered) -> list[str]:
    """The topmost modules (or parameters) none of whose weights the map covers."""
    out: list[str] = []

    def walk(name: str, module: nn.Module) -> None:
        keys = [f"{name}.{k}" if name else k for k in module.state_dict(keep_vars=True)]
        hits = [covered(k) for k in keys]
        if keys and not any(hits):
            out.append(name)
            return
        for child_name, child in module.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if full in module_keys and not covered(full):
                out.append(full)

    module_keys = set(model.state_dict(keep_vars=True))
    walk("", model)
    return out


def head_modules(directory: Path, trust_remote_code: bool = False) -> set[str]:
    """The top modules of the checkpoint's own architecture (``config.architectures[0]``, e.g. a causal LM) that
    lie outside its base model: ``{"lm_head"}``; empty when the architecture is unknown or is the base model."""
    import json

    import transformers

    try:
        names = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return set()
    cls = getattr(transformers, str(names[0]), None) if names else None
    if cls is None:
        return set()
    try:
        full = empty_model(cls, directory, trust_remote_code)
    except Exception:  # noqa: BLE001 - a class that cannot be built here places nothing either
        return set()
    prefix = getattr(full, "base_model_prefix", "")
    return {n for n, _ in full.named_children() if n != prefix}


def fit_map(mapping: dict, model: nn.Module, name: str, where: str, heads=None) -> dict:
    """``mapping`` (module name -> device, as :func:`headlens.io.placement.parse_device_map` returns it) in the
    module names of ``model`` (an empty copy of the class about to load ``name``); ``where`` names the map in the
    messages (its file, or "the device map"); ``heads()`` gives the checkpoint's modules this class does not load
    (:func:`head_modules`), asked only when a key matches nothing. Raises HeadlensError for keys that match nothing,
    modules left without a device, and conflicting keys."""
    modules = {n for n, _ in model.named_modules() if n}
    keys = set(model.state_dict(keep_vars=True))
    known = modules | keys
    prefix = getattr(model, "base_model_prefix", "") or ""
    nested = bool(prefix) and prefix in modules  # e.g. a causal LM: model.layers.0 (a base model: layers.0)
    fitted: dict[str, object] = {}
    unmatched = []
    for key, device in mapping.items():
        if key == "" or (key == prefix and not nested):  # a base model's own prefix names all of it
            target: str | None = ""
        elif key in known:
            target = key
        elif nested and f"{prefix}.{key}" in known:
            target = f"{prefix}.{key}"
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in known:
            target = key[len(prefix) + 1:]
        else:
            target = None
        if target is None:
            unmatched.append(key)
            continue
        if target in fitted and fitted[target] != device:
            raise HeadlensError(f"`device_map` {where} places {target} twice, on {fitted[target]} and {device} "
                                "(with and without its leading prefix): keep one")
        fitted[target] = device
    if unmatched and heads is not None:
        others = heads()
        unmatched = [k for k in unmatched if not any(k == h or k.startswith(h + ".") for h in others)]
    if unmatched:
        shown = ", ".join(repr(k) for k in unmatched[:SHOWN]) + (", ..." if len(unmatched) > SHOWN else "")
        examples = ", ".join(block_names(model)[:SHOWN])
        raise HeadlensError(f"`device_map` {where}: {len(unmatched)} key(s) match no module of {name} "
                            f"({type(model).__name__}): {shown}; its modules are named like {examples}"
                            + (f" (with or without the leading {prefix}.)" if nested else ""))
    _tie_output(model, fitted)

    def covered(k: str) -> bool:
        return "" in fitted or any(k == m or k.startswith(m + ".") for m in fitted)

    missing = _uncovered(model, covered)
    if missing:
        shown = ", ".join(missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
        raise HeadlensError(f"`device_map` {where} places no device for {len(missing)} module(s) of {name}: "
                            f"{shown}; give every module a device (cpu, disk, a GPU index), or \"\" for all of them")
    return fitted


def _tie_output(model: nn.Module, fitted: dict) -> None:
    """Put a tied output embedding the map leaves out where the input embedding goes (the same tensor)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False) or "" in fitted:
        return
    out_name = _module_name(model, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
    in_name = _module_name(model, model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None)
    if out_name is None or in_name is None:
        return
    holder = [m for m in fitted if out_name == m or out_name.startswith(m + ".")]
    source = [m for m in fitted if in_name == m or in_name.startswith(m + ".")]
    if not holder and source:
        fitted[out_name] = fitted[max(source, key=len)]
