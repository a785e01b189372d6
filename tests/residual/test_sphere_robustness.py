"""``sphere`` under Ctrl-C, from a script without a ``__main__`` guard, with crashing workers, an absurd frame
duration and more workers than cores."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import transformers as T
from PIL import Image
from tiny_models import PROMPT, build_tiny, build_tokenizer, save_checkpoint

from headlens.cli import main
from headlens.report import sphere_frames
from headlens.report.sphere_frames import render_frame, start_pool, stop_pool, write_gif

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A tiny Llama with many layers, so that drawing its frames takes a few seconds."""
    model = build_tiny(T.LlamaConfig, T.LlamaModel, 0, vocab_size=512, hidden_size=32, intermediate_size=32,
                       num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    d = tmp_path_factory.mktemp("deep")
    save_checkpoint(model, build_tokenizer("none"), d, "hf_dir")
    return d


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _argv(deep: Path, out: Path, workers: int = 2) -> list[str]:
    return ["sphere", "--weights", str(deep), "--prompt", " ".join([PROMPT] * 20), "--truncate",
            "--workers", str(workers), "--out-dir", str(out)]


def test_ctrl_c_is_one_line_and_exit_130(deep, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "headlens", *_argv(deep, tmp_path / "o")], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    header = proc.stdout.readline()  # printed once the model has loaded and run
    assert "24 of 24 layers" in header, header
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group, workers included
    _out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if line.startswith("headlens")] == ["headlens: interrupted"]
    assert not (tmp_path / "o" / "tokens.gif").exists()


def test_a_script_without_main_guard_is_not_rerun_in_workers(deep, tmp_path):
    script = tmp_path / "run_sphere.py"
    script.write_text(textwrap.dedent(f"""
        from headlens.cli import main
        rc = main({_argv(deep, tmp_path / "o")!r})
        print("RC", rc, flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("RC ") == 1 and "RC 0" in done.stdout
    assert done.stdout.count("24 of 24 layers") == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "o" / "tokens.gif").exists()


def test_crashed_workers_fall_back_to_drawing_here(deep, tmp_path, monkeypatch, capsys):
    def broken_start(self):
        self._started = True
        pool = start_pool(2)
        with pytest.raises(BrokenProcessPool):
            pool.submit(os._exit, 1).result()  # a worker dies: the pool is broken
        self.executor = pool

    monkeypatch.setattr(sphere_frames.RendererPool, "start", broken_start)
    argv = _argv(deep, tmp_path / "o")
    argv[argv.index("--prompt") + 1] = PROMPT
    assert main(argv) == 0
    gif = Image.open(tmp_path / "o" / "tokens.gif")
    assert gif.n_frames == 24


def test_frame_seconds_past_what_a_gif_holds(tmp_path, capsys):
    assert main(["sphere", "--prompt", "hi there", "--frame-seconds", "1e12", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["headlens sphere: error: --frame-seconds must be at most 655.35 (the longest frame a GIF holds), "
                   "got 1e+12"]
    assert main(["sphere", "--prompt", "hi there", "--frame-seconds", "nan", "--out-dir", str(tmp_path / "o")]) == 2
    png = render_frame({"points": [[1.0, 0.0, 0.0]] * 4, "positions": [0, 1, 2, 3], "tokens": list("abcd"),
                        "title": "t", "labels": False})
    write_gif(tmp_path / "g.gif", [png, png], 1e12)  # the library caps instead of overflowing
    gif = Image.open(io.BytesIO((tmp_path / "g.gif").read_bytes()))
    assert gif.info["duration"] == 655_350


def test_workers_are_capped_to_the_cores(monkeypatch):
    monkeypatch.setattr(sphere_frames, "usable_cores", lambda: 2)
    pool = start_pool(64)
    try:
        assert pool is not None and pool._max_workers == 2
    finally:
        stop_pool(pool, now=True)
    monkeypatch.setattr(sphere_frames, "usable_cores", lambda: 1)
    assert start_pool(64) is None
