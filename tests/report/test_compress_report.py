"""`headlens compress` figures and page, drawn from synthetic summary dicts shaped like
``headlens.report.compress.summary`` (a causal LM modelled on a tiny-lm run, and an encoder); no model is built."""

from __future__ import annotations

import base64
import copy
import html
import re
from pathlib import Path

import pytest

from headlens.report.compress_figures import scatter, tradeoff
from headlens.report.compress_html import comparison_sentence, write_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY_NAME = "<b>&"
LAYERS = [0, 1, 2]


def _layers(scale: float, ks: list[int]) -> list[dict]:
    return [{"layer": layer, "predicted_error": scale * (0.8 + 0.1 * layer),
             "value_path_error": scale * (0.85 + 0.1 * layer), "isolated_error": scale * (0.9 + 0.1 * layer),
             "accumulated_error": scale * (1.0 + 0.3 * layer), "ks": ks} for layer in LAYERS]


def _record(name: str, latent: str, allocation: str, target: float, saving: float, kl: float | None,
            causal: bool, matches: str | None = None) -> dict:
    ks = [9, 8] if allocation == "budget" else [9, 9]
    rec = {"name": name, "budget": "target-error", "target": target, "latent": latent, "allocation": allocation,
           "matches": matches, "latent_dims": 3 * sum(ks), "ks": {str(layer): ks for layer in LAYERS},
           "kv_bytes_per_token_before": 1536.0, "kv_bytes_per_token_after": 1536.0 * (1 - saving), "saving": saving,
           "hidden_error": 0.1 + target, "kl_mean": None, "kl_p95": None, "top1_agreement": None, "ppl_before": None,
           "ppl_after": None, "embedding_cosine_mean": None, "embedding_cosine_min": None,
           "neighbour_agreement": None, "layers": _layers(target, ks)}
    if causal:
        rec.update(kl_mean=kl, kl_p95=None if kl is None else 4 * kl, top1_agreement=0.89, ppl_before=125.99,
                   ppl_after=128.96)
    else:
        rec.update(embedding_cosine_mean=None if kl is None else 1 - kl, embedding_cosine_min=None if kl is None
                   else 1 - 3 * kl, neighbour_agreement=0.95)
    return rec


def _summary(causal: bool = True) -> dict:
    metric = "kl_mean" if causal else "embedding_cosine_mean"
    records = []
    for latent, bump in (("plain", 0.0), ("data-aware", 0.004)):
        for target, saving, kl in ((0.1, 0.4199, 0.0154), (0.2, 0.4408, 0.0627), (0.4, 0.4616, 0.2028)):
            name = f"{latent} error<={target}"
            records.append(_record(name, latent, "budget", target, saving + bump, kl + bump, causal))
            records.append(_record(f"uniform {latent} (bytes of error<={target})", latent, "uniform", target,
                                   saving + bump, 0.9 * kl, causal, matches=name))
    comparisons = [{"metric": metric, "saving": 0.4199, "a": "plain error<=0.1", "a_value": 0.0154,
                    "b": "uniform plain (bytes of error<=0.1)", "b_value": 0.0140, "better": "uniform"},
                   {"metric": metric, "saving": 0.4239, "a": "data-aware error<=0.1", "a_value": 0.0194,
                    "b": "plain budgets (interpolated at this saving)", "b_value": None, "better": None}]
    return {"model": {"name": "tiny-lm" if causal else "tiny-encoder", "family": "Qwen3", "num_layers": 3},
            "task": "causal-lm" if causal else "embedding", "layers": LAYERS, "budget": "target-error",
            "latents": ["plain", "data-aware"], "kv_bytes_per_value": 2, "dtype": "float32",
            "calibration_tokens": 1720, "eval_texts": 32, "eval_tokens": 1343, "predicted_positions": 1311,
            "configurations": records, "comparisons": comparisons,
            "seconds": {"load": 3.3, "eval": 22.4, "total": 27.1},
            "notes": ["uniform: the same total latent dims spread evenly.", "KL in nats; a < b & c"]}


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _check_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    w, h = _size(path)
    assert 800 <= w <= 2000 and 300 <= h <= 1200, (path.name, w, h)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
def test_figures_render(tmp_path: Path, causal: bool):
    s = _summary(causal)
    a = scatter(tmp_path / "compress_scatter.png", s)
    b = tradeoff(tmp_path / "compress_tradeoff.png", s)
    assert a == tmp_path / "compress_scatter.png" and b == tmp_path / "compress_tradeoff.png"
    _check_png(a)
    _check_png(b)
    assert _size(a)[0] > _size(a)[1]  # three panels side by side


