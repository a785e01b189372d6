"""Every bad input of `headlens ov`: one line on stderr naming the problem, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import PROMPT

from headlens.cli import main


def bad(capsys, tmp_path: Path, *argv: str) -> str:
    out_dir = tmp_path / "out"
    capsys.readouterr()  # drop what building the fixture printed
    code = main(["ov", *argv, "--out-dir", str(out_dir), "--plot", "--json"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("headlens ov: error: ") or lines[0].startswith("headlens ov: error:"), err
    assert not out_dir.exists(), list(out_dir.rglob("*"))  # not even an empty directory
    return lines[0]


def test_nonexistent_path(capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(tmp_path / "nope.safetensors"), "--num-heads", "4")
    assert "no such file or directory" in msg


def test_unreadable_path(ckpts, capsys, tmp_path, monkeypatch):
    f = tmp_path / "locked.safetensors"
    shutil.copy(ckpts.path("llama", "gqa", "safetensors"), f)
    f.chmod(0)
    if os.geteuid() == 0:  # root reads any file whatever its mode: make the permission check see the mode
        from headlens.io import tensors

        monkeypatch.setattr(tensors.os, "access", lambda path, mode: not str(path).endswith("locked.safetensors"))
    assert "permission denied" in bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4")


def test_unsupported_file_type(capsys, tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    msg = bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4")
    assert "unsupported file type '.npz'" in msg and ".safetensors" in msg


def test_directory_without_weights(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    msg = bad(capsys, tmp_path, "--weights", str(tmp_path / "empty"), "--num-heads", "4")
    assert "has no model.safetensors" in msg


def test_corrupt_safetensors(capsys, tmp_path):
    f = tmp_path / "corrupt.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    assert "not a valid safetensors file" in bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4")


def test_truncated_safetensors(ckpts, capsys, tmp_path):
    src = ckpts.path("llama", "gqa", "safetensors").read_bytes()
    f = tmp_path / "truncated.safetensors"
    f.write_bytes(src[: len(src) // 2])
    assert "is truncated" in bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4")


def test_corrupt_state_dict(capsys, tmp_path):
    f = tmp_path / "broken.pt"
    f.write_bytes(b"PK\x03\x04 definitely not a zip")
    assert "not a loadable torch state dict" in bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4")


def test_pickle_with_code_is_refused(capsys, tmp_path):
    """weights_only=True: a pickle that would run code is refused, not executed."""
    f = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "obj": _Evil()}, f)
    msg = bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4")
    assert "not a loadable torch state dict" in msg
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("layer,expect", [("2", "--layer 2 out of range: "), ("-1", "--layer -1 out of range: ")])
def test_layer_out_of_range(ckpts, capsys, tmp_path, layer, expect):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--layer", layer)
    assert expect in msg and "has 2 layers (valid 0..1)" in msg


def test_head_out_of_range(ckpts, capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--head", "4")
    assert "--head 4 out of range" in msg and "(valid 0..3)" in msg


@pytest.mark.parametrize("k,expect", [("0", "--latent-dim must be positive"), ("-3", "--latent-dim must be positive"),
                                      ("17", "--latent-dim 17 is above the rank of W_OV (16): choose 1..16")])
def test_latent_dim_out_of_range(ckpts, capsys, tmp_path, k, expect):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--latent-dim", k)
    assert expect in msg


def test_heatmap_without_prompt(ckpts, capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--heatmap")
    assert "--heatmap needs --prompt" in msg


def test_empty_prompt(ckpts, capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--prompt", "  ")
    assert "--prompt is empty" in msg


def test_prompt_on_a_bare_state_dict(ckpts, capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "pt")), "--num-heads", "4",
              "--prompt", PROMPT)
    assert "--prompt needs config.json and tokenizer files" in msg


def test_non_finite_weights(ckpts, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpts.path("llama", "gqa", "safetensors")))
    sd["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    f = tmp_path / "nan.safetensors"
    save_file(sd, str(f))
    msg = bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "4", "--layer", "1", "--head", "0")
    assert "model.layers.1.self_attn.v_proj.weight has 1 non-finite values" in msg


def test_unknown_architecture(capsys, tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "weirdformer", "num_attention_heads": 2}))
    save_file({"blocks.0.mixer.in_proj.weight": torch.zeros(8, 4)}, str(d / "model.safetensors"))
    msg = bad(capsys, tmp_path, "--weights", str(d))
    assert "unsupported architecture 'weirdformer'" in msg
    for t in ("qwen3", "llama", "gpt2", "gpt_neox", "bert", "phi3", "mixtral", "olmoe", "qwen3_moe", "gemma2"):
        assert t in msg


def test_bare_state_dict_of_unknown_architecture(capsys, tmp_path):
    f = tmp_path / "weird.pt"
    torch.save({"blocks.0.mixer.in_proj.weight": torch.zeros(8, 4)}, f)
    msg = bad(capsys, tmp_path, "--weights", str(f), "--num-heads", "2")
    assert "cannot recognise the architecture" in msg and "supported model types" in msg


def test_bad_dtype_choice_lists_choices(ckpts, capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--dtype", "int8")
    assert "invalid choice: 'int8'" in msg and "float32" in msg and "bfloat16" in msg


def test_both_sources(ckpts, capsys, tmp_path):
    msg = bad(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--hf-repo", "a/b")
    assert "either --weights or --hf-repo" in msg


def test_malformed_repo_id(capsys, tmp_path):
    assert "not a hub repo id" in bad(capsys, tmp_path, "--hf-repo", "just-a-name")


def test_output_directory_not_writable(ckpts, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["ov", "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--plot", "--out-dir",
                 str(blocker / "sub")])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot create output directory" in err and len(err.strip().splitlines()) == 1
    assert not (blocker / "sub").exists()


def test_failed_write_leaves_no_partial_file(ckpts, capsys, tmp_path, monkeypatch):
    """An error while saving the picture leaves neither the target nor a temporary file behind."""
    import matplotlib.figure

    def explode(self, *a, **k):
        with open(a[0], "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", explode)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        main(["ov", "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--plot", "--out-dir", str(out)])
    assert not out.exists()  # not even the directory the run created
