"""`headlens ov` through the CLI in-process: the seed's lines, every input format, the hub cache layout."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from reference import dense_svals, dense_wov
from tiny_models import PROMPT, make_hub_cache

from headlens.cli import main

SEED_LINES = [
    r"layer=\d+ head=\d+ num_heads=\d+ num_value_heads=\d+",
    r"W_OV shape: \(\d+, \d+\) rank: \d+",
    r"condition number: \d\.\d{3}e[+-]\d\d",
    r"latent_dim=\d+ rel_error=\d\.\d{3}e[+-]\d\d cache_error=\d\.\d{3}e[+-]\d\d",
    r"singular values \(top 10\):( \d\.\d{3}e[+-]\d\d){1,10}",
    r"cumulative energy \(top 10\):( \d\.\d{3}){1,10}",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_seed_lines(out: str) -> list[str]:
    lines = out.strip().splitlines()
    for pattern, line in zip(SEED_LINES, lines):
        assert re.fullmatch(pattern, line), (pattern, line)
    return lines


def test_seed_invocation_on_a_state_dict(ckpts, capsys, tmp_path):
    """The seed's first usage line: --weights state_dict.pt --num-heads N --layer --head --latent-dim."""
    path = ckpts.path("qwen3", "gqa", "pt")
    model, _ = ckpts.model("qwen3", "gqa")
    code, out, err = run(capsys, "ov", "--weights", str(path), "--num-heads", "4", "--layer", "1", "--head", "3",
                         "--latent-dim", "8", "--out-dir", str(tmp_path))
    assert code == 0, err
    lines = check_seed_lines(out)
    assert lines[0] == "layer=1 head=3 num_heads=4 num_value_heads=2"
    assert lines[1] == "W_OV shape: (48, 48) rank: 16"
    s = dense_svals(dense_wov(model, "qwen3", 1, 3), 16)
    shown = [float(v) for v in lines[4].split(":")[1].split()]
    np.testing.assert_allclose(shown, s[:10], rtol=2e-3)
    E = np.cumsum(s**2) / np.sum(s**2)
    assert lines[3] == (f"latent_dim=8 rel_error={np.sqrt(1 - E[7]):.3e} "
                        f"cache_error={lines[3].split('cache_error=')[1]}")
    assert "seeded Gaussian probe tokens" in out
    assert not any(tmp_path.iterdir())  # nothing asked for, nothing written


def test_seed_invocation_with_plot_heatmap_json(ckpts, capsys, tmp_path):
    d = ckpts.path("llama", "gqa", "hf_dir")
    code, out, err = run(capsys, "ov", "--weights", str(d), "--auto-infer", "--layer", "1", "--head", "2",
                         "--latent-dim", "4", "--prompt", PROMPT, "--heatmap", "--plot", "--out-dir", str(tmp_path),
                         "--json")
    assert code == 0, err
    lines = check_seed_lines(out)
    name = d.name
    plot = tmp_path / f"{name}_layer1_head2.png"
    heat = tmp_path / f"{name}_layer1_head2_heatmap.png"
    assert lines[6] == f"saved plot -> {plot}"
    assert lines[7] == f"saved heatmap -> {heat}"
    for p in (plot, heat):
        assert p.read_bytes()[:8] == PNG_MAGIC
    js = json.loads((tmp_path / f"{name}_layer1_head2.json").read_text())
    assert len(js["singular_values"]) == 16 and len(js["cumulative_energy"]) == 16
    assert js["cache_inputs"] == "prompt" and js["data_aware"]["n_tokens"] == len(js["tokens"])
    assert np.asarray(js["attention"]).shape == (len(js["tokens"]),) * 2
    assert "data-aware (whitened) error=" in out and "plain cache_error=" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".headlens-manifest.json") == sorted(
        [plot.name, heat.name, f"{name}_layer1_head2.json"])


def test_plot_path_override(ckpts, capsys, tmp_path):
    d = ckpts.path("gpt2", "mha", "hf_dir")
    target = tmp_path / "sub" / "mine.png"
    code, out, err = run(capsys, "ov", "--weights", str(d), "--plot", "--plot-path", str(target), "--layer", "0",
                         "--head", "1", "--latent-dim", "3", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert f"saved plot -> {target}" in out
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "r.json").read_text())["files"]["plot"] == str(target)