def test_single_configuration_and_missing_metric(tmp_path: Path):
    s = _summary()
    s["configurations"] = s["configurations"][:1]
    s["comparisons"] = []
    _check_png(scatter(tmp_path / "one_scatter.png", s))
    _check_png(tradeoff(tmp_path / "one_tradeoff.png", s))

    s = _summary()
    s["configurations"][0]["kl_mean"] = None                   # skipped on the trade-off
    s["configurations"][1]["layers"][0]["isolated_error"] = None  # skipped on that panel
    _check_png(tradeoff(tmp_path / "none_tradeoff.png", s))
    _check_png(scatter(tmp_path / "none_scatter.png", s))
    for r in s["configurations"]:
        r["kl_mean"] = None  # nothing left to draw
    _check_png(tradeoff(tmp_path / "empty_tradeoff.png", s))
    write_html(tmp_path / "none.html", s, [])


def _page(tmp_path: Path, s: dict) -> tuple[str, list[Path]]:
    images = [scatter(tmp_path / "compress_scatter.png", s), tradeoff(tmp_path / "compress_tradeoff.png", s)]
    page = write_html(tmp_path / "compress.html", s, images)
    assert page == tmp_path / "compress.html"
    return page.read_text(encoding="utf-8"), images


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
def test_html_self_contained(tmp_path: Path, causal: bool):
    s = _summary(causal)
    s["model"]["name"] = NASTY_NAME
    text, images = _page(tmp_path, s)
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert NASTY_NAME not in text and html.escape(NASTY_NAME) in text
    for r in s["configurations"]:
        assert html.escape(r["name"]) in text
    assert "error<=" not in text  # every name escaped
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(inlined) == 2
    assert [base64.b64decode(b) for b in inlined] == [p.read_bytes() for p in images]
    assert text.count("<details>") == len(s["configurations"])
    assert html.escape("KL in nats; a < b & c") in text
    if causal:
        assert "KL mean" in text and "ppl before" in text and "cosine mean" not in text
        assert html.escape("at 42.0% saved: plain error<=0.1 KL 0.0154 vs uniform plain (bytes of error<=0.1) "
                           "0.0140 -> uniform is better") in text
    else:
        assert "embedding cosine mean" in text and "neighbour agreement" in text and "KL mean" not in text


def test_comparison_sentence_without_value():
    c = {"metric": "kl_mean", "saving": 0.5, "a": "x", "a_value": 0.1, "b": "y", "b_value": None, "better": None}
    assert comparison_sentence(c) == "at 50.0% saved: x KL 0.1000 vs y \u2013 -> not comparable (a value is missing)"
    c = copy.deepcopy(c) | {"metric": "embedding_cosine_mean", "b_value": 0.1, "better": "equal"}
    assert comparison_sentence(c).endswith("cosine 0.1000 vs y 0.1000 -> equal")


def _values_only_key_layers(record: dict) -> list[dict]:
    """What a --keys run records for a configuration that compresses values alone: its attention errors, no keys."""
    return [{"layer": e["layer"], "key_kind": None, "key_ks": None, "rotary": True, "key_predicted_error": None,
             "key_logit_error": None, "key_attention_kl": None, "isolated_keys_error": None,
             "isolated_values_error": e["isolated_error"], "isolated_both_error": None,
             "attention_accumulated_error": e["accumulated_error"]} for e in record["layers"]]


@pytest.mark.parametrize("key_layers", ["none", "values only"])
def test_without_key_latents_nothing_changes(tmp_path: Path, key_layers: str):
    """The key fields of a run without key latents (part "values", no key layers), or of a --keys run's
    values-alone configurations, leave the pictures and the page byte for byte as without them; a configuration
    with keys does change them (so the comparison can fail)."""
    before = _summary()
    after = copy.deepcopy(before)
    for r in after["configurations"]:
        r.update(part="values", key_latent=None, key_dims=0, key_ks=None,
                 key_layers=[] if key_layers == "none" else _values_only_key_layers(r))
    after["keys"] = "none" if key_layers == "none" else "data-aware"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text_a, images_a = _page(tmp_path / "a", before)
    text_b, images_b = _page(tmp_path / "b", after)
    assert [p.read_bytes() for p in images_a] == [p.read_bytes() for p in images_b]
    assert text_a == text_b

    keyed = after["configurations"][0]
    keyed["part"], keyed["key_latent"], keyed["key_dims"] = "both", "data-aware", 96
    keyed["key_layers"] = [e | {"key_kind": "data-aware", "key_ks": [16, 16], "key_predicted_error": 0.3,
                                "key_logit_error": 0.2, "key_attention_kl": 0.01, "isolated_keys_error": 0.1,
                                "isolated_both_error": 0.2} for e in _values_only_key_layers(keyed)]
    (tmp_path / "c").mkdir()
    text_c, images_c = _page(tmp_path / "c", after)
    assert all(a.read_bytes() != c.read_bytes() for a, c in zip(images_a, images_c))
    assert text_c != text_a and "Keys per layer" in text_c
