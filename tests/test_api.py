"""The notebook-facing API of ``import headlens``: cheap to import, typed results, errors naming parameters."""

import subprocess
import sys

import pytest

import headlens as hl

PROMPT = "Octopuses have three hearts, and two of them stop beating when they swim."


def test_dir_lists_the_entry_points_and_import_is_cheap():
    names = dir(hl)
    for name in ("ModelSource", "analyze_head", "OVConfig", "run_sweep", "SweepConfig", "sphere_from_model",
                 "SphereConfig", "route", "RouterConfig", "load_dump", "trace_model_layer", "HeadlensError",
                 "run_generate", "GenerateConfig", "load_compressed", "LatentCache"):
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


# ------------------------------------------------------------------ results: to_json() and a short repr

LM_PROMPT = "The function returns a new list. If the argument is omitted, the default value is used."


@pytest.fixture(scope="module")
def results():
    """One result of every entry point, on the embedded decoders (a few seconds in all)."""
    lm = hl.ModelSource(embedded="tiny-lm")
    return {
        "OVResult": hl.analyze_head(lm, hl.OVConfig(layer=3, head=5, latent_dim=8, prompt=LM_PROMPT)),
        "SweepResult": hl.run_sweep(lm, hl.SweepConfig(layers="0:2", ks=[8, 16])),
        "SphereResult": hl.sphere_from_model(lm, hl.SphereConfig(prompt=LM_PROMPT, layers="0:3")),
        "RouterResult": hl.route(hl.ModelSource(embedded="tiny-moe"), LM_PROMPT),
        "CompressResult": hl.run_compress(lm, hl.CompressConfig(ks=16, latents="plain", layers="0:2"),
                                          [LM_PROMPT]),
        "DiagramResult": hl.trace_model_layer(lm, 1),
        "GenerateResult": hl.run_generate(lm, hl.GenerateConfig(prompts=LM_PROMPT, max_new_tokens=3, layers="0:2")),
    }


@pytest.mark.parametrize("name", ["OVResult", "SweepResult", "SphereResult", "RouterResult", "CompressResult",
                                  "DiagramResult", "GenerateResult"])
def test_every_result_has_strict_json_and_a_short_repr(results, name):
    import json

    r = results[name]
    assert type(r).__name__ == name
    data = r.to_json()
    text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN or Infinity
    assert json.loads(text) == data
    shown = repr(r)
    lines = shown.splitlines()
    assert lines[0].startswith(f"<{name} ") and lines[-1].startswith("  see: ") and shown.endswith(">"), shown
    assert len(lines) <= 10 and max(map(len, lines)) <= 160, shown  # a few lines, not thousands of tensors
    assert "to_json()" in lines[-1] or "lines()" in lines[-1], shown
    assert "tensor(" not in shown and "array(" not in shown, shown
    assert str(r) == shown  # print(result) shows the same


def test_what_the_reprs_say(results):
    """The lines are about this result: its model and numbers, as the fields hold them."""
    sw, cr = results["SweepResult"], results["CompressResult"]
    assert repr(sw).startswith("<SweepResult tiny-lm: 2 of 6 layers, 8 query / 2 kv heads, head_dim 64; weight-only")
    m = cr.measurements[0]
    assert f"plain k=16: {100 * m.kv.saving:.1f}% of the KV cache saved; KL {m.kl_mean:.4f} nats" in repr(cr)
    ov = results["OVResult"]
    assert f"rank {ov.rank} of head_dim 64" in repr(ov) and f"cache_error {ov.cache_error:.3f}" in repr(ov)
    assert results["CompressResult"].to_json()["configurations"][0]["name"] == "plain k=16"
    assert results["SweepResult"].to_json()["heads"][0]["layer"] == 0


def _readme_block(containing: str) -> str:
    """The README's python block that contains ``containing``."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if containing in b]
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks with {containing!r}"
    return blocks[0]


def test_the_readme_compress_example_runs(capsys):
    code = _readme_block("hl.run_compress(")
    exec(compile(code, "README.md (compress example)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "<CompressResult tiny-lm (causal-lm): 2 configuration(s) on 6 layer(s)", out
    assert out[1].startswith("  plain k=16: ") and out[2].startswith("  plain k=32: "), out
    last = out[-1].split()
    assert last[:2] == ["plain", "k=16"] and float(last[2]) > 0 and float(last[3]) > 1, out[-1]


# ------------------------------------------------------------------ library messages name parameters, not flags


def _library_strings():
    """Every string the library builds outside cli/ and report/ (the two rooms that talk to the command line), as
    written: f-strings with their fields as {}, docstrings left out; with its place."""
    import ast
    from pathlib import Path

    root = Path(hl.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] in ("cli", "report"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        parts = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                parts.update(id(v) for v in node.values)
                yield (f"{path.relative_to(root)}:{node.lineno}",
                       "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and id(node) not in parts):
                yield f"{path.relative_to(root)}:{node.lineno}", node.value


def test_library_errors_name_parameters_not_flags():
    """`--layers` in a library message is wrong for a notebook user; `layers` in backticks becomes the flag on the
    command line. Shell commands quoted in backticks (`pip install --no-deps ...`) are not flags of headlens."""
    import re

    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    strings = list(_library_strings())
    found = [(where, text) for where, text in strings if flag.search(re.sub(r"`[^`]*`", "", text))]
    assert not found, found
    assert len(strings) > 1000 and any("`budget`" in text for _, text in strings)  # the scan sees the messages


def test_a_library_message_becomes_the_flag_on_the_command_line(tmp_path, capsys):
    """The budget/layers mismatch names `budget` and `layers` in the library and --budget/--layers on the command
    line (it used to say "pass --layers" to notebook users)."""
    from headlens.circuits.sweep_parts import weights_digest
    from headlens.cli import main
    from headlens.io.tables import write_csv

    src = hl.ModelSource(embedded="tiny-lm")
    digest = weights_digest(src.checkpoint())
    budget = write_csv(tmp_path / "b.csv", [{"layer": layer, "kv_head": g, "k_plain": 8, "model_weights": digest}
                                           for layer in range(6) for g in range(2)])
    cfg = hl.CompressConfig(budget=budget, latents="plain", layers="0:2")
    with pytest.raises(hl.HeadlensError, match=r"^`budget` covers layers \[0, 1, 2, 3, 4, 5\], but this run "
                                               r"compresses \[0, 1\]: pass `layers` 0,1,2,3,4,5 to match the sweep$"):
        hl.run_compress(src, cfg, [LM_PROMPT])
    assert main(["compress", "--budget", str(budget), "--latent", "plain", "--layers", "0:2", "--eval",
                 str(_texts_file(tmp_path)), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: --budget covers layers [0, 1, 2, 3, 4, 5], but this run compresses [0, 1]: pass "
                        "--layers 0,1,2,3,4,5 to match the sweep"), err


def _texts_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(LM_PROMPT + "\n")
    return path
