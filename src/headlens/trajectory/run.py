"""A trajectory: the sweep (and, with texts, the prompt-dependent numbers) of every checkpoint of a training run.

:func:`run_trajectory` plans one :class:`~headlens.circuits.sweep_run.SweepRun` per checkpoint (each checkpoint's
finished layers kept under ``<out_dir>/checkpoints/<name>/sweep_layers/``, the sweep's resume store, whose
fingerprints carry a content hash of the weights and the configuration), sends every block of layers still to do,
of every checkpoint, to one executor (:mod:`headlens.executor`: here in order, or Ray tasks), plus one task per
checkpoint for the prompt-dependent numbers (:mod:`headlens.trajectory.prompt`, kept as ``prompt.json`` with
its own fingerprint), and gathers them. A task that fails ends the run with one line naming the checkpoint; the
layers finished before stay kept, so the next run (``resume``, the default) computes only what is missing.

The result's :meth:`TrajectoryResult.rows` is one tidy table keyed by (checkpoint, step, layer, head or kv group):
``unit`` says what a row describes: ``head`` rows carry the sweep's ``sweep_heads`` columns under their names
(``ov_rank_e90``, ``qk_rank_e90``, ...) and ``first_token_share``; ``group`` rows the ``sweep_groups`` columns
(``stack_rank_e90``, ...) and the budget's (``k_plain``, ``err_plain``, ``key_k_plain``, ...); ``layer`` rows (with
texts) the residual norms and, on MoE layers, the router statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from headlens import params
from headlens.circuits.sweep import SweepConfig, SweepResult
from headlens.circuits.sweep_results import group_row, head_row
from headlens.errors import HeadlensError
from headlens.executor import SerialExecutor, Task
from headlens.trajectory.checkpoints import Point, part_dir_name

PARTS = "checkpoints"  # under out_dir: one directory per checkpoint
PROMPT_PART = "prompt.json"
KEYS = ("checkpoint", "step", "unit", "layer", "head", "kv_head")
BUDGET_COLUMNS = ("k_plain", "err_plain", "k_data", "err_data", "err_data_heldout", "key_k_plain", "key_err_plain",
                  "key_k_data", "key_err_data", "key_err_data_heldout")


@dataclass
class CheckpointResult:
    """One checkpoint's numbers."""

    point: Point
    sweep: SweepResult
    prompt: dict[str, Any] | None = None  # prompt_numbers(...) with texts, else None
    resumed_layers: int = 0  # layers taken from the resume store


@dataclass
class TrajectoryResult:
    """Every checkpoint's sweep (and prompt numbers), in step order."""

    checkpoints: list[CheckpointResult]
    config: dict[str, Any]
    executor: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The ``trajectory`` table (see the module docstring), in step, layer, unit order."""
        out: list[dict[str, Any]] = []
        for c in self.checkpoints:
            key = {"checkpoint": c.point.name, "step": c.point.step}
            share = {(h["layer"], h["head"]): h["first_token_share"] for h in (c.prompt or {}).get("heads", [])}
            budget = {(r["layer"], r["kv_head"]): r for r in c.sweep.budget.to_json(with_rows=True).get("rows", [])}
            per_layer = {r["layer"]: r for r in (c.prompt or {}).get("layers", [])}
            for layer in c.sweep.layers:
                for h in layer.heads:
                    row = {**key, "unit": "head", **head_row(h)}
                    if c.prompt is not None:
                        row["first_token_share"] = share.get((h.layer, h.head))
                    out.append(_keyed(row))
                for g in layer.groups:
                    b = budget.get((g.layer, g.kv_head), {})
                    out.append(_keyed({**key, "unit": "group", "head": None, **group_row(g),
                                       **{c_: b.get(c_) for c_ in BUDGET_COLUMNS if c_ in b}}))
                if layer.layer in per_layer:
                    out.append(_keyed({**key, "unit": "layer", "head": None, "kv_head": None,
                                       **per_layer[layer.layer]}))
        return out

    def summary(self) -> dict[str, Any]:
        """The ``trajectory_summary.json`` content."""
        first = self.checkpoints[0].sweep if self.checkpoints else None
        return {"checkpoints": [{**c.point.describe(), "model": c.sweep.model, "layers": [r.layer for r in c.sweep.layers],
                                 "calibration_tokens": c.sweep.calibration_tokens,
                                 "prompt_tokens": (c.prompt or {}).get("tokens"),
                                 "budget": c.sweep.budget.to_json(with_rows=False)["totals"],
                                 "resumed_layers": c.resumed_layers}
                                for c in self.checkpoints],
                "config": {**self.config, **(first.config_json() if first is not None else {})},
                "executor": self.executor,
                "notes": _notes(self)}


def _keyed(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the key columns first (in :data:`KEYS` order)."""
    return {**{k: row.get(k) for k in KEYS}, **{k: v for k, v in row.items() if k not in KEYS}}


def _notes(result: TrajectoryResult) -> list[str]:
    notes = ["Rows: unit=head carries the sweep_heads columns, unit=group the sweep_groups and sweep_budget columns, "
             "unit=layer the residual norms and router statistics (with texts)."]
    froms = {c.point.step_from for c in result.checkpoints}
    if froms == {"order"}:
        notes.append("Steps are the order the checkpoints were given in (none carried a step of its own).")
    if any(c.prompt is not None for c in result.checkpoints):
        notes.append("first_token_share: attention probability of query positions 1..N-1 on key position 0, mean "
                     "over queries and texts (HuggingFace's eager attention probabilities).")
    return notes


