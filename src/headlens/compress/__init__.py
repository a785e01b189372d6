"""Putting MLA-style value latents into a model: the per-kv-group construction and its weight replacement.

- :mod:`headlens.compress.plan`: per layer and kv group g, a latent of size ``k_g`` that caches ``c = P_g x`` and
  rebuilds the group's values as ``U_g c`` (``U_g = W_V^g B_g``), i.e. ``W_V^g`` replaced by ``W_V^g Q_g`` with
  ``Q_g = B_g P_g`` of rank ``k_g``; plain (``Q_g = V_k V_k^T`` from the stacked operator ``M_g = [W_O^h W_V^g]``)
  or data-aware (``Q_g = S V_k V_k^T S^{-1}``, ``S S^T = X X^T``, ``V_k`` from ``M_g S``), with the errors the
  spectrum predicts.
- :mod:`headlens.compress.apply`: writes ``W_V^g Q_g`` into a loaded HuggingFace model through the family's
  :class:`~headlens.layout.Layout` (separate, fused, transposed Conv1D, interleaved), and exports the two factors
  an MLA cache stores (``latent_factors.safetensors``).
- :mod:`headlens.compress.run`: ``run_compress`` (the command as one call), with its texts
  (:mod:`headlens.compress.texts`) and its JSON summary (:mod:`headlens.compress.summary`).

Keys stay at full size: a key latent under RoPE needs a partial-RoPE split (MHA2MLA, TransMLA), not done here.
"""
