"""``headlens compress`` end to end on the embedded models: the outputs and their fields, the trend of the
measured loss with the target, the budget of ``headlens sweep`` read back, and the saved checkpoint reloaded
through transformers reproducing the measured KL and perplexity (checked with explicit log-softmax loops)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from headlens.cli import main
from headlens.io.embedded import default_texts, embedded_dir
from headlens.io.tables import read_table

FIELDS = ("target", "latent", "kv_bytes_per_token_before", "kv_bytes_per_token_after", "saving", "kl_mean", "kl_p95",
          "top1_agreement", "ppl_before", "ppl_after", "embedding_cosine_mean", "embedding_cosine_min",
          "neighbour_agreement", "layers")
LAYER_FIELDS = ("layer", "predicted_error", "value_path_error", "isolated_error", "accumulated_error")


def _eval_file(tmp_path: Path, name: str, n: int) -> Path:
    lines = default_texts(name).eval[:n]
    path = tmp_path / f"eval-{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(capsys, *argv) -> tuple[str, str]:
    capsys.readouterr()
    code = main(["compress", *argv])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    return out, err


def _by_latent(summary: dict, allocation: str = "budget") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in summary["configurations"]:
        if r["allocation"] == allocation:
            out.setdefault(r["latent"], []).append(r)
    return {k: sorted(v, key=lambda r: r["target"]) for k, v in out.items()}


def test_tiny_lm_loss_grows_with_the_target(capsys, tmp_path):
    out_dir = tmp_path / "out"
    _run(capsys, "--model", "tiny-lm", "--target-error", "0.05,0.2,0.5", "--eval",
         str(_eval_file(tmp_path, "tiny-lm", 8)), "--out-dir", str(out_dir))
    names = {"compress_summary.json", "compress_layers.csv", "compress_tradeoff.csv", "compress_scatter.png",
             "compress_tradeoff.png", "compress.html"}
    assert names <= {p.name for p in out_dir.iterdir()}
    s = json.loads((out_dir / "compress_summary.json").read_text())
    assert s["task"] == "causal-lm" and s["layers"] == list(range(6)) and s["calibration_tokens"] > 1000
    confs = s["configurations"]
    assert len(confs) == 12  # 3 targets x 2 latent kinds x (budget, uniform of the same bytes)
    for r in confs:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert r["embedding_cosine_mean"] is None and r["neighbour_agreement"] is None
        assert r["kv_bytes_per_token_before"] == 6 * 2 * 2 * 64 * 2  # layers x (k, v) x kv heads x hd x 2 bytes
        assert r["kv_bytes_per_token_after"] == 6 * 2 * 64 * 2 + r["latent_dims"] * 2
        assert [e["layer"] for e in r["layers"]] == list(range(6))
        assert all(set(LAYER_FIELDS) <= set(e) for e in r["layers"])
        assert r["ppl_before"] == confs[0]["ppl_before"]  # the same unmodified model every time
    uniform = {r["matches"]: r for r in confs if r["allocation"] == "uniform"}
    for kind, rows in _by_latent(s).items():
        kls = [r["kl_mean"] for r in rows]
        acc = [np.mean([e["accumulated_error"] for e in r["layers"]]) for r in rows]
        assert kls == sorted(kls) and kls[0] < kls[-1] / 4, (kind, kls)  # the trend, not a tuned number
        assert acc == sorted(acc), (kind, acc)
        assert [r["saving"] for r in rows] == sorted(r["saving"] for r in rows)
        assert all(r["ppl_after"] > r["ppl_before"] * 0.99 for r in rows)
        for r in rows:
            assert uniform[r["name"]]["kv_bytes_per_token_after"] == r["kv_bytes_per_token_after"]
            assert all(e["predicted_error"] <= r["target"] + 1e-9 for e in r["layers"])
    layers = read_table(out_dir / "compress_layers.csv")
    trade = read_table(out_dir / "compress_tradeoff.csv")
    assert len(layers) == 12 * 6 and len(trade) == 12
    assert {c["better"] for c in s["comparisons"]} <= {"budget", "uniform", "data-aware", "plain", "equal", None}
    assert len([c for c in s["comparisons"] if c["b"].startswith("uniform")]) == 6


def test_the_sweep_budget_is_read_back(capsys, tmp_path):
    sweep_dir = tmp_path / "sw"
    capsys.readouterr()
    assert main(["sweep", "--model", "tiny-lm", "--no-qk", "--target-error", "0.3", "--out-dir", str(sweep_dir)]) == 0
    budget = read_table(sweep_dir / "sweep_budget.csv")
    out_dir = tmp_path / "out"
    _run(capsys, "--model", "tiny-lm", "--budget", str(sweep_dir / "sweep_budget.csv"), "--latent", "plain", "--eval",
         str(_eval_file(tmp_path, "tiny-lm", 3)), "--out-dir", str(out_dir))
    s = json.loads((out_dir / "compress_summary.json").read_text())
    (r,) = [r for r in s["configurations"] if r["allocation"] == "budget"]
    want = {str(layer): [row["k_plain"] for row in budget if row["layer"] == layer] for layer in range(6)}
    assert r["ks"] == want and r["budget"] == "file"
    # the same target through --target-error gives the same sizes: one budgeting rule for both commands
    out2 = tmp_path / "out2"
    _run(capsys, "--model", "tiny-lm", "--target-error", "0.3", "--latent", "plain", "--eval",
         str(_eval_file(tmp_path, "tiny-lm", 3)), "--out-dir", str(out2))
    s2 = json.loads((out2 / "compress_summary.json").read_text())
    assert [r2["ks"] for r2 in s2["configurations"] if r2["allocation"] == "budget"] == [want]


def test_minilm_cosine_falls_as_the_target_grows(capsys, tmp_path):
    out_dir = tmp_path / "out"
    _run(capsys, "--model", "minilm", "--target-error", "0.1,0.3,0.6", "--out-dir", str(out_dir))
    s = json.loads((out_dir / "compress_summary.json").read_text())
    assert s["task"] == "embedding" and s["eval_texts"] == 25
    for r in s["configurations"]:
        assert r["kl_mean"] is None and r["ppl_before"] is None and r["top1_agreement"] is None
        assert 0 <= r["neighbour_agreement"] <= 1 and r["embedding_cosine_min"] <= r["embedding_cosine_mean"] <= 1
    for kind, rows in _by_latent(s).items():
        cos = [r["embedding_cosine_mean"] for r in rows]
        assert cos == sorted(cos, reverse=True) and cos[0] > cos[-1], (kind, cos)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max()
    return z - m - np.log(np.sum(np.exp(z - m)))


def test_saved_model_reloads_and_reproduces_kl_and_perplexity(capsys, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    eval_file = _eval_file(tmp_path, "tiny-lm", 4)
    save = tmp_path / "compressed"
    out_dir = tmp_path / "out"
    umask = os.umask(0o027)
    try:
        _run(capsys, "--model", "tiny-lm", "--k", "12", "--latent", "data-aware", "--eval", str(eval_file),
             "--out-dir", str(out_dir), "--save-model", str(save))
    finally:
        os.umask(umask)
    # every output follows the umask: the model's directory and safetensors as the report's files
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (save, out_dir, *save.iterdir(),
                                                                                      *out_dir.iterdir())}
    assert modes == {**{name: 0o640 for name in modes}, "compressed": 0o750, "out": 0o750}, modes
    s = json.loads((out_dir / "compress_summary.json").read_text())
    (r,) = s["configurations"]
    assert r["allocation"] == "uniform" and r["latent"] == "data-aware" and r["latent_dims"] == 12 * 2 * 6
    plan = json.loads((save / "headlens_latent.json").read_text())
    assert plan["info"]["configuration"] == r["name"] and [p["k"] for p in plan["layers"]] == [[12, 12]] * 6
    assert plan["info"]["measured"]["kl_mean"] == r["kl_mean"]
    # saved in the original's storage type (tiny-lm: bfloat16), though the run computed in float32: the same size,
    # the same config dtype, so a plain from_pretrained runs it as it runs the original
    assert plan["storage_dtype"] == "bfloat16" and plan["compute_dtype"] == "float32" == plan["info"]["dtype"]
    original = load_file(str(embedded_dir("tiny-lm") / "model.safetensors"))
    saved = load_file(str(save / "model.safetensors"))
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in original.items()}
    size = (embedded_dir("tiny-lm") / "model.safetensors").stat().st_size
    assert (save / "model.safetensors").stat().st_size <= 1.01 * size
    assert json.loads((save / "config.json").read_text())["dtype"] == "bfloat16"
    plain = AutoModel.from_pretrained(str(save))
    assert type(plain).__name__ == "Qwen3Model" and plain.dtype == torch.bfloat16
    orig = AutoModelForCausalLM.from_pretrained(str(embedded_dir("tiny-lm")), dtype=torch.float32).eval()
    comp = AutoModelForCausalLM.from_pretrained(str(save), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(save))
    kls, nll_o, nll_c, agree = [], 0.0, 0.0, 0
    for text in eval_file.read_text().splitlines():
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lo = orig(input_ids=ids).logits[0].double().numpy()
            lc = comp(input_ids=ids).logits[0].double().numpy()
        for i in range(ids.shape[1] - 1):
            p, q = _log_softmax(lo[i]), _log_softmax(lc[i])
            kls.append(float(np.sum(np.exp(p) * (p - q))))
            nll_o -= p[int(ids[0, i + 1])]
            nll_c -= q[int(ids[0, i + 1])]
            agree += int(np.argmax(lo[i]) == np.argmax(lc[i]))
    n = len(kls)
    assert r["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-6, abs=1e-9)
    assert r["kl_p95"] == pytest.approx(np.percentile(kls, 95), rel=1e-6, abs=1e-9)
    assert r["ppl_before"] == pytest.approx(np.exp(nll_o / n), rel=1e-6)
    assert r["ppl_after"] == pytest.approx(np.exp(nll_c / n), rel=1e-6)
    assert r["top1_agreement"] == pytest.approx(agree / n, abs=1e-12)
    assert r["kl_mean"] > 1e-3  # something was compressed
    # the factors an MLA cache stores rebuild the saved value weights, W_V^g Q_g = U_g P_g, to bfloat16's rounding;
    # and each saved block keeps rank k at that precision: the rounding moves singular values by at most
    # ||rounding||_2 <= eps ||W||_F, so sigma_k stands above that tolerance and sigma_{k+1} below it
    eps = torch.finfo(torch.bfloat16).eps
    factors = load_file(str(save / "latent_factors.safetensors"))
    for layer in range(6):
        W = saved[f"model.layers.{layer}.self_attn.v_proj.weight"].double()
        for g in range(2):
            up, down = factors[f"layer{layer}.group{g}.up"].double(), factors[f"layer{layer}.group{g}.down"].double()
            assert up.shape == (64, 12) and down.shape == (12, 256)
            block, exact = W[g * 64:(g + 1) * 64], up @ down
            assert torch.all((block - exact).abs() <= eps * exact.abs() + 1e-9 * float(exact.abs().max()))
            sigma, tol = torch.linalg.svdvals(block), eps * float(torch.linalg.norm(block))
            assert sigma[11] > tol > sigma[12], (layer, g, float(sigma[11]), tol, float(sigma[12]))
