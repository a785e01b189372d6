"""Every figure headlens writes, drawn on the embedded models, has a size a person can read at a glance (issue 14).

Each command runs once per module, in-process through ``headlens.cli.main`` into a temporary directory; every
PNG it writes and every frame of every GIF is then checked against pixel bounds (``PIL.Image.size``) and for
being blank. A case that breaks its bound today is marked ``xfail(strict=True)``, so the mark has to go when the
figure is fixed. ``test_every_figure_is_checked`` fails when a command starts writing a figure no case covers.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from headlens.cli import main

# Bounds, in pixels, for width and height each. A PNG is read on a laptop screen or in the HTML page at its own size:
# under 300 px its text is too small to read, over 2600 px it has to be scrolled or zoomed to be taken in.
PNG_BOUNDS = (300, 2600)
# The sphere animation labels every token of the prompt in a 3-D plot: at 600 x 600 the labels pile up and the
# bottom axis is cut off, so a frame needs at least 800 px a side; over 2000 px a GIF of 30 frames gets heavy.
GIF_BOUNDS = (800, 2000)

# The Makefile's tiny-lm prompt (LM_PROMPT), cut to two sentences to keep the module fast.
PROMPT = "The function returns a new list. If the argument is omitted, the default value is used."
CALIB = ["A QuerySet can be filtered, sliced and passed around without hitting the database.",
         "The module name is set when the package is imported.", "Changed in version 3.8: the parameter is new."]
EVAL = ["The exception is raised when the call fails.", "If the key is missing, the default value is returned."]

# command name -> argv, with {out} the command's own output directory and {tmp} the module's scratch directory
COMMANDS: dict[str, list[list[str]]] = {
    "ov": [["ov", "--layer", "3", "--head", "5", "--latent-dim", "8", "--prompt", PROMPT, "--heatmap", "--plot",
            "--out-dir", "{out}"]],
    "sweep": [["sweep", "--model", "tiny-lm", "--prompt", PROMPT, "--layers", "0:3", "--target-error", "0.3",
               "--out-dir", "{out}"]],
    # two layers: the frames are what is checked, and each one costs a 3-D plot with every token labelled
    "sphere": [["sphere", "--model", "tiny-lm", "--prompt", PROMPT, "--layers", "0,5", "--out-dir", "{out}"]],
    "diagram": [["diagram", "--layer", "2", "--out-dir", "{out}"]],
    "router": [["router", "--model", "tiny-moe", "--prompt", PROMPT, "--out-dir", "{out}"]],
    # the README's toy walk-through: a planted toy, 256 traced tokens, `ov --traces --heatmap` on them
    "toy-ov": [["toy", "create", "--out", "{tmp}/toy.safetensors", "--heads", "4", "--kv-heads", "2",
                "--plant", "geometric", "--plant-rank", "6"],
               ["toy", "trace", "--weights", "{tmp}/toy.safetensors", "--inputs", "anisotropic", "--out",
                "{tmp}/traces"],
               ["ov", "--weights", "{tmp}/toy.safetensors", "--num-heads", "4", "--traces", "{tmp}/traces",
                "--layer", "1", "--head", "2", "--latent-dim", "3", "--heatmap", "--plot", "--out-dir", "{out}"]],
    "toy-run": [["toy", "run", "--out-dir", "{out}"]],
    "toy-cluster": [["toy", "cluster", "--depth", "3", "--out-dir", "{out}"]],
    "compress": [["compress", "--model", "tiny-lm", "--layers", "0,1", "--target-error", "0.2",
                  "--calib", "{tmp}/calib.txt", "--eval", "{tmp}/eval.txt", "--out-dir", "{out}"]],
    # key latents: the scatter gains a fourth panel, the trade-off a line per part
    "compress-keys": [["compress", "--model", "tiny-lm", "--layers", "0,1", "--k", "16", "--latent", "data-aware",
                       "--keys", "data-aware", "--calib", "{tmp}/calib.txt", "--eval", "{tmp}/eval.txt",
                       "--out-dir", "{out}"]],
}

# (command, file name relative to its output directory, bounds, marks)
CASES = [
    ("ov", "all-MiniLM-L6-v2_layer3_head5.png", PNG_BOUNDS, ()),
    ("ov", "all-MiniLM-L6-v2_layer3_head5_heatmap.png", PNG_BOUNDS, ()),
    ("sweep", "sweep_rank_e90.png", PNG_BOUNDS, ()),
    ("sweep", "sweep_qk_rank_e90.png", PNG_BOUNDS, ()),
    ("sweep", "sweep_rel_error.png", PNG_BOUNDS, ()),
    ("sweep", "sweep_white_heldout.png", PNG_BOUNDS, ()),
    ("sweep", "sweep_budget.png", PNG_BOUNDS, ()),
    ("sphere", "tokens.gif", GIF_BOUNDS, ()),
    ("sphere", "sphere_metrics.png", PNG_BOUNDS, ()),
    ("diagram", "all-MiniLM-L6-v2_layer2_diagram.png", PNG_BOUNDS, ()),
    ("router", "router_load.png", PNG_BOUNDS, ()),
    ("router", "router_coactivation.png", PNG_BOUNDS, ()),
    ("router", "router_entropy.png", PNG_BOUNDS, ()),
    ("toy-ov", "toy_layer1_head2.png", PNG_BOUNDS, ()),
    ("toy-ov", "toy_layer1_head2_heatmap.png", PNG_BOUNDS, ()),  # 4565 x 4400 at 256 tokens before issue 14
    ("toy-run", "sphere/tokens.gif", GIF_BOUNDS, ()),
    ("toy-run", "sphere/sphere_metrics.png", PNG_BOUNDS, ()),
    ("toy-cluster", "tokens.gif", GIF_BOUNDS, ()),
    ("toy-cluster", "sphere_metrics.png", PNG_BOUNDS, ()),
    ("compress", "compress_scatter.png", PNG_BOUNDS, ()),
    ("compress", "compress_tradeoff.png", PNG_BOUNDS, ()),
    ("compress-keys", "compress_scatter.png", PNG_BOUNDS, ()),
    ("compress-keys", "compress_tradeoff.png", PNG_BOUNDS, ()),
]


class Runs:
    """Runs each command's argv list once, on first use, and keeps its output directory."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}
        (root / "calib.txt").write_text("\n".join(CALIB) + "\n")
        (root / "eval.txt").write_text("\n".join(EVAL) + "\n")

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            out = self.root / name
            for argv in COMMANDS[name]:
                argv = [a.format(out=out, tmp=self.root) for a in argv]
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    rc = main(argv)
                assert rc == 0, f"headlens {' '.join(argv)} exited {rc}:\n{printed.getvalue()[-2000:]}"
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HEADLENS_DEVICE", os.environ.get("HEADLENS_DEVICE", "cpu"))
        yield Runs(tmp_path_factory.mktemp("figures"))


