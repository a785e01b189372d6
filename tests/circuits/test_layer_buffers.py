"""The sweep's layer loop converts each layer into reused buffers, and never into one that is still held.

Reuse spares the kernel a fresh mmap (page faults and zeroing) per factor per layer; reusing a buffer that the
caller still holds would silently overwrite its numbers, so a held buffer is replaced, never overwritten.
"""

from __future__ import annotations

import torch

from headlens.circuits.heads import read_layer
from headlens.circuits.sweep_layer import AnalysisConfig, iter_layers
from headlens.io.checkpoint import open_model


def _ck(ckpts):
    return open_model(weights=ckpts.path("gemma3", "gqa", "hf_dir"), auto_infer=True)  # 3 layers


def test_factors_equal_a_fresh_read_and_buffers_are_reused(ckpts):
    ck = _ck(ckpts)
    ptrs = []
    for layer, f in iter_layers(ck, [0, 1, 2], AnalysisConfig(), torch.float32):
        ref = read_layer(ck, layer)  # no buffers: freshly allocated
        for name in ("W_O", "W_V", "W_Q", "W_K"):
            assert torch.equal(getattr(f, name), getattr(ref, name)), (layer, name)
        assert f.W_O.stride() == ref.W_O.stride()  # the same layout, hence the same GEMMs
        ptrs.append(f.W_O.data_ptr())
        del f, ref
    assert ptrs[0] == ptrs[1] == ptrs[2]  # one buffer for all three layers


def test_a_held_layer_is_never_overwritten(ckpts):
    ck = _ck(ckpts)
    kept = []
    for layer, f in iter_layers(ck, [0, 1, 2], AnalysisConfig(), torch.float32):
        kept.append((layer, f, f.W_O.clone(), f.W_V[0].mT))  # the factors, a copy, and a view
    for layer, f, copy, view in kept:
        assert torch.equal(f.W_O, copy), layer  # later layers went into new buffers
        assert torch.equal(view, f.W_V[0].mT), layer
        assert torch.equal(f.W_O, read_layer(ck, layer).W_O), layer
    assert len({f.W_O.data_ptr() for _, f, _, _ in kept}) == 3
