"""The notebook user's two usual mistakes, at every public entry point of ``import headlens``: one string where a
list is expected (taken as one item, never iterated character by character), and a value of the wrong type (one
:class:`HeadlensError` naming the parameter and the type expected, never a raw ``TypeError``). Nothing here loads a
model: every check runs before one would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headlens as hl
from headlens.compress.texts import compress_texts

SRC = hl.ModelSource(embedded="tiny-lm")
MOE = hl.ModelSource(embedded="tiny-moe")
OV = dict(layer=0, head=0)

# (what, call, parameter, the type expected as the message says it)
WRONG_TYPES = [
    ("OVConfig layer str", lambda: hl.OVConfig(layer="3", head=0), "layer", "an integer, got str '3'"),
    ("OVConfig head bool", lambda: hl.OVConfig(layer=0, head=True), "head", "an integer, got bool True"),
    ("OVConfig prompt list", lambda: hl.OVConfig(**OV, prompt=["a", "b"]), "prompt", "a text (str) or None"),
    ("OVConfig prompt Path", lambda: hl.OVConfig(**OV, prompt=Path("p.txt")), "prompt", "got PosixPath 'p.txt'"),
    ("OVConfig latent_dim float", lambda: hl.OVConfig(**OV, latent_dim=8.0), "latent_dim", "an integer or None"),
    ("analyze_head source str", lambda: hl.analyze_head("tiny-lm", hl.OVConfig(**OV)), "source", "a ModelSource"),
    ("analyze_head cfg dict", lambda: hl.analyze_head(SRC, {"layer": 0, "head": 0}), "cfg", "an OVConfig"),
    ("SweepConfig calibration Path", lambda: hl.SweepConfig(calibration=Path("c.txt")), "calibration",
     "a text or a list of texts (str), got PosixPath 'c.txt': read the file first, e.g. headlens.read_texts(path)"),
    ("SweepConfig calibration ints", lambda: hl.SweepConfig(calibration=["a", 2]), "calibration",
     "a list of texts (str), but item 1 is int 2"),
    ("SweepConfig kv_bytes str", lambda: hl.SweepConfig(kv_bytes="2"), "kv_bytes", "an integer, got str '2'"),
    ("SweepConfig target_error str", lambda: hl.SweepConfig(target_error="0.1"), "target_error", "a number or None"),
    ("SweepConfig layers float", lambda: hl.SweepConfig(layers=1.5), "layers", "a selection"),
    ("run_sweep cfg None", lambda: hl.run_sweep(SRC, None), "cfg", "a SweepConfig"),
    ("SphereConfig prompt Path", lambda: hl.SphereConfig(prompt=Path("p.txt")), "prompt", "read the file first"),
    ("SphereConfig seed str", lambda: hl.SphereConfig(seed="0"), "seed", "an integer"),
    ("SphereConfig frame_seconds str", lambda: hl.SphereConfig(frame_seconds="1"), "frame_seconds", "a number"),
    ("SphereConfig align str", lambda: hl.SphereConfig(align="no"), "align", "True or False"),
    ("sphere_from_model source Path", lambda: hl.sphere_from_model(Path("m"), hl.SphereConfig()), "source",
     "a ModelSource"),
    ("RouterConfig batch_size str", lambda: hl.RouterConfig(batch_size="4"), "batch_size", "an integer"),
    ("RouterConfig color_layer float", lambda: hl.RouterConfig(color_layer=1.0), "color_layer", "an integer or None"),
    ("route texts Path", lambda: hl.route(MOE, Path("t.txt")), "texts", "a text or a list of texts"),
    ("route texts int", lambda: hl.route(MOE, 3), "texts", "a text or a list of texts (str), got int 3"),
    ("route cfg dict", lambda: hl.route(MOE, "a text", {"batch_size": 2}), "cfg", "a RouterConfig"),
    ("CompressConfig ks float", lambda: hl.CompressConfig(ks=16.0), "ks", "an integer or a list of them"),
    ("CompressConfig ks list of str", lambda: hl.CompressConfig(ks=["16"]), "ks", "but item 0 is str '16'"),
    ("CompressConfig latents int", lambda: hl.CompressConfig(latents=1), "latents", "one of plain, data-aware, both"),
    ("CompressConfig target_errors str", lambda: hl.CompressConfig(target_errors="0.1"), "target_errors",
     "a number or a list of them, got str '0.1'"),
    ("CompressConfig budget int", lambda: hl.CompressConfig(budget=3), "budget", "a path (str or pathlib.Path)"),
    ("run_compress eval_texts Path", lambda: hl.run_compress(SRC, hl.CompressConfig(ks=8, latents="plain"),
                                                            Path("e.txt")), "eval_texts", "read the file first"),
    ("run_compress calib_texts int", lambda: hl.run_compress(SRC, hl.CompressConfig(ks=8), ["an eval text"], 5),
     "calib_texts", "a text or a list of texts (str), got int 5"),
    ("run_compress source str", lambda: hl.run_compress("tiny-lm"), "source", "a ModelSource"),
    ("trace_model_layer layer str", lambda: hl.trace_model_layer(SRC, "1"), "layer", "an integer, got str '1'"),
]


@pytest.mark.parametrize("what,call,param,expected", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_a_wrong_type_is_one_error_naming_the_parameter(what, call, param, expected):
    with pytest.raises(hl.HeadlensError) as err:
        call()
    message = str(err.value)
    assert f"`{param}` must be" in message and expected in message, message
    assert "\n" not in message


# (what, call, what it must give): one string stands for a list of one
ONE_STRING = [
    ("CompressConfig latents", lambda: hl.CompressConfig(latents="plain").latents, ["plain"]),
    ("CompressConfig latents both", lambda: hl.CompressConfig(latents="both").latents, ["plain", "data-aware"]),
    ("CompressConfig ks int", lambda: hl.CompressConfig(ks=16).ks, [16]),
    ("CompressConfig ks text", lambda: hl.CompressConfig(ks="16,32").ks, [16, 32]),
    ("CompressConfig target_errors", lambda: hl.CompressConfig(target_errors=0.2).target_errors, [0.2]),
    ("SweepConfig calibration", lambda: hl.SweepConfig(calibration="The only text.").calibration,
     ["The only text."]),
    ("run_compress texts", lambda: (lambda t: (t.eval, t.calib))(
        compress_texts(SRC, True, "The eval text.", "The calibration text.")),
     (["The eval text."], ["The calibration text."])),
]


@pytest.mark.parametrize("what,call,want", ONE_STRING, ids=[w[0] for w in ONE_STRING])
def test_one_string_is_one_item(what, call, want):
    assert call() == want


def test_a_bad_choice_names_the_choices_not_a_character():
    with pytest.raises(hl.HeadlensError, match=r"^`latents` 'fancy': choose plain, data-aware, both$"):
        hl.CompressConfig(latents="fancy")
    with pytest.raises(hl.HeadlensError, match=r"^`latents` 'p': choose"):
        hl.CompressConfig(latents=["p"])


# ------------------------------------------------------------------- every field, any odd value (hypothesis)

ODD_VALUES = ["3", "plain", "", 3, -1, 0, 2.5, float("nan"), True, None, Path("x.txt"), ["a"], [1, 2], (), {"a": 1},
              b"x", object()]
CONFIGS = {  # a config class and the arguments it needs
    hl.OVConfig: dict(layer=0, head=0),
    hl.SweepConfig: {},
    hl.SphereConfig: {},
    hl.RouterConfig: {},
    hl.CompressConfig: {},
}


def _fields(cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


CASES = [(cls, name) for cls in CONFIGS for name in _fields(cls)]


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), value=st.sampled_from(ODD_VALUES))
def test_any_value_of_any_field_is_accepted_or_one_error_naming_it(case, value):
    """Built with one field set to an odd value and validated as the entry point does: either it passes, or the
    one error raised is a HeadlensError naming that field; never a TypeError, ValueError or AttributeError."""
    cls, name = case
    try:
        cfg = cls(**{**CONFIGS[cls], name: value})
        (getattr(cfg, "validate", None) or cfg.check)()
    except hl.HeadlensError as exc:
        assert f"`{name}`" in str(exc), (name, value, str(exc))