@pytest.mark.parametrize("fmt", ["hf_dir", "hf_sharded", "safetensors", "pt", "bin"])
def test_all_formats_print_the_same_report(ckpts, capsys, tmp_path, fmt):
    path = ckpts.path("phi3", "gqa", fmt)
    extra = ["--num-heads", "4"] if fmt in ("safetensors", "pt", "bin") else ["--auto-infer"]
    code, out, err = run(capsys, "ov", "--weights", str(path), *extra, "--layer", "1", "--head", "1",
                         "--latent-dim", "5")
    assert code == 0, err
    ref_code, ref_out, _ = run(capsys, "ov", "--weights", str(ckpts.path("phi3", "gqa", "hf_dir")), "--layer", "1",
                               "--head", "1", "--latent-dim", "5")
    assert out.splitlines()[:6] == ref_out.splitlines()[:6]


def test_bare_state_dict_shape_inference_and_contradictions(ckpts, capsys):
    pt = str(ckpts.path("mistral", "gqa", "pt"))
    code, out, _ = run(capsys, "ov", "--weights", pt, "--num-heads", "4", "--num-kv-heads", "2", "--latent-dim", "2")
    assert code == 0 and out.startswith("layer=0 head=0 num_heads=4 num_value_heads=2")
    code, _, err = run(capsys, "ov", "--weights", pt, "--num-heads", "4", "--num-kv-heads", "4")
    assert code == 2 and "--num-kv-heads 4 contradicts the weights" in err
    code, _, err = run(capsys, "ov", "--weights", pt, "--num-heads", "5")
    assert code == 2 and "not divisible by 5 heads" in err
    code, _, err = run(capsys, "ov", "--weights", pt)
    assert code == 2 and "--num-heads" in err
    code, _, err = run(capsys, "ov", "--weights", pt, "--auto-infer")
    assert code == 2 and "--auto-infer needs a config.json" in err
    d = str(ckpts.path("mistral", "gqa", "hf_dir"))
    code, _, err = run(capsys, "ov", "--weights", d, "--num-heads", "8")
    assert code == 2 and "contradicts config.json" in err


def test_mqa_and_mha_head_mapping(ckpts, capsys):
    for variant, G in (("mqa", 1), ("mha", 4)):
        d = str(ckpts.path("qwen2", variant, "hf_dir"))
        code, out, err = run(capsys, "ov", "--weights", d, "--head", "3", "--latent-dim", "2")
        assert code == 0, err
        assert out.splitlines()[0] == f"layer=0 head=3 num_heads=4 num_value_heads={G}"
        assert f"reads kv head {3 // (4 // G)}" in out


def test_unknown_type_with_standard_names_works(ckpts, capsys, tmp_path):
    src = ckpts.path("llama", "gqa", "hf_dir")
    dst = tmp_path / "custom"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "my_custom_llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    code, out, err = run(capsys, "ov", "--weights", str(dst), "--latent-dim", "2")
    assert code == 0, err
    assert out.splitlines()[1] == "W_OV shape: (48, 48) rank: 16"


# -------------------------------------------------------------------------------- weight-only laziness


def test_weight_only_reads_just_the_heads_tensors(ckpts, capsys, monkeypatch):
    """No model is built and only the requested layer's v/o (and norm) tensors are touched."""
    import transformers

    from headlens.io import tensors

    def boom(*a, **k):
        raise AssertionError("weight-only analysis built a model")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    reads: list[tuple[str, object]] = []
    orig = tensors.SafetensorsSource.read

    def spy(self, name, index=None):
        reads.append((name, index))
        return orig(self, name, index)

    monkeypatch.setattr(tensors.SafetensorsSource, "read", spy)
    d = str(ckpts.path("qwen3", "gqa", "hf_sharded"))
    code, out, err = run(capsys, "ov", "--weights", d, "--layer", "1", "--head", "2", "--latent-dim", "2",
                         "--fold-norm")
    assert code == 0, err
    names = sorted({n for n, _ in reads})
    assert names == ["model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.o_proj.weight",
                     "model.layers.1.self_attn.v_proj.weight"]
    assert all(idx is not None for n, idx in reads if "proj" in n)  # sliced, never the whole matrix


# ------------------------------------------------------------------------------------------ hub cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_repo_from_local_cache(ckpts, capsys, tmp_path, offline):
    model, tok = ckpts.model("qwen3", "gqa")
    cache = tmp_path / "hub"
    make_hub_cache(model, tok, cache, "tiny-org/tiny-qwen3")
    code, out, err = run(capsys, "ov", "--hf-repo", "tiny-org/tiny-qwen3", "--cache-dir", str(cache),
                         "--auto-infer", "--layer", "1", "--head", "3", "--latent-dim", "4", "--prompt", PROMPT,
                         "--heatmap", "--plot", "--out-dir", str(tmp_path / "out"))
    assert code == 0, err
    check_seed_lines(out)
    assert (tmp_path / "out" / "tiny-qwen3_layer1_head3_heatmap.png").exists()
    ref = dense_svals(dense_wov(model, "qwen3", 1, 3), 10)
    shown = [float(v) for v in out.splitlines()[4].split(":")[1].split()]
    np.testing.assert_allclose(shown, ref, rtol=2e-3)


