"""What ``sphere`` and ``diagram`` run: a HuggingFace model directory, and its layers' spec.

These commands only run the model and hook its layers, so they work on any model whose blocks can be found. The
spec table is used where it knows the family (weights checked through :meth:`ModelSource.checkpoint`); otherwise
the model directory is opened as it is (:meth:`ModelSource.model_dir`) and the layer list found in the loaded model
(:func:`~headlens.residual.modules.find_blocks`); the residual sites then come from the traced layer
(:mod:`headlens.residual.plan`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from headlens.arch import GENERIC, SPECS, ArchSpec
from headlens.errors import HeadlensError
from headlens.residual.modules import find_blocks

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class RunTarget:
    """A model directory to run; ``spec`` is None until the loaded model's blocks are found (unknown family)."""

    name: str  # short name, used in output file names
    directory: Path  # HuggingFace model directory (config.json, weights, tokenizer)
    config: dict  # its config.json
    spec: ArchSpec | None  # the family's spec, or None: found from the loaded model (:meth:`spec_for`)
    info: dict  # what the model is, as written in JSON ("model")
    num_layers: int | None  # from the config (None: counted in the loaded model)

    def spec_for(self, model: nn.Module) -> ArchSpec:
        """The spec to hook ``model`` with: the family's, or the generic one at the blocks found in the model."""
        if self.spec is None:
            model_type = self.config.get("model_type") or type(model).__name__
            path = find_blocks(model)
            self.spec = dataclasses.replace(GENERIC, family=f"{model_type} (blocks at {path})", layers_path=path,
                                            final_norm=None)
            self.info["family"] = self.spec.family
        return self.spec


def _text(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _num_layers(config: dict) -> int | None:
    for cfg in (_text(config), config):
        for key in _LAYER_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None


def open_run_target(source, bare_message: str) -> RunTarget:
    """The model directory of ``source`` (a :class:`~headlens.io.source.ModelSource`) and its spec.

    A family the spec table knows is opened through its checkpoint (shape checks included); a family it does not
    know through the model directory alone. A checkpoint without config.json is an error (``bare_message``)."""
    try:
        ck = source.checkpoint(full=True)
    except HeadlensError as exc:
        try:
            name, directory, config = source.model_dir()
        except HeadlensError:
            raise exc from None
        model_type = _text(config).get("model_type") or config.get("model_type")
        if model_type in SPECS or config.get("model_type") in SPECS:
            raise  # a family the table knows, whose weights are wrong: say so
        info = {"name": name, "source": str(directory), "family": f"{model_type} (blocks found in the model)",
                "model_type": model_type, "num_layers": _num_layers(config)}
        return RunTarget(name, directory, config, None, info, _num_layers(config))
    if ck.directory is None or ck.config is None or not (ck.directory / "config.json").exists():
        raise HeadlensError(bare_message)
    return RunTarget(ck.name, ck.directory, ck.config, ck.spec, ck.describe(), ck.shape.num_layers)
