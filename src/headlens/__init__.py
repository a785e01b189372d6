"""headlens: open up the attention heads and the residual stream of transformer checkpoints.

Library entry points (no side effects at import time):

- :func:`headlens.loading.open_model` resolves a checkpoint (file, directory, hub repo, embedded default).
- :func:`headlens.ov.analyze_ov` computes one head's OV circuit report.
- :mod:`headlens.circuits.spectrum` holds the factored SVD and the latent-cache error measures.
"""

__version__ = "0.1.0"

from headlens.errors import HeadlensError  # noqa: E402

__all__ = ["HeadlensError", "__version__"]
