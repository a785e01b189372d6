"""Put the latents of :mod:`headlens.compress.plan` into a loaded HuggingFace model, and export their factors.

Each compressed layer's value weights ``W_V^g`` become ``W_V^g Q_g = (W_V^g B_g) P_g`` in place, written through
the family's :class:`~headlens.layout.Layout`: ``head_block("v", g, H, G, hd)`` names the stored tensor (``v``,
or the fused ``qkv``), its (rows, cols) slice and whether it is stored transposed (GPT-2's ``Conv1D``), so
separate, concatenated (Phi-3), transposed and interleaved (GPT-NeoX, Falcon) projections are all the same code.
The value bias is left as it is: ``v = W_V^g Q_g x + b``.

Tensor names: the checkpoint's ``<prefix><layers_path>.<l>.<rel>`` (``Checkpoint.keymap``) and the model's differ
only in the prefix in front of the layer list (``model.`` in a ``...ForCausalLM``, nothing in the base model
``ModelSource.model`` loads, ``bert.`` in a task head), so the tensor is found as the parameter ``<rel>`` of the
model's layer module (:func:`headlens.residual.modules.find_layer`, the one module finder), never by the name.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from headlens.compress.plan import LayerPlan
from headlens.compress.projections import read_block, value_tensor
from headlens.errors import HeadlensError

FACTORS_FORMAT = "headlens-latent-factors/1"


# Float types a checkpoint stores its weights in, and which of them are 16-bit: rounding to those is visible in what
# compress measures (2^-8 relative for bfloat16), rounding to 32 bits (2^-24) is not.
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def stored_dtype(ck, name: str) -> torch.dtype | None:
    """The float type the checkpoint ``ck`` stores tensor ``name`` in; None when it has no such tensor. A weight stored
    quantized (integers, fp8 with scales) counts as stored in the checkpoint's own float type (config.json's
    ``torch_dtype``, what its dequantized weights are meant in), or None when the config names none."""
    try:
        if ck.tensors.is_quantized(name):
            named = (ck.config or {}).get("dtype") or (ck.config or {}).get("torch_dtype")
            dtype = getattr(torch, named, None) if isinstance(named, str) else None
        else:
            dtype = ck.tensors.dtype(name)
    except (HeadlensError, KeyError):
        return None
    return dtype if dtype in STORAGE_DTYPES else None


def _tolerance(dtype: torch.dtype) -> float:
    """How far the model's value weights may sit from the plan's (rounded to ``dtype``) and still be the same."""
    return max(1e-6, float(torch.finfo(dtype).eps)) if dtype.is_floating_point else 1e-6


@dataclass
class Applied:
    """What :func:`apply_plans` replaced: the original blocks, so that :meth:`restore` puts them back."""

    names: list[str] = field(default_factory=list)  # the model parameters written, one per layer
    _saved: list[tuple[torch.Tensor, object, torch.Tensor]] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        """Write every replaced block back as it was (in reverse order), then forget them."""
        with torch.no_grad():
            for param, block, original in reversed(self._saved):
                param[block.index] = original  # type: ignore[index]
        self._saved.clear()
        self.names.clear()


@dataclass
class Prepared:
    """The value blocks :func:`apply_plans` writes for some plans, computed and checked once
    (:func:`prepare_plans`): applying them again is a copy, not a matrix product."""

    writes: dict[int, list[tuple[torch.Tensor, object, torch.Tensor]]]  # layer -> (param, block, W_V^g Q_g) per group
    names: dict[int, str]  # layer -> the parameter written

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for per in self.writes.values() for _, _, v in per)

    def only(self, layer: int) -> "Prepared":
        """The same, for one layer."""
        return Prepared({layer: self.writes[layer]}, {layer: self.names[layer]})

    def apply(self) -> Applied:
        """Write every block in place; returns :class:`Applied`, whose ``restore()`` undoes it."""
        done = Applied()
        try:
            with torch.no_grad():
                for layer, per in self.writes.items():
                    for param, block, value in per:
                        done._saved.append((param, block, param.detach()[block.index].clone()))  # type: ignore[attr-defined]
                        param[block.index] = value  # type: ignore[attr-defined]
                    done.names.append(self.names[layer])
        except BaseException:
            done.restore()
            raise
        return done


def prepare_plans(model: nn.Module, ck, plans: Sequence[LayerPlan]) -> Prepared:
    """The new value blocks ``W_V^g Q_g`` of every planned layer of ``model`` (loaded from ``ck``), in the
    parameter's dtype and device, checked against the plans: ``Q_g`` is applied to the model's own weights,
    ``(W_V^g B_g) P_g`` in float64, and those weights must be the ones the plan was fitted on (``W_V^g B_g`` equal
    to the plan's up-projection, to the model's precision), else HeadlensError. Nothing is written.

    Where ``ck`` stores the value weights in 16 bits (bfloat16, float16) and the model computes in more, the blocks
    are rounded to the stored type first: the model then holds what :func:`save_compressed_model` writes, as it
    holds the stored numbers of every other weight, so what is measured is the checkpoint that is saved."""
    from headlens.residual.modules import count_layers

    n = count_layers(model, ck.spec)
    if n != ck.shape.num_layers:
        raise HeadlensError(f"`model` has {n} layers but {ck.name} has {ck.shape.num_layers}")
    G = ck.shape.num_kv_heads
    writes: dict[int, list] = {}
    names: dict[int, str] = {}
    for plan in plans:
        if len(plan.groups) != G:
            raise HeadlensError(f"layer {plan.layer}'s plan has {len(plan.groups)} kv groups, {ck.name} has {G}")
        if plan.layer in writes:
            raise HeadlensError(f"layer {plan.layer} is planned twice")
        vt = value_tensor(model, ck, plan.layer)
        stored = stored_dtype(ck, vt.checkpoint_name)
        rounding = stored if stored in HALF_DTYPES and vt.param.element_size() > stored.itemsize else None
        new = []
        for lat in plan.groups:
            block = vt.blocks[lat.kv_head]
            W = read_block(vt.param, block)  # (hd, d) as the model holds it
            up = W @ lat.basis  # (hd, k) = W_V^g B_g
            if lat.k and float(torch.linalg.norm(up - lat.up)) > _tolerance(vt.param.dtype) * max(
                    float(torch.linalg.norm(lat.up)), torch.finfo(torch.float64).tiny):
                raise HeadlensError(f"layer {plan.layer}, kv group {lat.kv_head}: the model's value weights "
                                    f"({vt.name}) are not those the latent was fitted on")
            value = up @ lat.down
            if rounding is not None:
                value = value.to(rounding)
            new.append((vt.param, block, (value.T if block.transposed else value).to(vt.param.device,
                                                                                     vt.param.dtype)))
        writes[plan.layer], names[plan.layer] = new, vt.name
    return Prepared(writes, names)


def apply_plans(model: nn.Module, ck, plans: Sequence[LayerPlan]) -> Applied:
    """Replace, in ``model`` (loaded from ``ck``), each planned layer's ``W_V^g`` by ``W_V^g Q_g``, in place
    (:func:`prepare_plans`, then :meth:`Prepared.apply`). Returns :class:`Applied`, whose ``restore()`` undoes it.
    """
    return prepare_plans(model, ck, plans).apply()


@contextmanager
def applied(prepared: Prepared) -> Iterator[Applied]:
    """``with applied(prepared):`` runs the block with the prepared blocks in place, then restores the model."""
    done = prepared.apply()
    try:
        yield done
    finally:
        done.restore()


@contextmanager
def compressed(model: nn.Module, ck, plans: Sequence[LayerPlan]) -> Iterator[Applied]:
    """``with compressed(model, ck, plans):`` runs the block with the latents in place, then restores the model."""
    done = apply_plans(model, ck, plans)
    try:
        yield done
    finally:
        done.restore()


# ------------------------------------------------------------------------------------------------ export


def factor_name(layer: int, kv_head: int, which: str) -> str:
    """Tensor name in ``latent_factors.safetensors``: ``layer{l}.group{g}.down`` or ``.up``."""
    return f"layer{layer}.group{kv_head}.{which}"


def save_latent_factors(plans: Sequence[LayerPlan], path: str | os.PathLike, latents: dict | None = None,
                        key_latents: dict | None = None) -> Path:
    """Write ``latent_factors.safetensors`` at ``path`` (atomically): per layer l and kv group g,
    ``layer{l}.group{g}.down`` = P_g (k, d) and ``layer{l}.group{g}.up`` = U_g (hd, k), float32, with metadata
    ``format``, ``kind`` (plain or data-aware), ``k`` (JSON: layer -> k_g per group), ``head_dim`` and
    ``hidden_size``. With ``latents`` ({layer: :class:`~headlens.compress.cache.LayerLatents`}) also what
    ``LatentCache`` reads: ``.encode`` = E_g (k, hd) and, where the value projection has one, ``.bias`` = b_g (hd,).
    With ``key_latents`` ({layer: :class:`~headlens.compress.key_cache.KeyLatents`}) also the key factors
    (:func:`headlens.compress.key_cache.key_factor_tensors`: ``.key_encode``, ``.key_up``, ``.key_bias``; metadata
    ``key_k`` and ``key_rotary``); ``plans`` may then be empty. The plan file's layer entries name them with
    :func:`headlens.compress.key_cache.key_plan_entry`. Returns the path."""
    from safetensors.torch import save_file

    from headlens.io.files import atomic_path

    from headlens.compress.key_cache import key_factor_tensors

    if not plans and not key_latents:
        raise HeadlensError("no compressed layers to save")
    kinds = {p.kind for p in plans}
    if len(kinds) > 1:
        raise HeadlensError(f"the layers mix latent kinds ({', '.join(sorted(kinds))}): save one kind per file")
    layers = [p.layer for p in plans]
    if len(set(layers)) != len(layers):
        raise HeadlensError("a layer appears twice among the plans to save")
    tensors = {}
    for p in plans:
        for g in p.groups:
            tensors[factor_name(p.layer, g.kv_head, "down")] = g.down.to(torch.float32).contiguous()
            tensors[factor_name(p.layer, g.kv_head, "up")] = g.up.to(torch.float32).contiguous()
            lat = (latents or {}).get(p.layer)
            if lat is not None:
                tensors[factor_name(p.layer, g.kv_head, "encode")] = lat.encode[g.kv_head].to(torch.float32).contiguous()
                if lat.bias is not None:
                    tensors[factor_name(p.layer, g.kv_head, "bias")] = lat.bias[g.kv_head].to(torch.float32).contiguous()
    key_tensors, meta = key_factor_tensors(key_latents or {})
    tensors.update(key_tensors)
    meta.update({"format": FACTORS_FORMAT, "k": json.dumps({str(p.layer): p.ks for p in plans})})
    if plans:
        first = plans[0].groups[0]
        meta.update({"kind": plans[0].kind, "head_dim": str(first.head_dim), "hidden_size": str(first.hidden_size)})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_latent_factors(path: str | os.PathLike) -> tuple[dict, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]]:
    """(metadata, {(layer, kv group): (down (k, d), up (hd, k))}) of a file :func:`save_latent_factors` wrote;
    ``metadata["k"]`` is decoded to {layer: [k_g ...]}."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            names = list(fh.keys())
            tensors = {n: fh.get_tensor(n) for n in names}
    except (OSError, ValueError, RuntimeError) as exc:
        raise HeadlensError(f"cannot read latent factors from {os.fspath(path)} ({exc})") from None
    if meta.get("format") != FACTORS_FORMAT:
        raise HeadlensError(f"{os.fspath(path)} is not a headlens latent-factor file")
    ks = {int(layer): list(v) for layer, v in json.loads(meta["k"]).items()}
    out = {}
    for layer, per in ks.items():
        for g in range(len(per)):
            out[(layer, g)] = (tensors[factor_name(layer, g, "down")], tensors[factor_name(layer, g, "up")])
    return {**meta, "k": ks}, out


