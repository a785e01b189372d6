"""The checkpoints of a trajectory and the training step of each.

A trajectory is given as local checkpoints (``weights``: model directories or weight files, and directories of
``checkpoint-<N>`` folders as transformers' Trainer writes them, which expand to those folders) or as revisions of
one hub repo (``hf_repo`` with ``revisions``: Pythia's ``step1000``, OLMo's ``stepXXXX-tokensYYYY``, any branch,
tag or commit). The step of each comes from, in this order:

1. ``steps`` given explicitly (one per checkpoint, in the order given);
2. its ``trainer_state.json`` (``global_step``, Trainer's own record; local checkpoints);
3. its name: ``checkpoint-<N>``, ``global_step<N>``, ``step<N>`` (the folder name or the revision);
4. the order given (0, 1, 2, ...), used only when no checkpoint has a step of its own.

Some checkpoints with a step and some without is refused (the two kinds of numbers do not share an axis), as are
two checkpoints with the same step or the same name. The checkpoints are returned sorted by step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from headlens.errors import HeadlensError

if TYPE_CHECKING:
    from headlens.io.source import ModelSource

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])(?:checkpoint-|global_step|step)[-_]?(\d+)(?![0-9])", re.IGNORECASE)
STEP_SOURCES = ("given", "trainer_state", "name", "order")


@dataclass
class Point:
    """One checkpoint of a trajectory."""

    name: str  # its key in the tables: the folder or file name, or the revision
    step: int
    step_from: str  # one of STEP_SOURCES
    where: str  # the path, or repo@revision
    source: "ModelSource"

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.name, "step": self.step, "step_from": self.step_from, "where": self.where}


def step_in_name(name: str) -> int | None:
    """The step a checkpoint's name carries (``checkpoint-500``, ``step1000``, ``step1000-tokens4B``,
    ``global_step20``), or None."""
    m = _STEP_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def trainer_step(directory: Path) -> int | None:
    """``global_step`` of ``directory/trainer_state.json`` (None without the file); a file that is not Trainer's
    state is refused, naming it."""
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HeadlensError(f"{path} is not readable JSON ({exc.__class__.__name__}): a trainer state is "
                            "transformers Trainer's record with `global_step`") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise HeadlensError(f"{path} has no non-negative integer `global_step` (got {step!r})")
    return step


def _holds_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() or any(directory.glob("*.safetensors"))


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Each path, or the ``checkpoint-<N>`` folders of a directory that holds them (in step order)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise HeadlensError(f"`weights` {raw}: no such file or directory")
        if p.is_dir():
            found = sorted((d for d in p.iterdir() if d.is_dir() and CHECKPOINT_DIR.match(d.name)),
                           key=lambda d: int(CHECKPOINT_DIR.match(d.name).group(1)))  # type: ignore[union-attr]
            if found:
                out.extend(found)
                continue
        out.append(p)
    return out


def own_models(paths: Sequence[str | Path]) -> list[Path]:
    """The directories among ``paths`` that hold ``checkpoint-<N>`` folders and also a model of their own (a
    Trainer's final save): :func:`expand` takes their folders, not that model."""
    out = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir() and _holds_model(p) and any(d.is_dir() and CHECKPOINT_DIR.match(d.name) for d in p.iterdir()):
            out.append(p)
    return out


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    names = [f"{p.parent.name}/{p.name}" for p in paths]  # run-a/checkpoint-500, run-b/checkpoint-500
    if len(set(names)) == len(names):
        return names
    dup = next(n for n in names if names.count(n) > 1)
    raise HeadlensError(f"two checkpoints are both named {dup!r}: give checkpoints with different names")


def assign_steps(names: list[str], own: list[tuple[int | None, str]], steps: Sequence[int] | None
                 ) -> list[tuple[int, str]]:
    """(step, where it came from) for each checkpoint: ``steps`` if given, else each one's own (trainer state or
    name) when all have one, else the order given (see the module docstring)."""
    if steps is not None:
        steps = list(steps)
        if len(steps) != len(names):
            raise HeadlensError(f"`steps` gives {len(steps)} steps for {len(names)} checkpoints: give one per "
                                "checkpoint, in the order of the checkpoints")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise HeadlensError(f"`steps` must be non-negative integers, got {steps}")
        return [(s, "given") for s in steps]
    have = [i for i, (s, _) in enumerate(own) if s is not None]
    if not have:
        return [(i, "order") for i in range(len(names))]
    if len(have) < len(names):
        missing = next(names[i] for i in range(len(names)) if own[i][0] is None)
        raise HeadlensError(f"checkpoint {missing!r} has no step (no trainer_state.json and none in its name) while "
                            "others have one: give `steps` for all of them, or checkpoints that all carry a step")
    return [(int(s), src) for s, src in own]  # type: ignore[arg-type]


def _checked(points: list[Point]) -> list[Point]:
    seen: dict[int, str] = {}
    for p in points:
        if p.step in seen:
            raise HeadlensError(f"checkpoints {seen[p.step]!r} and {p.name!r} both have step {p.step}: give `steps` "
                                "to tell them apart")
        seen[p.step] = p.name
    return sorted(points, key=lambda p: p.step)


def local_points(weights: Sequence[str | Path], steps: Sequence[int] | None = None, **source: Any) -> list[Point]:
    """The checkpoints of local ``weights`` (see :func:`expand`) with their steps; ``source`` holds the other
    :class:`~headlens.io.source.ModelSource` fields (``device``, ``trust_remote_code``, ...)."""
    from headlens.io.source import ModelSource

    if isinstance(weights, (str, Path)) or not weights:
        raise HeadlensError("`weights` must be a list of one or more checkpoints")
    paths = expand(weights)
    names = _unique_names(paths)
    own: list[tuple[int | None, str]] = []
    for p, name in zip(paths, names):
        s = trainer_step(p) if p.is_dir() else None
        own.append((s, "trainer_state") if s is not None else (step_in_name(p.name), "name"))
    found = assign_steps(names, own, steps)
    return _checked([Point(name, s, src, str(p), ModelSource(weights=str(p), **source))
                     for p, name, (s, src) in zip(paths, names, found)])


def hub_points(hf_repo: str, revisions: Sequence[str], steps: Sequence[int] | None = None, **source: Any
               ) -> list[Point]:
    """The ``revisions`` of ``hf_repo`` with their steps (from ``steps``, the revision names, or the order)."""
    from headlens.io.source import ModelSource

    if isinstance(revisions, str) or not revisions:
        raise HeadlensError("`revisions` must be a list of one or more hub revisions (branches, tags or commits)")
    revisions = [str(r) for r in revisions]
    if len(set(revisions)) != len(revisions):
        dup = next(r for r in revisions if revisions.count(r) > 1)
        raise HeadlensError(f"revision {dup!r} is given twice in `revisions`")
    own = [(step_in_name(r), "name") for r in revisions]
    found = assign_steps(revisions, own, steps)
    return _checked([Point(r, s, src, f"{hf_repo}@{r}", ModelSource(hf_repo=hf_repo, revision=r, **source))
                     for r, (s, src) in zip(revisions, found)])


def part_dir_name(name: str) -> str:
    """A checkpoint's name as one directory name (its parts live under ``<out_dir>/checkpoints/``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "checkpoint"
