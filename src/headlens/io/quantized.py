"""Quantized checkpoints: which tensors store one weight, by which scheme, and the weights they mean.

A quantized checkpoint stores a weight as several tensors (fp8 codes and block scales, packed int4 words with
zero points and group scales, ...). :func:`~headlens.io.quant_names.storage_of` groups a checkpoint's stored tensor names into *logical*
tensors (the names an unquantized checkpoint would have), :class:`~headlens.io.quant_layout.Layout` adds what the scheme says
(``quantization_config`` in config.json, or the tensors themselves where they describe it), and
:class:`DequantizingSource` shows the checkpoint as its logical tensors, dequantized in float64 on read
(:mod:`headlens.io.dequant`).

Never a number from an unknown format: an integer or fp8 tensor that no known scheme explains is refused when read,
naming it and its dtype; a ``quantization_config`` whose method headlens does not know is refused at open, naming it
and the methods it knows.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from headlens.errors import HeadlensError
from headlens.io.quant_layout import Layout
from headlens.io.quant_names import Stored, logical_names, storage_of, stored_names
from headlens.io.quant_schemes import (KNOWN_METHODS, Quantization, Scheme, is_numeric_float, quantization_config,
                                       weights_line)
from headlens.io.tensors import Index, TensorSource

__all__ = ["DequantizingSource", "KNOWN_METHODS", "Layout", "Quantization", "Scheme", "Stored", "is_numeric_float",
           "logical_names", "quantization_config", "storage_of", "stored_names", "weights_line"]


class DequantizingSource(TensorSource):
    """A checkpoint seen as its logical tensors: quantized weights dequantized in float64 on read, every other tensor
    as stored. Reading an integer or fp8 tensor that no scheme explains is refused (one line naming it). The stored
    tensors stay reachable as :attr:`stored` (content hashes, file stats)."""

    def __init__(self, stored: TensorSource, config: dict | None, directory: Path | None = None):
        self._stored = stored
        self.description = stored.description
        self.layout = Layout(stored, config, directory)
        self._quantized = {n: s for n, s in self.layout.stored.items() if s.scheme is not None}
        self._keys = logical_names(stored.keys())
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.quantization = self.layout.quantization()

    @property
    def stored(self) -> TensorSource:
        return self._stored

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        s = self._quantized.get(name)
        return s.shape if s is not None else self.stored.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float64 if name in self._quantized else self.stored.dtype(name)

    def is_quantized(self, name: str) -> bool:
        return name in self._quantized

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        s = self._quantized.get(name)
        if s is None:
            dt = self.stored.dtype(name)
            if not is_numeric_float(dt) and dt != torch.bool:
                raise HeadlensError(f"tensor {name} is {str(dt).replace('torch.', '')} and matches no quantization scheme "
                                    f"headlens knows ({', '.join(KNOWN_METHODS)}): refusing to analyse its raw values "
                                    "as weights")
            return self.stored.read(name, index)
        t = self._cache.get(name)
        if t is None:
            t = self.layout.dequantize(s)
            if tuple(t.shape) != s.shape:
                raise HeadlensError(f"dequantizing {name} gave shape {tuple(t.shape)}, expected {s.shape}")
            self._cache[name] = t
            while len(self._cache) > 2:  # a layer reads the fused qkv block by block: keep the last two
                self._cache.popitem(last=False)
        if index is None:
            return t
        return t[index]