LATENT_PLAN_FILE = "headlens_latent.json"
FACTORS_FILE = "latent_factors.safetensors"


def _storage_plan(model: nn.Module, ck) -> tuple[dict[str, torch.dtype], torch.dtype]:
    """({model tensor name: the float type to save it in}, the checkpoint's main float type): each tensor in the type
    the checkpoint stores it in, found by name (the model's and the checkpoint's names may differ by a prefix: the
    longest common dotted ending that names one type decides), else the type most of the checkpoint's numbers are
    stored in."""
    stored = {n: dt for n in ck.tensors.keys() if (dt := stored_dtype(ck, n)) is not None}
    counts: dict[torch.dtype, int] = {}
    endings: dict[str, set] = {}
    for name, dt in stored.items():
        size = 1
        for x in ck.tensors.shape(name):
            size *= x
        counts[dt] = counts.get(dt, 0) + size
        parts = name.split(".")
        for i in range(len(parts)):
            endings.setdefault(".".join(parts[i:]), set()).add(dt)
    main = max(counts, key=counts.get) if counts else torch.float32  # type: ignore[arg-type]
    plan = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        parts, want = name.split("."), main
        for i in range(len(parts)):
            found = endings.get(".".join(parts[i:]))
            if found:
                want = next(iter(found)) if len(found) == 1 else main
                break
        plan[name] = want
    return plan, main


