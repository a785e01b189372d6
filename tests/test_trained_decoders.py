"""The decoders trained here (``headlens/models/tiny-lm``, ``tiny-moe``): they are tiny, load fast, reproduce their
recorded held-out loss, and every check that runs on the real MiniLM weights also runs on them, each against an
independent computation (dense float64 SVDs, HuggingFace's eager attention and ``output_hidden_states``, the gate
weights routed again by hand)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from headlens.cli import main
from headlens.io.embedded import embedded_dir, provenance

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tools" / "train" / "heldout.txt"  # the held-out split, committed (tools/train/corpus.py rebuilds it)
PROMPT = ("The function returns a new list. If the argument is omitted, the default value is used. "
          "A QuerySet can be filtered, sliced and passed around without hitting the database.")
TEXTS = ["Django models map to database tables.", "Use the with statement to open a file.",
         "The list is sorted in place and the method returns None."]
# Exact parameter counts (unique tensors; the output layer is tied to the embedding): a config change breaks them.
PARAMS = {"tiny-lm": 6_426_624, "tiny-moe": 6_432_768}
HD, H, G, D = 64, 8, 2, 256


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(str(embedded_dir(name)), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
            for name in ("tiny-lm", "tiny-moe")}


def _unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_models_are_tiny_and_load_in_seconds():
    import transformers  # noqa: F401  (import time is not loading time)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    loaded = {n: (AutoModelForCausalLM.from_pretrained(str(embedded_dir(n))), AutoTokenizer.from_pretrained(
        str(embedded_dir(n)))) for n in PARAMS}
    seconds = time.perf_counter() - t0
    assert seconds < 5.0, f"loading both models took {seconds:.1f} s"
    total_bytes = 0
    for name, (model, tok) in loaded.items():
        assert _unique_params(model) == PARAMS[name] == provenance(name)["parameters_unique"]
        cfg = model.config
        assert cfg.hidden_size == D and cfg.num_attention_heads == H and cfg.num_key_value_heads == G
        assert cfg.head_dim == HD != cfg.hidden_size // cfg.num_attention_heads  # head_dim is not d / H
        assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert len(tok) == cfg.vocab_size == 8192
        f = embedded_dir(name) / "model.safetensors"
        total_bytes += f.stat().st_size
        with open(f, "rb") as fh:  # stored in bf16
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert total_bytes < 30e6
    assert type(loaded["tiny-lm"][0]).__name__ == "Qwen3ForCausalLM"
    moe = loaded["tiny-moe"][0]
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    kinds = [type(layer.mlp).__name__ for layer in moe.model.layers]
    assert kinds == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"] * 3  # a dense layer between any two MoE layers
    assert moe.config.num_experts == 8 and moe.config.num_experts_per_tok == 2


def _heldout_windows(tok, seq_len: int) -> torch.Tensor:
    """The held-out split as train.py scores it: <|bos|> doc <|eos|> ... cut into windows of seq_len + 1 tokens
    with stride seq_len."""
    text = HELDOUT.read_text(encoding="utf-8")
    ids: list[int] = []
    for doc in (d for d in text.rstrip("\n").split("\n\n") if d):
        ids += [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    stream = torch.tensor(ids)
    n = (len(stream) - 1) // seq_len
    return torch.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


@pytest.mark.parametrize("name", ["tiny-lm", "tiny-moe"])
def test_committed_weights_reproduce_the_recorded_heldout_loss(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prov = provenance(name)
    assert hashlib.sha256(HELDOUT.read_bytes()).hexdigest() == prov["corpus"]["heldout_sha256"]
    tok = AutoTokenizer.from_pretrained(str(embedded_dir(name)))
    windows = _heldout_windows(tok, prov["seq_len"])
    assert windows[:, 1:].numel() == prov["heldout_tokens_scored"]
    model = AutoModelForCausalLM.from_pretrained(str(embedded_dir(name)), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), 16):  # every window, every predicted token, by an explicit log-softmax
            win = windows[start:start + 16]
            logits = model(input_ids=win[:, :-1]).logits
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            total -= float(logp.gather(-1, win[:, 1:, None]).double().sum())
            count += win[:, 1:].numel()
    assert count == prov["heldout_tokens_scored"]
    assert total / count == pytest.approx(prov["heldout_loss"], abs=1e-3)


def _load_f64(name: str) -> dict:
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(str(embedded_dir(name) / "model.safetensors")).items()}


def _w_ov(sd: dict, layer: int, head: int) -> torch.Tensor:
    p = f"model.layers.{layer}.self_attn."
    g = head // (H // G)  # GQA: query head h reads kv head h // (H / G)
    return sd[p + "o_proj.weight"][:, head * HD:(head + 1) * HD] @ sd[p + "v_proj.weight"][g * HD:(g + 1) * HD]


def test_ov_spectrum_heatmap_and_cache_error_on_tiny_lm(models, capsys, tmp_path):
    from transformers import AutoTokenizer

    layer, head, k = 2, 5, 8
    code = main(["ov", "--model", "tiny-lm", "--layer", str(layer), "--head", str(head), "--latent-dim", str(k),
                 "--prompt", PROMPT, "--heatmap", "--out-dir", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(next(tmp_path.glob("tiny-lm_layer2_head5*.json")).read_text())
    assert r["model"]["name"] == "tiny-lm"
    W = _w_ov(_load_f64("tiny-lm"), layer, head)
    s = torch.linalg.svdvals(W).numpy()
    np.testing.assert_allclose(r["singular_values"], s[:HD], rtol=1e-6, atol=1e-9 * s[0])
    E = np.cumsum(s[:HD] ** 2) / np.sum(s[:HD] ** 2)
    assert r["rel_error"] == pytest.approx(np.sqrt(1 - E[k - 1]), rel=1e-6)
    # heatmap against HuggingFace's eager attention; cache_error against the real v_proj inputs in float64
    tok = AutoTokenizer.from_pretrained(str(embedded_dir("tiny-lm")))
    enc = tok(PROMPT, return_tensors="pt")
    model = models["tiny-lm"]
    seen = []
    hook = model.model.layers[layer].self_attn.v_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        ref = model(**enc, output_attentions=True)
    hook.remove()
    A = ref.attentions[layer][0, head].numpy()
    np.testing.assert_allclose(np.asarray(r["attention"]), A, rtol=1e-4, atol=1e-6)
    assert r["tokens"][0] == "<|bos|>"
    X = seen[0][0].double().T
    U, S, Vt = torch.linalg.svd(W)
    Wk = (U[:, :k] * S[:k]) @ Vt[:k]
    direct = float(torch.linalg.norm((W - Wk) @ X) / torch.linalg.norm(W @ X))
    assert r["cache_error"] == pytest.approx(direct, rel=1e-4)


def test_sphere_on_tiny_lm_is_output_hidden_states(models, capsys, tmp_path):
    from transformers import AutoTokenizer

    code = main(["sphere", "--model", "tiny-lm", "--prompt", PROMPT, "--no-align", "--workers", "1",
                 "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    full = json.loads((tmp_path / "sphere.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(embedded_dir("tiny-lm")))
    with torch.no_grad():
        hs = models["tiny-lm"].model(**tok(PROMPT, return_tensors="pt"), output_hidden_states=True).hidden_states
    assert [fr["layer"] for fr in full["frames"]] == list(range(6))
    for fr in full["frames"]:
        X = hs[fr["layer"]][0].double()
        np.testing.assert_allclose(fr["full_norms"], X.norm(dim=1).numpy()[-len(fr["full_norms"]):], rtol=1e-5)


def test_sweep_rank_at_90_on_tiny_lm_matches_dense_float64(capsys, tmp_path):
    code = main(["sweep", "--model", "tiny-lm", "--layers", "0,3,5", "--k", "8,16", "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    with open(tmp_path / "sweep_heads.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * H
    sd = _load_f64("tiny-lm")
    for row in rows:
        s = torch.linalg.svdvals(_w_ov(sd, int(row["layer"]), int(row["head"]))).numpy()[:HD]
        E = np.cumsum(s**2) / np.sum(s**2)
        assert int(row["ov_rank_e90"]) == 1 + int(np.searchsorted(E, 0.9 - 1e-12))
        assert float(row["ov_sigma_max"]) == pytest.approx(s[0], rel=1e-6)
        assert float(row["ov_rel_error_k8"]) == pytest.approx(np.sqrt(1 - E[7]), rel=1e-6)


def test_router_on_tiny_moe_matches_the_gate_weights(models, capsys, tmp_path):
    from transformers import AutoTokenizer

    from headlens.moe.dump import load_dump

    pf = tmp_path / "texts.txt"
    pf.write_text("\n".join(TEXTS) + "\n")
    code = main(["router", "--prompt-file", str(pf), "--batch-size", "2", "--out-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err  # no --model: router's default is tiny-moe
    report, layers, _ = load_dump(tmp_path / "out" / "router_dump")
    model = models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(str(embedded_dir("tiny-moe")))
    inputs: dict[int, list] = {}
    hooks = [layer.mlp.gate.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for text in TEXTS:  # one text at a time, no padding
            model(**tok(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    assert report.moe_layers == sorted(inputs) == [1, 3, 5] and report.dense_layers == [0, 2, 4]
    for r, s in zip(layers, report.stats):
        x = torch.cat([t.reshape(-1, D) for t in inputs[r.layer]]).double()
        logits = x @ model.model.layers[r.layer].mlp.gate.weight.detach().double().T
        p = torch.softmax(logits, -1)
        w, idx = p.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)  # norm_topk_prob
        torch.testing.assert_close(r.logits.double(), logits, rtol=1e-4, atol=1e-5)
        o1, o2 = torch.argsort(r.indices, 1), torch.argsort(idx, 1)
        assert torch.equal(r.indices.gather(1, o1), idx.gather(1, o2))
        torch.testing.assert_close(r.weights.double().gather(1, o1), w.gather(1, o2), rtol=1e-4, atol=1e-5)
        counts = np.bincount(idx.flatten().numpy(), minlength=8)
        assert s.load_cv == pytest.approx(counts.std() / counts.mean(), rel=1e-9)
        f = counts[counts > 0] / counts.sum()
        assert s.load_entropy_norm == pytest.approx(-(f * np.log(f)).sum() / math.log(8), rel=1e-9)


def _bad(capsys, *argv) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_model_flag_bad_input(capsys, tmp_path):
    for command in ("ov", "sphere", "sweep", "router", "diagram"):
        err = _bad(capsys, command, "--model", "tiny-llm", "--out-dir", str(tmp_path / "o"))
        assert "--model: invalid choice: 'tiny-llm'" in err
        assert all(f"'{name}'" in err for name in ("minilm", "tiny-lm", "tiny-moe")), err
        err = _bad(capsys, command, "--model", "tiny-lm", "--weights", str(embedded_dir("tiny-lm")),
                   "--out-dir", str(tmp_path / "o"))
        assert "give either --model tiny-lm or --weights, not both" in err
        err = _bad(capsys, command, "--model", "tiny-moe", "--hf-repo", "Qwen/Qwen3-0.6B",
                   "--out-dir", str(tmp_path / "o"))
        assert "give either --model tiny-moe or --hf-repo, not both" in err
    assert not (tmp_path / "o").exists()


def test_model_source_checks_the_name():
    from headlens.errors import HeadlensError
    from headlens.io.source import ModelSource

    with pytest.raises(HeadlensError, match="choose one of minilm, tiny-lm, tiny-moe"):
        ModelSource(embedded="gpt2")
    assert ModelSource(embedded="tiny-lm").checkpoint().name == "tiny-lm"
    assert ModelSource(embedded="tiny-moe").model_dir()[1] == embedded_dir("tiny-moe")


def test_models_lists_shapes_and_provenance(capsys, tmp_path):
    code = main(["models", "--json", str(tmp_path / "models.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads((tmp_path / "models.json").read_text())["models"]}
    assert set(rows) == {"minilm", "tiny-lm", "tiny-moe"}
    for name in PARAMS:
        r, prov = rows[name], provenance(name)
        assert r["parameters"] == PARAMS[name] and r["head_dim"] == HD and r["kv_heads"] == G
        assert r["provenance"]["heldout_loss"] == prov["heldout_loss"]
        assert f"{prov['heldout_loss']:.3f}" in out
    assert rows["tiny-moe"]["experts"] == 8 and rows["tiny-moe"]["moe_layers"] == [1, 3, 5]
    assert rows["minilm"]["architecture"] == "BertModel" and rows["minilm"]["heads"] == 12


def test_the_package_data_globs_carry_every_model_file():
    """`pip install` (not only the editable checkout) must carry the weights: every file of every model directory
    matches one of pyproject's package-data patterns for headlens.models."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    from headlens.io.embedded import MODELS_DIR

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "headlens.models"]
    files = [p.relative_to(MODELS_DIR).as_posix() for p in MODELS_DIR.glob("*/*") if p.is_file()]
    assert {f.split("/")[0] for f in files} == set(PARAMS) | {"texts"}  # texts/: compress's default texts
    assert {"decoder_calib.txt", "decoder_eval.txt", "minilm_calib.txt", "minilm_eval.txt"} <= {
        f.split("/")[1] for f in files if f.startswith("texts/")}
    for name in PARAMS:
        assert {"config.json", "model.safetensors", "tokenizer.json", "PROVENANCE.md", "provenance.json",
                "LICENSE-CORPUS.md"} <= {f.split("/")[1] for f in files if f.startswith(name + "/")}
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


def test_compress_default_texts_are_reproducible_and_disjoint():
    """The shipped calibration and eval texts are what tools/train/compress_texts.py makes from the committed
    held-out split, and no eval text is a calibration text."""
    import subprocess
    import sys

    from headlens.io.embedded import default_texts

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train" / "compress_texts.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("tiny-lm", "tiny-moe", "minilm"):
        shipped = default_texts(name)
        calib, evals = set(shipped.calib), set(shipped.eval)
        assert calib and evals and not calib & evals