def test_hub_revision_pins_a_snapshot(ckpts, capsys, tmp_path, offline):
    model, tok = ckpts.model("gpt_neox", "mha")
    cache = tmp_path / "hub"
    sha = "ab" * 20
    make_hub_cache(model, tok, cache, "org/neox", revision_sha=sha)
    code, out, err = run(capsys, "ov", "--hf-repo", "org/neox", "--revision", sha, "--cache-dir", str(cache),
                         "--auto-infer", "--head", "2", "--latent-dim", "3", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["model"]["revision"] == sha
    code, _, err = run(capsys, "ov", "--hf-repo", "org/neox", "--revision", "cd" * 20, "--cache-dir", str(cache))
    assert code == 2 and "org/neox" in err


def test_dtype_rounds_the_weights(ckpts, capsys, tmp_path):
    model, _ = ckpts.model("llama", "gqa")
    d = str(ckpts.path("llama", "gqa", "hf_dir"))
    code, out, err = run(capsys, "ov", "--weights", d, "--dtype", "bfloat16", "--head", "1", "--latent-dim", "2",
                         "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    blk = model.model.layers[0].self_attn
    Wv = blk.v_proj.weight.detach().bfloat16().double()[0:16]
    Wo = blk.o_proj.weight.detach().bfloat16().double()[:, 16:32]
    ref = np.linalg.svd((Wo @ Wv).numpy(), compute_uv=False)[:16]
    r = json.loads((tmp_path / "r.json").read_text())
    np.testing.assert_allclose(r["singular_values"], ref, rtol=1e-9)
    assert r["dtype"] == "bfloat16" and r["rank_eps_dtype"] == "float32"


def test_hub_sharded_repo_needs_only_the_layers_shards(ckpts, capsys, tmp_path, offline):
    """Weight-only analysis of a sharded hub repo opens only the shards that hold that layer's attention."""
    model, tok = ckpts.model("llama", "gqa")
    cache = tmp_path / "hub"
    snap = make_hub_cache(model, tok, cache, "org/sharded", sharded=True)
    index = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"]
    need = {index[f"model.layers.1.self_attn.{n}_proj.weight"] for n in ("v", "o")}
    need |= {index[f"model.layers.0.self_attn.{n}_proj.weight"] for n in ("v", "o")}  # shape check
    need.add(index["model.layers.1.input_layernorm.weight"])
    removed = [s for s in set(index.values()) if s not in need]
    assert removed, "fixture must have shards this analysis does not need"
    for s in removed:
        (snap / s).unlink()
    code, out, err = run(capsys, "ov", "--hf-repo", "org/sharded", "--cache-dir", str(cache), "--layer", "1",
                         "--head", "0", "--latent-dim", "2")
    assert code == 0, err
    assert out.splitlines()[1] == "W_OV shape: (48, 48) rank: 16"


def test_hub_not_cached_and_unreachable(capsys, tmp_path, offline):
    code, out, err = run(capsys, "ov", "--hf-repo", "Qwen/Qwen3-0.6B", "--cache-dir", str(tmp_path / "empty"),
                         "--auto-infer", "--out-dir", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "Qwen/Qwen3-0.6B is not in the local hub cache" in err and "hf download Qwen/Qwen3-0.6B" in err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_and_version():
    env_py = sys.executable
    r = subprocess.run([env_py, "-m", "headlens", "ov", "--weights", "/nonexistent/x.pt", "--num-heads", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "headlens ov: error: --weights /nonexistent/x.pt: no such file or directory"
    r = subprocess.run([env_py, "-m", "headlens", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("headlens ")


def test_unreachable_hub_without_offline_flag_uses_the_cache(ckpts, capsys, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset but no route to the hub: cached repos work, others fail fast with one line."""
    from headlens.io import hub

    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import under `make test`
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    model, tok = ckpts.model("bert", "mha")
    cache = tmp_path / "hub"
    make_hub_cache(model, tok, cache, "org/bert")
    code, out, err = run(capsys, "ov", "--hf-repo", "org/bert", "--cache-dir", str(cache), "--latent-dim", "2")
    assert code == 0, err
    code, out, err = run(capsys, "ov", "--hf-repo", "org/other", "--cache-dir", str(cache))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "org/other is not in the local hub cache" in err and "HF_HUB_OFFLINE" not in err
