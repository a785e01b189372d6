"""Running a quantized checkpoint: load it dequantized to the requested precision, or refuse.

Commands that run the model (prompts, ``sphere``, ``router``, ``compress``, ``diagram``) load through
:func:`headlens.io.source.load_model`, which asks :func:`inspect` first. For a checkpoint stored quantized:

- fp8 with block scales whose blocks tile every weight exactly (and per-tensor fp8) load through transformers' own
  dequantizing loader (``FineGrainedFP8Config(dequantize=True)``), and a sample of the weights it built is checked
  against headlens's own dequantization (:func:`verify`); those weights then make a plain model (a model loaded
  with a quantizer attached would quantize again when ``compress`` saves it). transformers derives the block size from the scale grid,
  which is wrong when a dimension is not a multiple of the block (a 48-wide weight in blocks of 32 would be read in
  blocks of 24), so such checkpoints take the second route;
- every other scheme (and those fp8 checkpoints) is dequantized by headlens's reader
  (:class:`~headlens.io.quantized.DequantizingSource`) into a state dict of the requested dtype, and the model is
  built from it with the quantization_config removed from its config.

Either way one stderr line says so: ``dequantized from fp8 (block 128x128) to bfloat16``. A checkpoint that stores
integer or fp8 weights no scheme explains is refused, naming the tensor and its dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from headlens.errors import HeadlensError
from headlens.io.quantized import DequantizingSource, Quantization, is_numeric_float, quantization_config
from headlens.io.tensors import open_path

# stored integer tensors that are buffers, not weights (BERT's position ids, batch-norm counters)
_INTEGER_BUFFERS = ("position_ids", "token_type_ids", "num_batches_tracked")


@dataclass
class QuantizedCheckpoint:
    """A HuggingFace directory whose weights are stored quantized, seen through headlens's reader."""

    directory: Path
    source: DequantizingSource
    quantization: Quantization

    def transformers_fp8(self) -> list[int] | None:
        """The block for transformers' fp8 loader when it reads this checkpoint right (every quantized weight is fp8
        with ``weight_scale_inv``, and the blocks tile each weight exactly), else None. ``[]``: per-tensor scales."""
        q = self.source.layout
        if q.method != "fp8":
            return None
        blocks = set()
        for s in q.stored.values():
            if s.scheme is None:
                continue
            if s.kind != "fp8-scale-inv":
                return None
            block = s.params.get("block")
            if block is None:
                if s.scheme.detail != "per-tensor":
                    return None
                blocks.add(())
                continue
            if s.shape[0] % block[0] or s.shape[1] % block[1]:
                return None
            blocks.add(tuple(block))
        if len(blocks) != 1:
            return None
        return list(blocks.pop())

    def state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every logical tensor, quantized weights dequantized and float tensors cast to ``dtype``."""
        out = {}
        for name in self.source.keys():
            dt = self.source.dtype(name)
            t = self.source.read(name) if (dt.is_floating_point or dt == torch.bool) else self.source.stored.read(name)
            out[name] = t.to(dtype) if t.is_floating_point() else t
        return out


def inspect(directory: Path) -> QuantizedCheckpoint | None:
    """None for a checkpoint stored unquantized (after checking that none of its weights is integer or fp8);
    else the quantized checkpoint. Reads only config.json and the tensor headers (and a few small descriptors)."""
    cfg_path = directory / "config.json"
    try:
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise HeadlensError(f"cannot read {cfg_path} ({exc})") from None
    has_qcfg = quantization_config(config if isinstance(config, dict) else None, directory) is not None
    try:
        stored = open_path(directory)
    except HeadlensError:
        if has_qcfg:
            raise
        return None  # transformers says what is wrong with the files
    src = DequantizingSource(stored, config if isinstance(config, dict) else None, directory)
    if src.quantization is None:
        for name in src.keys():
            dt = src.dtype(name)
            leaf = name.rpartition(".")[2]
            weight_like = dt.is_floating_point or leaf.endswith(("weight", "_proj"))  # not a mask or an id buffer
            if not is_numeric_float(dt) and dt != torch.bool and weight_like and not name.endswith(_INTEGER_BUFFERS):
                src.read(name)  # refuses, naming the tensor and its dtype
        return None
    return QuantizedCheckpoint(directory, src, src.quantization)


def _model_class(cls, config):
    """The concrete model class an Auto class builds for ``config`` (a state-dict load takes no path)."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    try:
        return mapping[type(config)]
    except KeyError:
        raise HeadlensError(f"cannot build a {cls.__name__} for a {config.model_type} checkpoint from dequantized "
                            "weights") from None


