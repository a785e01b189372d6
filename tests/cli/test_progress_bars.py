"""Progress bars: headlens's own on a terminal's stderr, never transformers' "Loading weights", none on a pipe.

Each command runs in a subprocess whose stderr is a pseudo-terminal of 120 columns (tqdm draws nothing on a
0-column one) and whose stdout is a pipe. The control run shows that this very setup does print transformers'
bar when a model is loaded without headlens, so the check can fail.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY_LM = str(Path(SRC) / "headlens" / "models" / "tiny-lm")
PROMPT = "The function returns a new list. If the argument is omitted, the default value is used."


def _run(argv: list[str], tty: bool) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python argv`` with stderr on a 120-column pty (``tty``) or a pipe."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TQDM_DISABLE", None)
    if not tty:
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read().decode()
    p.wait(timeout=600)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode(errors="replace")


def test_control_transformers_prints_its_bar_on_this_terminal():
    code = (f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({TINY_LM!r}); "
            "print('loaded')")
    rc, out, err = _run(["-c", code], tty=True)
    assert rc == 0 and "loaded" in out
    if "Loading weights" not in err:
        pytest.skip("this transformers version draws no loading bar here: nothing to suppress")
    assert "it/s" in err or "%|" in err


@pytest.mark.parametrize("command", [
    ["sweep", "--model", "tiny-lm", "--prompt", PROMPT, "--k", "8"],
    ["sphere", "--model", "tiny-lm", "--prompt", PROMPT, "--layers", "0:2"],
    ["generate", "--model", "tiny-lm", "--prompt", PROMPT, "--max-new-tokens", "4"],
])
def test_only_headlens_bars_on_a_terminal_and_none_on_a_pipe(tmp_path, command):
    argv = ["-m", "headlens", *command, "--out-dir", str(tmp_path / "tty")]
    rc, out, err = _run(argv, tty=True)
    assert rc == 0, err[-2000:]
    assert "Loading weights" not in err and "checkpoint shards" not in err, err[-2000:]
    assert "%|" in err, f"no headlens progress bar on the terminal:\n{err[-2000:]}"
    assert "%|" not in out  # bars never go to stdout
    rc, out, err = _run(["-m", "headlens", *command, "--out-dir", str(tmp_path / "pipe")], tty=False)
    assert rc == 0, err[-2000:]
    assert err == "", err[-2000:]  # not a terminal: quiet
    assert "%|" not in out
