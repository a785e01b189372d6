"""`headlens compress` pictures and page with key latents (``--keys``), drawn from a real run on tiny-lm (two
layers, k = 16, data-aware values and keys: values alone, keys alone, both). The figures are read back from the
matplotlib objects they were drawn with, the page from its HTML."""

from __future__ import annotations

import html
import re

import pytest

import headlens as hl
from headlens.compress.summary import summary
from headlens.report import compress_figures
from headlens.report.compress_figures import key_points, scatter, tradeoff
from headlens.report.compress_html import write_html

EVAL = ["The function returns a new list.", "A QuerySet can be filtered and sliced.",
        "If the argument is omitted, the default value is used."]


@pytest.fixture(scope="module")
def keys_summary() -> dict:
    cfg = hl.CompressConfig(layers="0:2", ks=[16], latents="data-aware", keys="data-aware", max_calib_tokens=256)
    result = hl.run_compress(hl.ModelSource(embedded="tiny-lm"), cfg, EVAL, disable=True)
    s = summary(result)
    assert [r["part"] for r in s["configurations"]] == ["values", "keys", "both"]
    return s


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the report saves (their axes and artists outlive the save), in the order they were saved."""
    figs: list = []
    save = compress_figures.save_figure

    def keep(fig, path, dpi=110):
        figs.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(compress_figures, "save_figure", keep)
    return figs


def _offsets(ax) -> list[tuple[float, float]]:
    """Every scatter point of ``ax``, sorted, rounded to 12 digits."""
    return sorted((round(float(x), 12), round(float(y), 12)) for c in ax.collections for x, y in c.get_offsets())


def _rounded(points) -> list[tuple[float, float]]:
    return sorted((round(x, 12), round(y, 12)) for x, y in points)


def _keyed(s: dict) -> list[dict]:
    return [r for r in s["configurations"] if r["part"] in ("keys", "both")]


def test_scatter_has_a_keys_panel(tmp_path, keys_summary, drawn):
    scatter(tmp_path / "compress_scatter.png", keys_summary)
    (fig,) = drawn
    axes = fig.get_axes()
    assert len(axes) == 4 and axes[-1].get_title() == "key logit error"
    want = _rounded((e["key_predicted_error"], e["key_logit_error"]) for r in _keyed(keys_summary)
                    for e in r["key_layers"])
    assert len(want) == 4  # (keys alone, both) x 2 layers
    assert _offsets(axes[-1]) == want
    assert sum(len(v) for v in key_points(keys_summary).values()) == 4
    # the value panels: values alone and both, two layers each
    values = _rounded((e["predicted_error"], e["value_path_error"]) for r in keys_summary["configurations"]
                      for e in r["layers"])
    assert len(values) == 4 and _offsets(axes[0]) == values
    legend = axes[-1].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["keys alone (data-aware keys)", "values + keys (data-aware keys)", "y = x"]
    assert "expectation" in legend.get_title().get_text()  # tiny-lm is rotary
    from PIL import Image

    with Image.open(tmp_path / "compress_scatter.png") as im:
        w, h = im.size
    assert 800 <= w <= 2000 and 300 <= h <= 1200, (w, h)


def test_tradeoff_has_a_line_per_part(tmp_path, keys_summary, drawn):
    tradeoff(tmp_path / "compress_tradeoff.png", keys_summary)
    (fig,) = drawn
    (ax,) = fig.get_axes()
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"values: uniform (data-aware)", "keys alone: uniform (data-aware)",
                          "values + keys: uniform (data-aware)"}
    assert len({ln.get_linestyle() for ln in lines.values()}) == 3
    by_part = {r["part"]: 100 * r["saving"] for r in keys_summary["configurations"]}
    for label, part in (("values:", "values"), ("keys alone:", "keys"), ("values + keys:", "both")):
        (ln,) = [ln for name, ln in lines.items() if name.startswith(label)]
        assert list(ln.get_xdata()) == pytest.approx([by_part[part]])
    assert by_part["both"] > max(by_part["values"], by_part["keys"])  # both parts: the most saved


def _section_rows(text: str, name: str) -> list[list[str]]:
    """The cells of the key table under the <details> whose summary starts with ``name``."""
    start = text.index(f"<summary>{html.escape(name)} (")
    table = text[start:text.index("</details>", start)]
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table) if "<td" in row]


def test_page_has_the_key_table(tmp_path, keys_summary):
    images = [scatter(tmp_path / "compress_scatter.png", keys_summary),
              tradeoff(tmp_path / "compress_tradeoff.png", keys_summary)]
    text = write_html(tmp_path / "compress.html", keys_summary, images).read_text(encoding="utf-8")
    assert "<h2>Keys per layer</h2>" in text
    assert text.index("<h2>Per layer</h2>") < text.index("<h2>Keys per layer</h2>")
    assert "<th class=\"l\">part</th>" in text
    for r in _keyed(keys_summary):
        rows = _section_rows(text[text.index("<h2>Keys per layer</h2>"):], r["name"])
        assert len(rows) == len(r["key_layers"]) == 2
        for row, e in zip(rows, r["key_layers"]):
            assert row[:3] == [str(e["layer"]), "16, 16", "yes"]
            for cell, key in zip(row[3:], ("key_predicted_error", "key_logit_error", "key_attention_kl",
                                           "isolated_keys_error", "isolated_values_error", "isolated_both_error",
                                           "attention_accumulated_error")):
                assert cell == ("\u2013" if e[key] is None else f"{e[key]:.4f}"), (r["name"], key)
        if r["part"] == "both":
            assert all(e["isolated_both_error"] is not None for e in r["key_layers"])
    values_only = keys_summary["configurations"][0]["name"]
    assert f"<summary>{html.escape(values_only)} (values" not in text  # no key table without keys
