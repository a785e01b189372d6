"""Data only: the embedded models trained in this repository (``tiny-lm``, ``tiny-moe``), one HuggingFace
directory each. Chosen by name through :mod:`headlens.io.embedded`; see each directory's PROVENANCE.md."""