def _prompt_fingerprint(sweep_run, dtype: str) -> dict[str, Any]:
    """The checkpoint's content fingerprint and the texts' hash, as its sweep parts carry them (computed once, when
    the sweep was planned), with the dtype and the prompt part's format."""
    from headlens.trajectory.prompt import FORMAT

    rid = sweep_run.run_id
    return json.loads(json.dumps({"model": rid["model"], "data": rid["data"], "dtype": dtype, "format": FORMAT}))


def _read_prompt_part(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(part, dict) or part.get("fingerprint") != fingerprint:
        return None
    return part.get("numbers")


def _named(point: Point, exc: HeadlensError) -> HeadlensError:
    return HeadlensError(f"checkpoint {point.name} ({point.where}): {exc}")


def run_trajectory(points: Sequence[Point], cfg: SweepConfig, out_dir: str | Path, executor: Any = None,
                   layers_per_task: int | None = None, resume: bool = True,
                   progress: Callable[[Iterable, int], Iterable] | None = None,
                   on_plan: Callable[[list[tuple[Point, int, int]]], None] | None = None) -> TrajectoryResult:
    """Sweep every checkpoint of ``points`` (:mod:`headlens.trajectory.checkpoints`) with ``cfg`` (its
    ``calibration`` texts, when given, also drive the prompt-dependent numbers); keep the parts under ``out_dir``.

    ``executor`` (entered; default serial) runs the tasks; ``layers_per_task`` cuts each checkpoint's layers into
    blocks (default: a checkpoint per task on the serial executor, about two tasks per CPU on Ray);
    ``resume`` reuses every part whose fingerprint matches. ``on_plan`` gets [(point, layers to do, layers
    resumed)] before anything is computed; ``progress(iterable, total)`` may wrap the stream of finished layers."""
    params.instance(cfg, "cfg", SweepConfig, 'e.g. headlens.SweepConfig(layers="0:4")')
    resume = params.flag(resume, "resume")
    if not points:
        raise HeadlensError("`points` holds no checkpoint")
    out_dir = Path(params.path(out_dir, "out_dir", optional=False))  # type: ignore[arg-type]
    executor = executor if executor is not None else SerialExecutor()
    from headlens.circuits.sweep_run import SweepRun
    from headlens.executor import default_block
    from headlens.io.files import ensure_dir, write_json
    from headlens.moe.capture import is_moe_config
    from headlens.trajectory.prompt import prompt_numbers

    dirs = _part_dirs(points)
    runs = []
    for point in points:
        try:
            runs.append(SweepRun(point.source, replace(cfg, out_dir=out_dir / PARTS / dirs[point.name],
                                                       resume=resume)))
        except HeadlensError as exc:
            raise _named(point, exc) from None
        except (OSError, ValueError, RuntimeError) as exc:  # an unreadable or damaged file
            raise _named(point, HeadlensError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                         ) from exc
    texts = runs[0].cfg.calibration
    dtype = runs[0].cfg.dtype
    prompts: dict[str, dict[str, Any]] = {}
    prompt_fp: dict[str, dict[str, Any]] = {}
    if texts is not None:
        for point, run in zip(points, runs):
            prompt_fp[point.name] = _prompt_fingerprint(run, dtype)
            found = (_read_prompt_part(out_dir / PARTS / dirs[point.name] / PROMPT_PART, prompt_fp[point.name])
                     if resume else None)
            if found is not None:
                prompts[point.name] = found
    if on_plan is not None:
        on_plan([(p, len(r.todo), len(r.resumed)) for p, r in zip(points, runs)])
    here = getattr(executor, "name", None) == "serial"
    tasks: list[Task] = []
    total = sum(len(r.todo) for r in runs)
    for point, run in zip(points, runs):
        run.start()
        size = layers_per_task or (len(run.todo) if here else default_block(total, executor.cpus()))
        tasks += run.tasks(max(1, size), point.name)
        if texts is not None and point.name not in prompts:
            tasks.append(Task(prompt_numbers, (point.source, texts, dtype, cfg.max_calib_tokens, cfg.truncate),
                              f"{point.name}, prompt", key=point))

    def finished():
        for task, value in executor.results(tasks):
            if isinstance(task.key, SweepRun):
                yield from task.key.take(value)
            else:
                point = task.key
                prompts[point.name] = value
                part_dir = out_dir / PARTS / dirs[point.name]
                ensure_dir(part_dir)
                write_json(part_dir / PROMPT_PART, {"fingerprint": prompt_fp[point.name], "numbers": value},
                           immediate=True)

    stream = finished()
    for _ in (progress(stream, total) if progress is not None else stream):
        pass
    results = [CheckpointResult(point, run.result(), prompts.get(point.name), len(run.resumed))
               for point, run in zip(points, runs)]
    first = runs[0].ck.config or {}
    config = {"data_aware": texts is not None, "texts": None if texts is None else len(texts),
              "target": runs[0].cfg.target().label(), "kv_bytes": cfg.kv_bytes,
              "moe": is_moe_config(first.get("text_config") or first)}
    describe = getattr(executor, "describe", None)
    return TrajectoryResult(results, config, describe() if describe is not None else {})


def _part_dirs(points: Sequence[Point]) -> dict[str, str]:
    """{checkpoint name: its parts directory's name}, unique."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for p in points:
        base = part_dir_name(p.name)
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}~{i}"
        used.add(name)
        out[p.name] = name
    return out
