"""`headlens sweep` outputs: table round-trips (CSV and Parquet), heatmap and budget PNGs, the self-contained page.

Synthetic typed results only (3 layers x 4 query heads, 2 kv heads, ks [2, 4]); no model is built.
"""

from __future__ import annotations

import base64
import math
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import torch

from headlens.circuits.budget import Budget, BudgetLayer, BudgetRow, BudgetTarget, BudgetTotals
from headlens.circuits.sweep_results import (GroupSpectrum, HeadSpectrum, LatentErrors, LayerResult, Spectrum,
                                             layer_aggregates, to_rows)
from headlens.errors import HeadlensError
from headlens.io.tables import read_table, write_csv, write_parquet, write_table
from headlens.report.sweep import budget_outputs
from headlens.report.sweep_common import (BUDGET_CSV, BUDGET_LAYERS_CSV, BUDGET_PNG, ERROR_PNG, HELDOUT_PNG,
                                          QK_RANK_PNG, RANK_PNG)
from headlens.report.sweep_figures import heatmaps
from headlens.report.sweep_html import write_html

KS = [2, 4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY_NAME = "<script>alert('x')</script> & \"Qwen\"/$x$_1"


def _latents(rng, ks, heads: bool) -> LatentErrors:
    draw = lambda: {k: float(rng.uniform(0, 1)) for k in ks}  # noqa: E731
    return LatentErrors(plain_pred=draw() if heads else None, plain_heldout=draw(), white_pred=draw(),
                        white_heldout=draw())


def _head(rng, layer: int, head: int, kv_head: int, ks, data_aware: bool) -> HeadSpectrum:
    e = np.sort(rng.uniform(0, 1, size=len(ks)))
    ov = Spectrum(rank=int(rng.integers(8, 33)), condition=float(rng.lognormal(1.0, 0.5)),
                  sigma_max=float(rng.uniform(0.5, 3.0)), frobenius=float(rng.uniform(2.0, 9.0)),
                  rank_at={50: int(rng.integers(1, 5)), 90: int(rng.integers(5, 20)), 95: int(rng.integers(20, 25)),
                           99: int(rng.integers(25, 32))},
                  energy={k: float(ek) for k, ek in zip(ks, e)},
                  rel_error={k: math.sqrt(1.0 - float(ek)) for k, ek in zip(ks, e)})
    qk = Spectrum(rank=int(rng.integers(8, 33)), sigma_max=float(rng.uniform(1, 5)),
                  rank_at={90: int(rng.integers(5, 20))})
    return HeadSpectrum(layer, head, kv_head, ov, qk, _latents(rng, ks, True) if data_aware else None)


def _group(rng, layer: int, g: int, group_size: int, ks, data_aware: bool) -> GroupSpectrum:
    stack = Spectrum(rank=64, rank_at={50: 4, 90: 30 + layer + g, 95: 40, 99: 55},
                     energy={k: 1 - (0.9 / k) ** 2 for k in ks}, rel_error={k: 0.9 / k for k in ks})
    v = Spectrum(rank=32, sigma_max=1.5 + g, rank_at={90: 20 + g})
    return GroupSpectrum(layer, g, group_size, stack, v, _latents(rng, ks, False) if data_aware else None)


def make_layers(n_layers=3, n_heads=4, n_kv=2, ks=KS, data_aware=True, seed=0) -> list[LayerResult]:
    """Typed results shaped like a sweep's: ``n_layers`` x ``n_heads`` query heads over ``n_kv`` kv heads, with
    awkward floats (repr-only precision, a denormal, an integral float, inf)."""
    rng = np.random.default_rng(seed)
    per_group = n_heads // n_kv
    layers = []
    for layer in range(n_layers):
        heads = [_head(rng, layer, h, h // per_group, ks, data_aware) for h in range(n_heads)]
        groups = [_group(rng, layer, g, per_group, ks, data_aware) for g in range(n_kv)]
        layers.append(LayerResult(layer, heads, groups, torch.zeros(n_kv, 4, dtype=torch.float64), None))
    first = layers[0].heads
    for h, cond in zip(first, (0.1 + 0.2, 5e-324, 3.0, math.inf)):
        h.ov.condition = cond
    layers[-1].heads[0].ov.sigma_max = 1 / 3
    return layers


def make_head_rows(n_layers=3, n_heads=4, n_kv=2, ks=KS, data_aware=True, seed=0) -> list[dict]:
    """The ``sweep_heads`` rows of :func:`make_layers`, plus cells a generic table must also carry: None,
    -0.0 and an int beyond float precision."""
    rows = to_rows(make_layers(n_layers, n_heads, n_kv, ks, data_aware, seed))[0]
    rows[3]["ov_condition"] = None
    rows[5]["ov_frobenius"] = -0.0
    rows[6]["qk_rank"] = None
    rows[7]["ov_rank"] = 2**62 + 1
    rows[0]["ov_rank_e90"] = None
    if data_aware:
        rows[1][f"white_heldout_k{ks[0]}"] = None
    return rows


def make_budget(n_layers=3, n_kv=2, data_aware=True) -> Budget:
    rows, per_layer = [], []
    for layer in range(n_layers):
        for g in range(n_kv):
            rows.append(BudgetRow(layer=layer, kv_head=g, k_plain=40 + 10 * layer + g, err_plain=0.09 + 0.001 * g,
                                  k_data=(20 + 5 * layer + g) if data_aware else None,
                                  err_data=0.08 if data_aware else None,
                                  k_uniform=48, err_uniform_plain=0.1 + 0.01 * layer,
                                  err_uniform_data=0.07 if data_aware else None))
        per_layer.append(BudgetLayer(layer=layer, kv_bytes_before=1024, kv_bytes_after_plain=448,
                                     kv_bytes_after_data=333 if data_aware else None, kv_bytes_after_uniform=384))
    when = lambda v: v if data_aware else None  # noqa: E731
    totals = BudgetTotals(
        kv_bytes_before=3072, kv_bytes_after_plain=1344, saving_plain_pct=56.25, kv_bytes_after_data=when(1000),
        saving_data_pct=when(100 * (1 - 1000 / 3072)), latent_dims_plain=sum(r.k_plain for r in rows),
        latent_dims_data=when(sum(r.k_data or 0 for r in rows)), uniform_k=48.0, mean_err_plain=0.0832111,
        max_err_plain=0.0999, mean_err_uniform=0.123456, max_err_uniform=0.14, mean_err_data=when(0.08),
        max_err_data=when(0.08), mean_err_uniform_data=when(0.07), max_err_uniform_data=when(0.07),
        mean_err_data_heldout=None, max_err_data_heldout=None, mean_err_uniform_data_heldout=None,
        max_err_uniform_data_heldout=None)
    return Budget(target=BudgetTarget("error", 0.1), bytes_per_value=2, rows=rows, per_layer=per_layer, totals=totals)


# Shaped like the summary `headlens sweep` writes: nested dicts, lists of ints, lists of per-layer dicts.
SUMMARY = {"model": NASTY_NAME, "config": {"ks": tuple(KS), "rank_eps": 1.2e-7, "dtype": "float32"},
           "layers": [0, 1, 2], "data_aware": True, "calibration_tokens": 47,
           "budget": {"target": "error 0.1", "totals": {"kv_bytes_before": 3072}},
           "per_layer": [{"layer": i, "ov_rank_e90_mean": 10.5 + i, "tag": "<i>x</i>"} for i in range(3)],
           "notes": ["prompt: 47 tokens <b>bold</b>", "fold-norm: no"]}


# --------------------------------------------------------------------------------------------- helpers

def same(a, b) -> bool:
    """Equal with the same type; NaN equals NaN; -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def assert_rows_equal(got: list[dict], rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    assert len(got) == len(rows)
    for i, (g, r) in enumerate(zip(got, rows)):
        assert list(g) == cols, f"row {i}: columns {list(g)}"
        for c in cols:
            assert same(g[c], r.get(c)), f"row {i} column {c}: {g[c]!r} != {r.get(c)!r}"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def check_png(path: Path, min_w=300, min_h=200) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    assert float(np.std(img[..., :3])) > 0.01  # not blank
    return w, h


# ---------------------------------------------------------------------------------------------- tables

@pytest.mark.parametrize("data_aware", [True, False])
def test_table_round_trip_csv_and_parquet(tmp_path, data_aware):
    rows = make_head_rows(data_aware=data_aware)
    rows[2]["ov_condition"] = float("nan")
    rows[3]["ov_sigma_max"] = float("inf")
    rows[9]["late_column"] = 7  # a key that appears only in a later row: appended, None elsewhere
    paths = write_table(tmp_path / "Qwen3-0.6B_heads", rows)
    assert [p.name for p in paths] == ["Qwen3-0.6B_heads.csv", "Qwen3-0.6B_heads.parquet"]
    for p in paths:
        got = read_table(p)
        assert_rows_equal(got, rows)
        assert isinstance(got[0]["layer"], int) and isinstance(got[2]["ov_condition"], float)
        assert got[3]["ov_condition"] is None and got[0]["late_column"] is None
    header = paths[0].read_text().splitlines()[0].split(",")
    assert header[:4] == ["layer", "head", "kv_head", "ov_rank"] and header[-1] == "late_column"
    assert leftovers(tmp_path) == []


def test_parquet_schema_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_head_rows()
    for r in rows:
        r["all_none"] = None
        r["note"] = f"layer {r['layer']} <&>"
        r["flag"] = r["head"] % 2 == 0
    rows[5]["mixed"] = 3          # int and float in one column: float64 in Parquet
    rows[6]["mixed"] = 2.5
    path = write_parquet(tmp_path / "t.parquet", rows)
    schema = pq.read_schema(path)
    for c in ("layer", "head", "kv_head", "ov_rank", "ov_rank_e90", "qk_rank"):
        assert schema.field(c).type == pa.int64(), c
        assert schema.field(c).nullable
    for c in ("ov_condition", "ov_sigma_max", "ov_rel_error_k2", "white_heldout_k2"):
        assert schema.field(c).type == pa.float64(), c
    assert schema.field("all_none").type == pa.null()
    assert schema.field("note").type == pa.string()
    assert schema.field("flag").type == pa.bool_()
    assert schema.field("mixed").type == pa.float64()
    got = read_table(path)
    assert got[0]["qk_rank"] is not None and got[6]["qk_rank"] is None
    assert got[7]["ov_rank"] == 2**62 + 1 and type(got[7]["ov_rank"]) is int
    assert got[5]["mixed"] == 3.0 and type(got[5]["mixed"]) is float
    assert got[0]["flag"] is True and got[0]["note"] == "layer 0 <&>"
    # The CSV keeps each cell's own type.
    csv_rows = read_table(write_csv(tmp_path / "t.csv", rows))
    assert type(csv_rows[5]["mixed"]) is int and csv_rows[0]["flag"] is True and csv_rows[0]["all_none"] is None


def test_numpy_scalars_are_written_as_plain_values(tmp_path):
    rows = [{"layer": np.int64(3), "err": np.float32(0.1), "e": np.float64(1 / 7), "ok": np.bool_(True)}]
    for p in write_table(tmp_path / "np", rows):
        got = read_table(p)[0]
        assert got == {"layer": 3, "err": float(np.float32(0.1)), "e": 1 / 7, "ok": True}
        assert type(got["layer"]) is int and type(got["err"]) is float


def test_empty_table_round_trips(tmp_path):
    for p in write_table(tmp_path / "empty", []):
        assert read_table(p) == []


def test_bad_values_raise_and_leave_nothing(tmp_path):
    with pytest.raises(HeadlensError, match="unsupported value"):
        write_table(tmp_path / "bad", [{"layer": 0, "spectrum": [1.0, 2.0]}])
    with pytest.raises(HeadlensError, match="mixes value types"):
        write_parquet(tmp_path / "bad.parquet", [{"x": 1}, {"x": "one"}])
    with pytest.raises(HeadlensError, match="must be a dict"):
        write_csv(tmp_path / "bad.csv", [1, 2])
    assert not (tmp_path / "bad.parquet").exists() and not (tmp_path / "bad.csv").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(HeadlensError, match="suffix"):
        read_table(tmp_path / "x.json")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(HeadlensError, match="ragged.csv:3"):
        read_table(tmp_path / "ragged.csv")


def test_rewrite_replaces_the_file_atomically(tmp_path):
    rows = make_head_rows(data_aware=False)
    write_table(tmp_path / "heads", rows)
    write_table(tmp_path / "heads", rows[:2])
    assert len(read_table(tmp_path / "heads.csv")) == 2 and len(read_table(tmp_path / "heads.parquet")) == 2
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- figures

@pytest.mark.parametrize("data_aware", [True, False])
def test_heatmaps_small_grid(tmp_path, data_aware):
    heads = [h for r in make_layers(n_layers=2, n_heads=4, data_aware=data_aware) for h in r.heads]
    paths = heatmaps(tmp_path, heads, KS, NASTY_NAME)
    want = [RANK_PNG, QK_RANK_PNG, ERROR_PNG] + ([HELDOUT_PNG] if data_aware else [])  # the heads have QK
    assert [p.name for p in paths] == want
    for p in paths:
        w, h = check_png(p)
        assert w < 2500 and h < 2500
    assert leftovers(tmp_path) == []


def test_heatmaps_36x32_readable_size(tmp_path):
    # Their speed is bench/bench_sweep.py's business (a wall-clock bound here failed on a loaded machine).
    heads = [h for r in make_layers(n_layers=36, n_heads=32, n_kv=8, ks=[8, 16, 32, 64]) for h in r.heads]
    paths = heatmaps(tmp_path, heads, [8, 16, 32, 64], "Qwen3-4B")
    assert len(paths) == 4  # OV and QK ranks, rel_error, held-out error
    for p in paths:
        w, h = check_png(p, min_w=800, min_h=800)
        assert w <= 3000 and h <= 3000
    assert leftovers(tmp_path) == []


def test_heatmaps_reject_bad_input(tmp_path):
    with pytest.raises(HeadlensError, match="non-empty"):
        heatmaps(tmp_path, [], KS, "m")
    with pytest.raises(HeadlensError, match="must be a HeadSpectrum"):
        heatmaps(tmp_path, [{"layer": 0, "head": 0}], KS, "m")
    with pytest.raises(HeadlensError, match="at least one latent size"):
        heatmaps(tmp_path, make_layers(n_layers=1)[0].heads, [], "m")


@pytest.mark.parametrize("data_aware", [True, False])
def test_budget_outputs(tmp_path, data_aware):
    budget = make_budget(data_aware=data_aware)
    paths = budget_outputs(tmp_path, budget, NASTY_NAME)
    assert [p.name for p in paths] == [BUDGET_CSV, BUDGET_LAYERS_CSV, BUDGET_PNG]
    assert_rows_equal(read_table(tmp_path / BUDGET_CSV), budget.to_json()["rows"])
    assert_rows_equal(read_table(tmp_path / BUDGET_LAYERS_CSV), budget.to_json()["per_layer"])
    header = (tmp_path / BUDGET_CSV).read_text().splitlines()[0]
    assert header == ("layer,kv_head,k_plain,err_plain,k_data,err_data,err_data_heldout,k_uniform,err_uniform_plain,"
                      "err_uniform_data,err_uniform_data_heldout,"  # the key budget's columns, appended (issue 23)
                      "key_k_plain,key_err_plain,key_k_data,key_err_data,key_err_data_heldout")
    check_png(tmp_path / BUDGET_PNG)
    assert budget_outputs(tmp_path / "none", None, "m") == []
    assert leftovers(tmp_path) == []


def test_layer_aggregates():
    layers = make_layers()
    agg = layer_aggregates(layers, KS)
    assert [a.layer for a in agg] == [0, 1, 2]
    heads0 = layers[0].heads
    ranks = [h.ov.rank_at[90] for h in heads0]
    assert agg[0].heads == 4 and agg[0].rank_e90.mean == pytest.approx(np.mean(ranks))
    assert agg[0].rank_e90.min == min(ranks) and agg[0].rank_e90.max == max(ranks)
    assert agg[0].rel_error[4].mean == pytest.approx(np.mean([h.ov.rel_error[4] for h in heads0]))
    assert agg[0].kv_groups == 2
    assert (agg[2].stack_rank_e90.min, agg[2].stack_rank_e90.max) == (32, 33)
    assert agg[0].white_heldout[2] == pytest.approx(np.mean([h.latents.white_heldout[2] for h in heads0]))
    plain = layer_aggregates(make_layers(data_aware=False), KS)
    assert plain[0].white_heldout == {}


# ------------------------------------------------------------------------------------------------ page

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.starts: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.parametrize("data_aware", [True, False])
def test_html_is_self_contained_and_escaped(tmp_path, data_aware):
    layers = make_layers(data_aware=data_aware)
    budget = make_budget(data_aware=data_aware)
    heads = [h for r in layers for h in r.heads]
    images = heatmaps(tmp_path, heads, KS, NASTY_NAME) + budget_outputs(tmp_path, budget, NASTY_NAME)[2:]
    page_path = write_html(tmp_path / "sweep.html", SUMMARY, layers, budget, images)
    assert page_path == tmp_path / "sweep.html"
    page = page_path.read_text(encoding="utf-8")

    # Nothing external, no script.
    assert 'src="http' not in page and "href=" not in page
    assert "<link" not in page and "url(" not in page and "@import" not in page
    tags = _Tags()
    tags.feed(page)
    assert not [t for t, _ in tags.starts if t in ("script", "iframe", "object", "embed", "link")]
    srcs = [a["src"] for t, a in tags.starts if t == "img"]
    assert len(srcs) == len(images) and all(s.startswith("data:image/png;base64,") for s in srcs)
    for src, img in zip(srcs, images):
        assert base64.b64decode(src.split(",", 1)[1]) == img.read_bytes()

    # Escaping: the model name and notes arrive as text, not markup.
    assert "<script>" not in page and "<b>bold</b>" not in page and "<i>x</i>" not in page
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "config.ks" in page and "0, 1, 2" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;Qwen&quot;" in page
    assert "<title>headlens sweep: &lt;script&gt;" in page
    assert NASTY_NAME in "".join(tags.text)

    # Budget totals, formatted.
    for s in ("3,072", "1,344", "56.25%", "0.0832", "0.0999", "0.1235", "0.1400", "uniform, k = 48 per kv group"):
        assert s in page, s
    if data_aware:
        assert "1,000" in page and "67.45%" in page and "data-aware latent" in page
    else:
        assert "data-aware latent (whitened)" not in page

    # Per-layer table and the collapsible full tables.
    assert "<h2>Per layer</h2>" in page
    assert page.count("<details>") >= 3 and "every query head (12 rows)" in page
    assert "every kv group (6 rows)" in page
    assert "rel error k=4 mean (min\u2013max)" in page
    assert "30, 31" in page  # layer 0's stacked kv-group ranks
    assert leftovers(tmp_path) == []


def test_html_without_budget_or_images(tmp_path):
    layers = make_layers(data_aware=False)
    path = write_html(tmp_path / "p.html", {"model_name": "tiny"}, layers, None, [])
    page = path.read_text(encoding="utf-8")
    assert "headlens sweep: tiny" in page and "No budget was computed" in page and "<img" not in page
    with pytest.raises(HeadlensError, match="cannot read image"):
        write_html(tmp_path / "q.html", {}, layers, None, [tmp_path / "missing.png"])
    with pytest.raises(HeadlensError, match="non-empty list of LayerResult"):
        write_html(tmp_path / "q.html", {}, [], None, [])
    assert not (tmp_path / "q.html").exists() and leftovers(tmp_path) == []


def test_html_full_size_sweep_is_written_quickly(tmp_path):
    layers = make_layers(n_layers=36, n_heads=32, n_kv=8, ks=[8, 16, 32, 64])
    t0 = time.perf_counter()
    page = write_html(tmp_path / "big.html", {"model": "Qwen3-4B"}, layers, make_budget(36, 8), [])
    assert time.perf_counter() - t0 < 5.0
    text = page.read_text(encoding="utf-8")
    assert "every query head (1152 rows)" in text
    assert len(re.findall(r"<tr>", text)) > 1152 + 288


def test_html_header_takes_the_name_from_a_model_dict(tmp_path):
    summary = {"model": {"name": "all-MiniLM-L6-v2", "num_layers": 6, "source": "/x/<y>"},
               "budget": {"totals": {"kv_bytes_before": 9216}}, "notes": "one note"}
    page = write_html(tmp_path / "p.html", summary, make_layers(data_aware=False), None, []).read_text()
    assert "<h1>headlens sweep: all-MiniLM-L6-v2</h1>" in page and "/x/&lt;y&gt;" in page
    assert "full run summary (1 more entries)" in page and "budget.totals.kv_bytes_before" in page
    assert "<li>one note</li>" in page
