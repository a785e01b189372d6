"""The notebook-facing API of ``import headlens``: cheap to import, typed results, errors naming parameters."""

import subprocess
import sys

import pytest

import headlens as hl

PROMPT = "Octopuses have three hearts, and two of them stop beating when they swim."


def test_dir_lists_the_entry_points_and_import_is_cheap():
    names = dir(hl)
    for name in ("ModelSource", "analyze_head", "OVConfig", "run_sweep", "SweepConfig", "sphere_from_model",
                 "SphereConfig", "route", "RouterConfig", "load_dump", "trace_model_layer", "HeadlensError"):
        assert name in names
        assert getattr(hl, name) is not None
    # `import headlens` loads neither torch nor transformers (no side effects at import time).
    code = "import sys, headlens; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    with pytest.raises(AttributeError):
        hl.no_such_thing  # noqa: B018


def test_analyze_head_with_a_prompt_from_python_matches_the_cli(tmp_path, capsys):
    import json

    from headlens.cli import main

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()  # a notebook's own choice must survive loading a model
    try:
        r = hl.analyze_head(hl.ModelSource(), hl.OVConfig(layer=3, head=5, latent_dim=8, prompt=PROMPT))
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity_warning()
    assert isinstance(r, hl.OVResult) and r.cache_inputs == "prompt" and r.data_aware is not None
    assert main(["ov", "--layer", "3", "--head", "5", "--latent-dim", "8", "--prompt", PROMPT,
                 "--json", str(tmp_path / "ov.json")]) == 0
    cli = json.loads((tmp_path / "ov.json").read_text())
    assert cli["singular_values"] == r.singular_values
    assert cli["cache_error"] == r.cache_error
    assert cli["data_aware"]["whitened_error"] == r.data_aware.whitened_error


def test_library_errors_name_parameters_and_the_cli_names_flags(capsys):
    from headlens.cli import main

    with pytest.raises(hl.HeadlensError, match=r"^`layer` 9 out of range"):
        hl.analyze_head(hl.ModelSource(), hl.OVConfig(layer=9, head=0))
    with pytest.raises(hl.HeadlensError, match=r"`latent_dim` must be positive"):
        hl.OVConfig(layer=0, head=0, latent_dim=0)
    assert main(["ov", "--layer", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headlens ov: error: --layer 9 out of range") and "`" not in err


def test_sweep_and_sphere_from_python_return_typed_results():
    src = hl.ModelSource()
    sw = hl.run_sweep(src, hl.SweepConfig(layers="0:2", ks="4,8", calibration=[PROMPT * 2], target_error=0.3))
    assert isinstance(sw, hl.SweepResult)
    assert [layer.layer for layer in sw.layers] == [0, 1]
    sph = hl.sphere_from_model(src, hl.SphereConfig(prompt=PROMPT, layers="0:3"))
    assert isinstance(sph, hl.SphereResult) and [f.layer for f in sph.frames] == [0, 1, 2]
