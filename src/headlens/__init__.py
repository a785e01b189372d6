"""headlens: open up the attention heads and the residual stream of transformer checkpoints.

The library behind the ``headlens`` command, usable from a notebook in a few lines::

    import headlens as hl

    src = hl.ModelSource()                    # the embedded all-MiniLM-L6-v2; or weights="dir", hf_repo="ORG/NAME"
    head = hl.analyze_head(src, hl.OVConfig(layer=3, head=5, latent_dim=8, prompt="Octopuses have three hearts."))
    head.rank, head.cache_error, head.data_aware.whitened_error

    sweep = hl.run_sweep(src, hl.SweepConfig(calibration=["Some calibration text ..."], target_error=0.3))
    sphere = hl.sphere_from_model(src, hl.SphereConfig(prompt="The Eiffel Tower ..."))
    routing = hl.route(hl.ModelSource(weights="path/to/moe-dir"), ["a text", "another"])
    latents = hl.run_compress(hl.ModelSource(embedded="tiny-lm"), hl.CompressConfig(ks=16, latents="plain"))
    side_by_side = hl.run_generate(hl.ModelSource(embedded="tiny-lm"), hl.GenerateConfig(k=16))

    model, tok = hl.load_compressed("dir")    # a `compress --save-model` directory, with its value-latent cache:
    model.generate(ids, past_key_values=hl.LatentCache.from_pretrained("dir"))

Every entry point returns a plain dataclass with ``.to_json()`` (strict JSON data) and a short ``repr``; bad
arguments raise :class:`HeadlensError` naming the parameter and the type or values expected (one string where a
list is expected is one item). ``hl.default_texts(name)`` holds the texts shipped with an embedded model,
``hl.read_texts(path)`` reads a file of one text per line. Importing ``headlens`` is cheap and has no side effects:
the names below load their modules on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from headlens.errors import HeadlensError  # noqa: E402

# name -> module that defines it: the notebook-facing API.
_API = {
    "ModelSource": "headlens.io.source",
    "Checkpoint": "headlens.io.checkpoint",
    "open_model": "headlens.io.checkpoint",
    "OVConfig": "headlens.circuits.ov",
    "OVResult": "headlens.circuits.ov",
    "analyze_head": "headlens.circuits.ov",
    "analyze_ov": "headlens.circuits.ov",
    "SweepConfig": "headlens.circuits.sweep",
    "SweepResult": "headlens.circuits.sweep",
    "run_sweep": "headlens.circuits.sweep",
    "SphereConfig": "headlens.residual.sphere",
    "SphereResult": "headlens.residual.sphere",
    "sphere_from_model": "headlens.residual.sphere",
    "sphere_from_stream": "headlens.residual.sphere",
    "record_sites": "headlens.residual.capture",
    "capture_attention_inputs": "headlens.residual.capture",
    "trace_model_layer": "headlens.residual.tracing",
    "run_mla_sweep": "headlens.circuits.mla",
    "RouterConfig": "headlens.moe.router",
    "RouterResult": "headlens.moe.router",
    "route": "headlens.moe.router",
    "load_dump": "headlens.moe.dump",
    "CompressConfig": "headlens.compress.run",
    "CompressResult": "headlens.compress.run",
    "run_compress": "headlens.compress.run",
    "LatentCache": "headlens.compress.cache",
    "absorbed_attention": "headlens.compress.absorbed",
    "load_compressed": "headlens.compress.exported",
    "GenerateConfig": "headlens.compress.generate",
    "GenerateResult": "headlens.compress.generate",
    "run_generate": "headlens.compress.generate",
    "default_texts": "headlens.io.embedded",
    "read_texts": "headlens.io.files",
}

__all__ = ["HeadlensError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
