"""One checkpoint's sweep as the driver runs it: planned here, computed here or as tasks on an executor.

:class:`SweepRun` opens the checkpoint (lazily: headers, not tensors), picks the layers, reads the resume store
and knows what is left to do; :meth:`SweepRun.run` computes it here (the layer loop, the next layer read in a
thread) or hands blocks of layers to an executor (:mod:`headlens.executor`) as :func:`sweep_block` tasks, each of
which opens the checkpoint again and reads only its own layers' tensors (and, in data-aware mode, captures the
calibration inputs of its own layers). Either way the driver keeps every finished layer in the resume store at
once and assembles the :class:`~headlens.circuits.sweep.SweepResult`. ``headlens trajectory`` plans one
:class:`SweepRun` per checkpoint and sends all their tasks to one executor.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from headlens import params
from headlens.circuits.budget import budget
from headlens.circuits.mla import is_mla_config
from headlens.circuits.sweep import (SweepConfig, SweepResult, SweepStart, _analyze, _text, capture_calibration)
from headlens.circuits.sweep_layer import iter_layers
from headlens.circuits.sweep_parts import SweepParts, run_id, weights_digest
from headlens.circuits.sweep_results import LayerResult
from headlens.errors import HeadlensError
from headlens.executor import Task, block_label, blocks, default_block
from headlens.selection import parse_layers

if TYPE_CHECKING:
    from headlens.io.source import ModelSource

ROLES = ("q", "k", "v", "o", "qkv", "norm", "q_norm", "k_norm")  # what a sweep reads of a layer


def sweep_block(source: "ModelSource", cfg: SweepConfig, layers: list[int]) -> tuple[list[LayerResult], int]:
    """What one task computes: the sweep of ``layers`` of ``source`` (``cfg.dtype`` already resolved by the
    driver), reading only those layers' tensors; in data-aware mode it runs the model on the calibration texts and
    keeps those layers' attention inputs. Returns (the layers' results in order, calibration tokens captured).
    The numbers are :func:`~headlens.circuits.sweep.run_sweep`'s: the same reader and analysis per layer."""
    data = cfg.calibration is not None
    dtype = source.dtype(cfg.dtype)
    ck = source.checkpoint(full=data, roles=ROLES)
    analysis = cfg.analysis(ck.shape.head_dim)
    X: dict[int, torch.Tensor] = {}
    n_calib = 0
    if data and layers:
        X, n_calib = capture_calibration(source, ck, cfg.calibration, layers, dtype, cfg.max_calib_tokens,
                                         cfg.truncate)
    out = []
    for layer, f in iter_layers(ck, layers, analysis, dtype):
        out.append(_analyze(ck, layer, f, analysis, X.pop(layer, None), source.torch_device))
        del f
    return out, n_calib


