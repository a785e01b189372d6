"""--truncate is the one way past the model's positions: sweep --calib and router cut a long text there when it
is given (and refuse it otherwise, tests/cli/test_bad_inputs.py); the token counts are the tokenizer's own."""

from __future__ import annotations

from tiny_models import MAX_POS, tokenizer_for

from headlens.cli import main
from headlens.moe.dump import load_dump

LONG = " ".join(["octopus hearts beat"] * 100)


def test_sweep_calib_truncate_cuts_at_the_positions(ckpts, capsys, tmp_path):
    tok = tokenizer_for("qwen3")
    assert len(tok(LONG)["input_ids"]) > MAX_POS
    calib = tmp_path / "calib.txt"
    calib.write_text(f"{LONG}\nshort text here\n")
    argv = ["sweep", "--weights", str(ckpts.path("qwen3", "gqa", "hf_dir")), "--calib", str(calib), "--layers", "0",
            "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    capsys.readouterr()
    assert main(argv + ["--truncate"]) == 0
    out, err = capsys.readouterr()
    n = MAX_POS + len(tok("short text here")["input_ids"])
    assert f"data-aware on {n} calibration tokens" in out, out
    assert "Token indices sequence length" not in err  # the tokenizer's own warning stays quiet


def test_router_truncate_cuts_at_the_positions(ckpts, capsys, tmp_path):
    argv = ["router", "--weights", str(ckpts.path("qwen3_moe", "gqa", "hf_dir")), "--prompt", LONG,
            "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    capsys.readouterr()
    assert main(argv + ["--truncate"]) == 0
    capsys.readouterr()
    report, layers, _ = load_dump(tmp_path / "router_dump")
    assert report.tokens == MAX_POS and all(r.indices.shape[0] == MAX_POS for r in layers)
