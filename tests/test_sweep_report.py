"""`headlens sweep` outputs: table round-trips (CSV and Parquet), heatmap and budget PNGs, the self-contained page.

Synthetic rows only (3 layers x 4 query heads, 2 kv heads, ks [2, 4]); no model is built.
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

from headlens.errors import HeadlensError
from headlens.report.sweep import (BUDGET_CSV, BUDGET_LAYERS_CSV, BUDGET_PNG, ERROR_PNG, HELDOUT_PNG, RANK_PNG,
                                   budget_outputs, heatmaps, layer_aggregates, read_table, write_csv, write_html,
                                   write_parquet, write_table)

KS = [2, 4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY_NAME = "<script>alert('x')</script> & \"Qwen\"/$x$_1"


def make_head_rows(n_layers=3, n_heads=4, n_kv=2, ks=KS, data_aware=True, seed=0) -> list[dict]:
    """One dict per (layer, query head) with the keys the sweep writes, awkward floats and a few None."""
    rng = np.random.default_rng(seed)
    per_group = n_heads // n_kv
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            e = np.sort(rng.uniform(0, 1, size=len(ks)))
            r = {
                "layer": layer, "head": head, "kv_head": head // per_group,
                "ov_rank": int(rng.integers(8, 33)),
                "ov_condition": float(rng.lognormal(1.0, 0.5)),
                "ov_sigma_max": float(rng.uniform(0.5, 3.0)),
                "ov_frobenius": float(rng.uniform(2.0, 9.0)),
                "ov_rank_e50": int(rng.integers(1, 5)), "ov_rank_e90": int(rng.integers(5, 20)),
                "ov_rank_e95": int(rng.integers(20, 25)), "ov_rank_e99": int(rng.integers(25, 32)),
                "qk_rank": int(rng.integers(8, 33)), "qk_sigma_max": float(rng.uniform(1, 5)),
                "qk_rank_e90": int(rng.integers(5, 20)),
            }
            for k, ek in zip(ks, e):
                r[f"ov_energy_k{k}"] = float(ek)
                r[f"ov_rel_error_k{k}"] = math.sqrt(1.0 - float(ek))
            if data_aware:
                for k in ks:
                    r[f"plain_pred_k{k}"] = float(rng.uniform(0, 1))
                    r[f"plain_heldout_k{k}"] = float(rng.uniform(0, 1))
                    r[f"white_pred_k{k}"] = float(rng.uniform(0, 1))
                    r[f"white_heldout_k{k}"] = float(rng.uniform(0, 1))
            rows.append(r)
    # Values that break naive formatting: repr-only precision, denormals, integral floats, huge ints, None.
    rows[0]["ov_condition"] = 0.1 + 0.2
    rows[1]["ov_condition"] = 5e-324
    rows[2]["ov_condition"] = 3.0
    rows[3]["ov_condition"] = None
    rows[4]["ov_sigma_max"] = 1 / 3
    rows[5]["ov_frobenius"] = -0.0
    rows[6]["qk_rank"] = None
    rows[7]["ov_rank"] = 2**62 + 1
    rows[0]["ov_rank_e90"] = None
    if data_aware:
        rows[1][f"white_heldout_k{ks[0]}"] = None
    return rows


def make_group_rows(n_layers=3, n_kv=2, group_size=2, ks=KS, data_aware=True) -> list[dict]:
    rows = []
    for layer in range(n_layers):
        for g in range(n_kv):
            r = {"layer": layer, "kv_head": g, "group_size": group_size, "v_rank": 32, "v_sigma_max": 1.5 + g,
                 "v_rank_e90": 20 + g, "stack_rank": 64, "stack_rank_e50": 4, "stack_rank_e90": 30 + layer + g,
                 "stack_rank_e95": 40, "stack_rank_e99": 55}
            for k in ks:
                r[f"stack_rel_error_k{k}"] = 0.9 / k
                if data_aware:
                    r[f"stack_white_pred_k{k}"] = 0.5 / k
                    r[f"stack_white_heldout_k{k}"] = 0.6 / k
                    r[f"stack_plain_heldout_k{k}"] = None if k == ks[-1] else 0.8 / k
            rows.append(r)
    return rows


def make_budget(n_layers=3, n_kv=2, data_aware=True) -> dict:
    rows, per_layer = [], []
    for layer in range(n_layers):
        for g in range(n_kv):
            rows.append({"layer": layer, "kv_head": g, "k_plain": 40 + 10 * layer + g, "err_plain": 0.09 + 0.001 * g,
                         "k_data": (20 + 5 * layer + g) if data_aware else None,
                         "err_data": 0.08 if data_aware else None,
                         "k_uniform": 48, "err_uniform_plain": 0.1 + 0.01 * layer,
                         "err_uniform_data": 0.07 if data_aware else None})
        per_layer.append({"layer": layer, "kv_bytes_before": 1024, "kv_bytes_after_plain": 448,
                          "kv_bytes_after_data": 333 if data_aware else None, "kv_bytes_after_uniform": 384})
    totals = {"kv_bytes_before": 3072, "kv_bytes_after_plain": 1344, "saving_plain_pct": 56.25,
              "kv_bytes_after_data": 1000 if data_aware else None,
              "saving_data_pct": 100 * (1 - 1000 / 3072) if data_aware else None,
              "uniform_k": 48.0, "mean_err_plain": 0.0832111, "max_err_plain": 0.0999,
              "mean_err_uniform": 0.123456, "max_err_uniform": 0.14}
    return {"target": "error 0.1", "bytes_per_value": 2, "rows": rows, "per_layer": per_layer, "totals": totals}


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
    rows = make_head_rows(n_layers=2, n_heads=4, data_aware=data_aware)
    paths = heatmaps(tmp_path, rows, KS, NASTY_NAME)
    want = [RANK_PNG, ERROR_PNG] + ([HELDOUT_PNG] if data_aware else [])
    assert [p.name for p in paths] == want
    for p in paths:
        w, h = check_png(p)
        assert w < 2500 and h < 2500
    assert leftovers(tmp_path) == []


def test_heatmaps_36x32_is_fast_and_readable_size(tmp_path):
    rows = make_head_rows(n_layers=36, n_heads=32, n_kv=8, ks=[8, 16, 32, 64])
    import matplotlib.pyplot  # noqa: F401  (import cost is not what is timed)

    t0 = time.perf_counter()
    paths = heatmaps(tmp_path, rows, [8, 16, 32, 64], "Qwen3-4B")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"36 x 32 heatmaps took {elapsed:.2f} s"
    assert len(paths) == 3
    for p in paths:
        w, h = check_png(p, min_w=800, min_h=800)
        assert w <= 3000 and h <= 3000
    assert leftovers(tmp_path) == []


def test_heatmaps_reject_bad_rows(tmp_path):
    with pytest.raises(HeadlensError, match="non-empty"):
        heatmaps(tmp_path, [], KS, "m")
    with pytest.raises(HeadlensError, match="layer must be an int"):
        heatmaps(tmp_path, [{"layer": None, "head": 0}], KS, "m")


@pytest.mark.parametrize("data_aware", [True, False])
def test_budget_outputs(tmp_path, data_aware):
    budget = make_budget(data_aware=data_aware)
    paths = budget_outputs(tmp_path, budget, NASTY_NAME)
    assert [p.name for p in paths] == [BUDGET_CSV, BUDGET_LAYERS_CSV, BUDGET_PNG]
    assert_rows_equal(read_table(tmp_path / BUDGET_CSV), budget["rows"])
    assert_rows_equal(read_table(tmp_path / BUDGET_LAYERS_CSV), budget["per_layer"])
    check_png(tmp_path / BUDGET_PNG)
    assert budget_outputs(tmp_path / "none", None, "m") == []
    assert leftovers(tmp_path) == []


def test_layer_aggregates():
    heads = make_head_rows()
    groups = make_group_rows()
    agg = layer_aggregates(heads, groups)
    assert [d["layer"] for d in agg] == [0, 1, 2]
    layer0 = [r for r in heads if r["layer"] == 0]
    ranks = [r["ov_rank_e90"] for r in layer0 if r["ov_rank_e90"] is not None]  # head 0's is None
    assert len(ranks) == 3
    assert agg[0]["ov_rank_e90_mean"] == pytest.approx(np.mean(ranks))
    assert agg[0]["ov_rank_e90_min"] == min(ranks) and agg[0]["ov_rank_e90_max"] == max(ranks)
    errs = [r["ov_rel_error_k4"] for r in layer0]
    assert agg[0]["ov_rel_error_k4_mean"] == pytest.approx(np.mean(errs))
    assert agg[0]["kv_groups"] == 2
    assert (agg[2]["stack_rank_e90_min"], agg[2]["stack_rank_e90_max"]) == (32, 33)
    held = [r["white_heldout_k2"] for r in layer0 if r["white_heldout_k2"] is not None]
    assert agg[0]["white_heldout_k2_mean"] == pytest.approx(np.mean(held))
    plain = layer_aggregates(make_head_rows(data_aware=False))
    assert not any(k.startswith("white_") or k.startswith("stack_") for k in plain[0])


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
    heads = make_head_rows(data_aware=data_aware)
    groups = make_group_rows(data_aware=data_aware)
    budget = make_budget(data_aware=data_aware)
    images = heatmaps(tmp_path, heads, KS, NASTY_NAME) + budget_outputs(tmp_path, budget, NASTY_NAME)[2:]
    page_path = write_html(tmp_path / "sweep.html", SUMMARY, heads, groups, budget, images)
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
    heads = make_head_rows(data_aware=False)
    path = write_html(tmp_path / "p.html", {"model_name": "tiny"}, heads, [], None, [])
    page = path.read_text(encoding="utf-8")
    assert "headlens sweep: tiny" in page and "No budget was computed" in page and "<img" not in page
    with pytest.raises(HeadlensError, match="cannot read image"):
        write_html(tmp_path / "q.html", {}, heads, [], None, [tmp_path / "missing.png"])
    assert not (tmp_path / "q.html").exists() and leftovers(tmp_path) == []


def test_html_full_size_sweep_is_written_quickly(tmp_path):
    heads = make_head_rows(n_layers=36, n_heads=32, n_kv=8, ks=[8, 16, 32, 64])
    groups = make_group_rows(n_layers=36, n_kv=8, group_size=4, ks=[8, 16, 32, 64])
    t0 = time.perf_counter()
    page = write_html(tmp_path / "big.html", {"model": "Qwen3-4B"}, heads, groups, make_budget(36, 8), [])
    assert time.perf_counter() - t0 < 5.0
    text = page.read_text(encoding="utf-8")
    assert "every query head (1152 rows)" in text
    assert len(re.findall(r"<tr>", text)) > 1152 + 288


def test_html_header_takes_the_name_from_a_model_dict(tmp_path):
    summary = {"model": {"name": "all-MiniLM-L6-v2", "num_layers": 6, "source": "/x/<y>"},
               "budget": {"totals": {"kv_bytes_before": 9216}}, "notes": "one note"}
    page = write_html(tmp_path / "p.html", summary, make_head_rows(data_aware=False), [], None, []).read_text()
    assert "<h1>headlens sweep: all-MiniLM-L6-v2</h1>" in page and "/x/&lt;y&gt;" in page
    assert "full run summary (1 more entries)" in page and "budget.totals.kv_bytes_before" in page
    assert "<li>one note</li>" in page
