"""Putting MLA-style latents into a model: value and key latents per kv group, measured and cached.

- :mod:`headlens.compress.plan`: per layer and kv group g, a value latent of size ``k_g`` that caches ``c = P_g x``
  and rebuilds the group's values as ``U_g c`` (``U_g = W_V^g B_g``), i.e. ``W_V^g`` replaced by ``W_V^g Q_g`` with
  ``Q_g = B_g P_g`` of rank ``k_g``; plain (``Q_g = V_k V_k^T`` from the stacked operator ``M_g = [W_O^h W_V^g]``)
  or data-aware (``Q_g = S V_k V_k^T S^{-1}``, ``S S^T = X X^T``, ``V_k`` from ``M_g S``), with the errors the
  spectrum predicts.
- :mod:`headlens.compress.keys`: key latents ``c = E_g (k - b)`` fitted from query/key moments (pre-rotary keys in
  rotary layers, the queries averaged over relative rotations), and TransMLA's per-frequency cross-head form;
  :mod:`headlens.compress.qk_capture` and :mod:`headlens.compress.key_attention` read the queries and keys where
  attention receives them, :mod:`headlens.compress.key_measure` reports what the key latents lose.
- :mod:`headlens.compress.projections` finds each layer's q/k/v heads in a loaded model;
  :mod:`headlens.compress.apply` writes ``W_V^g Q_g`` into it through the family's :class:`~headlens.layout.Layout`
  (separate, fused, transposed Conv1D, interleaved), and exports the factors a latent cache stores
  (``latent_factors.safetensors``).
- :mod:`headlens.compress.cache`: ``LatentCache``, the latents inside transformers' own ``Cache``.
- :mod:`headlens.compress.run`: ``run_compress`` (the command as one call), its configurations
  (:mod:`headlens.compress.configs`), its texts (:mod:`headlens.compress.texts`) and its JSON summary
  (:mod:`headlens.compress.summary`).
"""