def _stored_state_dict(model: nn.Module, plan: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each float tensor in its storage type (``plan``); tensors that share memory (tied
    embeddings) still share it, so ``save_pretrained`` writes them once."""
    out: dict[str, torch.Tensor] = {}
    cast: dict[tuple, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        want = plan.get(name, t.dtype)
        if t.dtype == want:
            out[name] = t
            continue
        key = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), want)
        if key not in cast:
            cast[key] = t.to(want)
        out[name] = cast[key]
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_compressed_model(model: nn.Module, ck, plans: Sequence[LayerPlan], out_dir: str | os.PathLike,
                          tokenizer=None, info: dict | None = None, key_plans: dict | None = None) -> Path:
    """Write the compressed model as an ordinary HuggingFace directory at ``out_dir``: the same architecture with
    every planned layer's value weights replaced by ``W_V^g Q_g`` (``save_pretrained``, safetensors), the tokenizer
    when given, ``headlens_latent.json`` (the plan: per layer the latent kind, k_g per kv group and the predicted
    errors, ``storage_dtype`` and ``compute_dtype``, plus ``info``) and ``latent_factors.safetensors`` (P_g and
    W_V^g B_g, the matrices an MLA-style cache stores and multiplies). With ``key_plans`` (layer ->
    :class:`~headlens.compress.keys.KeyLayerPlan`) the key latents too: ``key_encode``/``key_up``/``key_bias`` in
    the factors file and ``key_k``/``key_rotary``/``key_predicted_error`` in the layer entries; the key weights stay
    as they are (a rotary key latent cannot be put into the weights: ``LatentCache`` applies it).

    Every tensor is saved in the type the checkpoint stores it in (a bfloat16 checkpoint stays bfloat16, whatever
    the model computed in), and config.json's ``dtype`` is the checkpoint's, so a plain ``from_pretrained`` runs it
    as it runs the original. ``out_dir`` must be new or empty; it is locked from the start and its files appear
    together, with the rest of the command's output set, or not at all (:func:`headlens.io.files.atomic_dir`);
    ``model`` is left as it was. Returns the directory."""
    from headlens.compress.cache import encoders
    from headlens.io.files import atomic_dir, check_new_dir
    from headlens.io.output_set import output_set
    from headlens.io.source import quiet_transformers

    out = Path(out_dir)
    check_new_dir(out, "save_model")
    with output_set("compress", [out]):
        check_new_dir(out, "save_model")  # again, now that this run holds its lock
        with atomic_dir(out, "compress") as tmp:
            storage, main = _storage_plan(model, ck)
            values = [value_tensor(model, ck, p.layer) for p in plans]
            latents = encoders(model, ck, plans)  # E_g from the original value weights, each checked
            compute = values[0].param.dtype if values else main
            with compressed(model, ck, plans), quiet_transformers():  # headlens's output, not transformers' bars
                state = _stored_state_dict(model, storage)
                model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
                del state
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            original = (ck.config or {}).get("dtype") or (ck.config or {}).get("torch_dtype")
            config["dtype"] = original if isinstance(original, str) else _dtype_name(main)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            key_latents = {layer: p.cache_latents() for layer, p in (key_plans or {}).items()}
            save_latent_factors(plans, tmp / FACTORS_FILE, latents, key_latents=key_latents or None)
            value_dtype = storage.get(values[0].name, main) if values else main
            entries = {p.layer: {"layer": p.layer, "kind": p.kind, "k": list(p.ks),
                                 "predicted_error": float(p.predicted_error),
                                 "groups": [{"kv_head": g.kv_head, "k": int(g.k),
                                             "predicted_error": float(g.predicted_error)} for g in p.groups]}
                       for p in plans}
            for layer, kp in sorted((key_plans or {}).items()):
                from headlens.compress.key_cache import key_plan_entry

                entries.setdefault(layer, {"layer": layer}).update(
                    {**key_plan_entry(key_latents[layer]), "key_kind": kp.kind,
                     "key_predicted_error": float(kp.kept_predicted_error)})
            record = {
                "format": "headlens-latent-plan/1",
                "source": {"name": ck.name, "source": ck.source},
                "construction": "v = W_V^g Q_g x (+ value bias), Q_g = B_g P_g of rank k_g; " + (
                    "keys cached as c = E_g (k - b) (pre-rotary where key_rotary), rebuilt U_g c + b by LatentCache; "
                    "where key_form is across, c = E x of every kv head's rotated keys x side by side, rebuilt U c"
                    if key_plans else "keys at full size"),
                "storage_dtype": _dtype_name(value_dtype),  # what the value weights (and the checkpoint) are saved in
                "compute_dtype": _dtype_name(compute),  # what the run computed and measured in
                "layers": [entries[layer] for layer in sorted(entries)],
                **({"info": info} if info else {}),
            }
            (tmp / LATENT_PLAN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out