class SweepRun:
    """One checkpoint's sweep: what :func:`~headlens.circuits.sweep.run_sweep` does, in the driver's steps."""

    def __init__(self, source: "ModelSource", cfg: SweepConfig):
        from headlens.io.source import ModelSource

        params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-lm")')
        params.instance(cfg, "cfg", SweepConfig, 'e.g. headlens.SweepConfig(layers="0:4")')
        cfg.validate()
        self.data = cfg.calibration is not None
        if not self.data and source.device_map is not None:
            raise HeadlensError("`device_map` places the modules of a loaded model, but a weight-only sweep loads "
                                "none (it reads one layer's tensors at a time): leave it out and choose `device`, or "
                                "give `calibration` texts, whose capture loads the model")
        self.dtype = source.dtype(cfg.dtype)  # auto: float32 on the CPU, the checkpoint's on an accelerator
        self.cfg = cfg = replace(cfg, dtype=str(self.dtype).replace("torch.", ""))
        if is_mla_config(source.peek_config()):
            raise HeadlensError("a multi-head latent attention checkpoint has no per-kv-group values to budget: use "
                                "headlens.circuits.mla.run_mla_sweep (what `headlens sweep` runs on it)")
        self.source = source
        self.ck = ck = source.checkpoint(full=self.data, roles=ROLES)
        self.analysis = cfg.analysis(ck.shape.head_dim)
        self.layers = parse_layers(None if cfg.layers is None else _text(cfg.layers), ck.shape.num_layers)
        if self.analysis.with_qk:  # q/k norms the spec does not place: refused before any layer is computed
            from headlens.circuits.heads import check_qk_norms

            for layer in self.layers:
                check_qk_norms(ck, layer)
        model = SweepParts.fingerprint(ck) if cfg.out_dir is not None else ck.describe()  # parts carry a hash
        self.run_id = run_id(model, {**asdict(self.analysis), "dtype": cfg.dtype}, cfg.calibration,
                             cfg.max_calib_tokens)
        self.parts = SweepParts(cfg.out_dir) if cfg.out_dir is not None else None
        self.done: dict[int, LayerResult] = (self.parts.load(self.run_id, self.layers, self.analysis.ks)
                                             if self.parts is not None and cfg.resume else {})
        self.todo = [layer for layer in self.layers if layer not in self.done]
        self.resumed = sorted(self.done)
        self.calibration_tokens = 0

    # ------------------------------------------------------------------------------------------ steps

    def start(self) -> None:
        """Ready the resume store (later parts carry this run's fingerprint)."""
        if self.parts is not None:
            self.parts.start(self.run_id)

    def started(self) -> SweepStart:
        return SweepStart(self.ck.name, self.ck.shape, list(self.todo), list(self.resumed), self.calibration_tokens,
                          self.data, list(self.analysis.ks), self.ck.describe())

    def keep(self, result: LayerResult) -> None:
        """A finished layer: kept, and written to the resume store at once."""
        self.done[result.layer] = result
        if self.parts is not None:
            self.parts.save(result)

    def tasks(self, layers_per_task: int, label: str = "") -> list[Task]:
        """The layers left to do as :func:`sweep_block` tasks of at most ``layers_per_task`` layers each."""
        prefix = f"{label}, " if label else ""
        return [Task(sweep_block, (self.source, self.cfg, block), f"{prefix}{block_label(block)}", key=self)
                for block in blocks(self.todo, layers_per_task)]

    def take(self, value: tuple[list[LayerResult], int]) -> list[LayerResult]:
        """Keep a :func:`sweep_block` task's results; returns them."""
        results, n_calib = value
        self.calibration_tokens = max(self.calibration_tokens, n_calib)
        for r in results:
            self.keep(r)
        return results

    def result(self) -> SweepResult:
        """The finished sweep (every selected layer done)."""
        missing = [layer for layer in self.layers if layer not in self.done]
        assert not missing, missing
        ck, s, cfg = self.ck, self.ck.shape, self.cfg
        results = [self.done[layer] for layer in self.layers]
        bud = budget(results, cfg.target(), s.num_kv_heads, s.head_dim, cfg.kv_bytes)
        return SweepResult(model={**ck.describe(), "weights_digest": weights_digest(ck)}, name=ck.name, shape=s,
                           config=self.analysis, dtype=cfg.dtype, device=str(self.source.torch_device),
                           gram_precision=str(self.source.placement.compute_dtype()).replace("torch.", ""),
                           layers=results, budget=bud, data_aware=self.data,
                           calibration_tokens=self.calibration_tokens)

    # ------------------------------------------------------------------------------------------ whole

    def run(self, on_start: Callable[[SweepStart], None] | None = None,
            progress: Callable[[Iterable, int], Iterable] | None = None,
            on_layer: Callable[[LayerResult], None] | None = None, executor: Any = None,
            layers_per_task: int | None = None) -> SweepResult:
        """Compute what is left (see :func:`~headlens.circuits.sweep.run_sweep`) and return the result."""
        here = executor is None or getattr(executor, "name", None) == "serial"
        X: dict[int, torch.Tensor] = {}
        if here and self.data and self.todo:
            X, self.calibration_tokens = capture_calibration(self.source, self.ck, self.cfg.calibration, self.todo,
                                                             self.dtype, self.cfg.max_calib_tokens,
                                                             self.cfg.truncate)
        self.start()
        if on_start is not None:
            on_start(self.started())
        if on_layer is not None:
            for layer in self.resumed:
                on_layer(self.done[layer])
        if here:
            loop: Iterable = iter_layers(self.ck, self.todo, self.analysis, self.dtype)
            for layer, f in (progress(loop, len(self.todo)) if progress is not None else loop):
                self.keep(_analyze(self.ck, layer, f, self.analysis, X.pop(layer, None), self.source.torch_device))
                del f  # the loop reuses its conversion buffers for the next layer when nothing holds them
                if on_layer is not None:
                    on_layer(self.done[layer])
            return self.result()
        size = layers_per_task or default_block(len(self.todo), executor.cpus())
        finished = self._gathered(executor, self.tasks(size, self.ck.name))
        for r in (progress(finished, len(self.todo)) if progress is not None else finished):
            if on_layer is not None:
                on_layer(r)
        return self.result()

    def _gathered(self, executor, tasks: list[Task]) -> Iterator[LayerResult]:
        for _task, value in executor.results(tasks):
            yield from self.take(value)