def load(q: QuantizedCheckpoint, cls, dtype: torch.dtype, trust_remote_code: bool, kwargs: dict, extra: dict):
    """The model of a quantized checkpoint, dequantized to ``dtype`` (see the module docstring); returns what
    ``from_pretrained`` returns (with ``output_loading_info``: ``(model, info)``)."""
    import sys

    from transformers import AutoConfig

    print(q.quantization.load_line(dtype), file=sys.stderr)
    block = q.transformers_fp8()
    state = None
    if block is not None:  # transformers' own fp8 dequantization, checked, then kept as plain weights
        from transformers import FineGrainedFP8Config

        qc = FineGrainedFP8Config(weight_block_size=block or None, dequantize=True)
        fp8 = cls.from_pretrained(str(q.directory), dtype=dtype, trust_remote_code=trust_remote_code,
                                  quantization_config=qc)
        verify(fp8, q, dtype)
        state = fp8.state_dict()  # a model loaded so re-quantizes on save_pretrained: rebuild it without the quantizer
        del fp8
    config = AutoConfig.from_pretrained(str(q.directory), trust_remote_code=trust_remote_code)
    for holder in (config, getattr(config, "text_config", None)):
        if holder is not None and getattr(holder, "quantization_config", None) is not None:
            delattr(holder, "quantization_config")
    model_cls = _model_class(cls, config)
    wants_info = bool(extra.pop("output_loading_info", False))
    model, info = model_cls.from_pretrained(None, config=config, state_dict=state if state is not None else
                                            q.state_dict(dtype), dtype=dtype, output_loading_info=True, **kwargs,
                                            **extra)
    missing = sorted(k for k in info.get("missing_keys", ()) if k)
    if missing:
        raise HeadlensError(f"{len(missing)} weight(s) of the model are not in the dequantized checkpoint "
                            f"({missing[0]}{', ...' if len(missing) > 1 else ''}): they would be random")
    model.config._name_or_path = str(q.directory)
    model.headlens_quantization = q.quantization  # for the outputs that describe the model (router's JSON)
    return (model, info) if wants_info else model


def _parameter(model, name: str) -> torch.Tensor | None:
    """The model's parameter for checkpoint tensor ``name`` (the checkpoint may carry the base model's prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}" if prefix else name):
        try:
            return model.get_parameter(candidate)
        except AttributeError:
            continue
    return None


def verify(model, q: QuantizedCheckpoint, dtype: torch.dtype) -> None:
    """Check transformers' dequantization against headlens's: one quantized weight of each distinct shape, equal to
    within one rounding of ``dtype``. A block-size mistake misplaces whole blocks of scales (errors of tens of
    percent); refuse rather than run a model whose weights differ from the checkpoint's."""
    seen = set()
    eps = torch.finfo(dtype).eps
    for name, s in q.source.layout.stored.items():
        if s.scheme is None or s.shape in seen:
            continue
        param = _parameter(model, name)
        if param is None or tuple(param.shape) != s.shape:
            continue
        seen.add(s.shape)
        want = q.source.read(name)
        got = param.detach().to("cpu", torch.float64)
        err = float((got - want).abs().max())
        scale = float(want.abs().max()) or 1.0
        if not math.isfinite(err) or err > 2 * eps * scale:
            raise HeadlensError(f"transformers dequantized {name} differently from its stored scales (max difference "
                                f"{err:.3g} against values up to {scale:.3g}): refusing to run a model whose weights "
                                "are not the checkpoint's")
    if not seen:
        raise HeadlensError("cannot check transformers' dequantization: no quantized weight of the checkpoint was "
                            "found in the loaded model")