def _check_size(what: str, size: tuple[int, int], bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    w, h = size
    assert lo <= w <= hi and lo <= h <= hi, f"{what} is {w}x{h} px; width and height must each be in [{lo}, {hi}]"


def _check_not_blank(what: str, im: Image.Image) -> None:
    std = float(np.asarray(im.convert("RGB"), dtype=np.float64).std())
    assert std > 1.0, f"{what} is blank (pixel std {std:.3f})"


def _ids(case) -> str:
    return f"{case[0]}:{case[1]}"


@pytest.mark.parametrize("command,name,bounds", [pytest.param(*c[:3], marks=c[3], id=_ids(c)) for c in CASES])
def test_figure_within_bounds(runs, command, name, bounds):
    path = runs(command) / name
    assert path.is_file(), f"headlens {command} wrote no {name}: {sorted(p.name for p in path.parent.iterdir())}"
    with Image.open(path) as im:
        if path.suffix == ".gif":
            assert im.format == "GIF"
            n = 0
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                _check_not_blank(f"{path.name} frame {i}", frame)
                _check_size(f"{path.name} frame {i}", frame.size, bounds)
                n += 1
            assert n >= 2, f"{path.name} has {n} frame(s): an animation through the layers has one per layer"
        else:
            assert im.format == "PNG"
            _check_not_blank(path.name, im)
            _check_size(path.name, im.size, bounds)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_figure_is_checked(runs, command):
    out = runs(command)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".png", ".gif")}
    checked = {name for c, name, _, _ in CASES if c == command}
    assert written == checked, f"headlens {command}: figures written {sorted(written)}, checked {sorted(checked)}"


@pytest.mark.parametrize("bounds", [PNG_BOUNDS, GIF_BOUNDS])
def test_the_checks_can_fail(bounds):
    """The checks above reject what they must: too large, too small, blank."""
    lo, hi = bounds
    with pytest.raises(AssertionError, match="must each be in"):
        _check_size("big", (4565, 4400), bounds)
    with pytest.raises(AssertionError, match="must each be in"):
        _check_size("narrow", (lo - 1, hi), bounds)
    _check_size("fits", (lo, hi), bounds)
    with pytest.raises(AssertionError, match="blank"):
        _check_not_blank("white", Image.new("RGB", (lo, lo), "white"))
