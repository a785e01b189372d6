"""sphere and diagram on models the spec table does not know (their blocks found in the loaded model), parallel
layers named from the traced structure, BERT's resid_mid label where its hook is, Mermaid front matter that YAML
reads, and prompts that give no tokens or ids past the vocabulary."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import transformers as T
import yaml
from tiny_models import PROMPT, build_tiny, build_tokenizer, save_checkpoint

from headlens.arch import GENERIC, SPECS
from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.report.diagram import to_mermaid
from headlens.residual.capture import prompt_ids
from headlens.residual.modules import find_blocks
from headlens.residual.tracing import hook_sites, trace_layer

# Families the spec table lacks (and is not about to get): MPT (pre-norm, blocks at `blocks`, the MLP adds the
# residual inside itself) and CodeGen (parallel attention + MLP, blocks at `h`).
UNKNOWN = {
    "mpt": (T.MptConfig, T.MptModel, dict(d_model=64, n_heads=4, n_layers=3, expansion_ratio=2, max_seq_len=128,
                                          vocab_size=512)),
    "codegen": (T.CodeGenConfig, T.CodeGenModel, dict(n_embd=64, n_head=4, n_layer=3, n_positions=128,
                                                      vocab_size=512, rotary_dim=8, n_inner=64)),
}


@pytest.fixture(scope="module")
def unknown_dirs(tmp_path_factory):
    out = {}
    for name, (cfg, cls, kw) in UNKNOWN.items():
        assert name not in SPECS
        model = build_tiny(cfg, cls, 0, **kw)
        d = tmp_path_factory.mktemp(name)
        save_checkpoint(model, build_tokenizer("none"), d, "hf_dir")
        out[name] = (model, d)
    return out


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("headlens")]  # not transformers' config warnings
    assert code == 2 and len(ours) == 1 and "Traceback" not in err, err
    return ours[0]


def test_sphere_runs_a_family_the_spec_table_lacks(unknown_dirs, tmp_path, capsys):
    model, d = unknown_dirs["mpt"]
    tok = build_tokenizer("none")
    code = main(["sphere", "--weights", str(d), "--prompt", PROMPT, "--out-dir", str(tmp_path), "--workers", "1",
                 "--site", "resid_mid"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 of 3 layers; site resid_mid: forward pre-hook on blocks.<l>.norm_2" in out.splitlines()[0]
    data = json.loads((tmp_path / "sphere.json").read_text())
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    mids = {}
    hooks = [b.norm_2.register_forward_pre_hook(lambda m, a, i=i: mids.__setitem__(i, a[0][0].clone()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    for frame in data["frames"]:  # each token's norm before the projection is the real stream's
        l = frame["layer"]
        torch.testing.assert_close(torch.tensor(frame["full_norms"], dtype=torch.float64), mids[l].double().norm(dim=-1),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mids[l], hs[l][0])  # resid_mid, not the layer input


def test_resid_mid_on_parallel_layers_is_refused_from_the_traced_structure(unknown_dirs, tmp_path, capsys):
    _model, d = unknown_dirs["codegen"]
    code = main(["sphere", "--weights", str(d), "--prompt", PROMPT, "--out-dir", str(tmp_path / "o"),
                 "--site", "resid_mid", "--workers", "1"])
    line = _one_line_error(capsys, code)
    assert "codegen" in line and "in parallel: there is no resid_mid" in line and "--site resid_pre" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,style", [("mpt", "pre-norm"), ("codegen", "parallel")])
def test_diagram_runs_a_family_the_spec_table_lacks(unknown_dirs, tmp_path, capsys, name, style):
    _model, d = unknown_dirs[name]
    code = main(["diagram", "--weights", str(d), "--layer", "1", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert f": {style} residual" in out
    if name == "codegen":
        assert "resid_mid  none: a parallel layer adds attention and MLP to the stream in one join" in out
    code = main(["diagram", "--weights", str(d), "--layer", "3", "--out-dir", str(tmp_path)])
    assert "--layer 3 out of range" in _one_line_error(capsys, code)


def test_a_checkpoint_without_config_is_still_an_error(unknown_dirs, tmp_path, capsys):
    _model, d = unknown_dirs["mpt"]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(d / "model.safetensors", bare / "model.safetensors")
    for cmd in ("sphere", "diagram"):
        code = main([cmd, "--weights", str(bare / "model.safetensors"), "--out-dir", str(tmp_path / "o")])
        _one_line_error(capsys, code)


def test_find_blocks_prefers_the_layer_list_over_lists_inside_it():
    model = build_tiny(T.MixtralConfig, T.MixtralModel, 0, vocab_size=512, hidden_size=32, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=64)
    assert find_blocks(model) == "layers"


@pytest.mark.parametrize("cls,cfg,extra", [
    (T.CohereModel, T.CohereConfig, dict(num_key_value_heads=2)),
    (T.StableLmModel, T.StableLmConfig, dict(num_key_value_heads=2, use_parallel_residual=True)),
    (T.PhiModel, T.PhiConfig, {}),
])
def test_diagram_calls_residual_plus_attn_plus_mlp_parallel(cls, cfg, extra):
    model = build_tiny(cfg, cls, 0, vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, **extra)
    spec = dataclasses.replace(GENERIC, layers_path="layers")
    graph = trace_layer(model, spec, 0)
    assert graph.style == "parallel" and graph.mid_consumers == []
    mid = next(s for s in hook_sites(model, spec, graph) if s.site == "resid_mid")
    assert mid.module is None


def test_bert_resid_mid_label_and_hook_agree(ckpts):
    model, _tok = ckpts.model("bert", "mha")
    spec = SPECS["bert"]
    graph = trace_layer(model, spec, 1)
    labelled = [n for n in graph.nodes if n.site == "resid_mid"]
    assert [n.name for n in labelled] == ["attention.output.LayerNorm"]
    assert graph.joins[0].result == "normed by attention.output.LayerNorm into resid_mid"
    hook = next(s for s in hook_sites(model, spec, graph) if s.site == "resid_mid")
    seen = {}
    layer = model.encoder.layer[1]
    h1 = model.get_submodule(hook.module).register_forward_pre_hook(lambda m, a: seen.__setitem__("hook", a[0]))
    h2 = layer.attention.output.LayerNorm.register_forward_hook(lambda m, a, o: seen.__setitem__("label", o))
    with torch.no_grad():
        model(input_ids=torch.tensor([[4, 9, 33, 5]]))
    h1.remove()
    h2.remove()
    torch.testing.assert_close(seen["hook"], seen["label"], rtol=0, atol=0)
    assert "= resid_mid" in to_mermaid(graph)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gpt_neox", "bert"])
def test_mermaid_front_matter_is_yaml(ckpts, family):
    model, _tok = ckpts.model(family, "mha" if family in ("gpt_neox", "bert") else "gqa")
    graph = trace_layer(model, SPECS[model.config.model_type], 0)
    text = to_mermaid(graph)
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["title"].startswith(f"{graph.model_class} layer 0: ") and body.startswith("flowchart TD")


class _NoTokens:
    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.zeros(1, 0, dtype=torch.long)}

    def __len__(self):
        return 0


def test_prompt_ids_refuses_no_tokens_and_ids_past_the_vocabulary():
    with pytest.raises(HeadlensError, match="tokenizes to no tokens"):
        prompt_ids(_NoTokens(), "hello", None)
    tok = build_tokenizer("none")
    with pytest.raises(HeadlensError, match=r"token id \d+, but the model's vocabulary has 10 entries"):
        prompt_ids(tok, PROMPT, None, vocab_size=10)


def test_sphere_and_ov_on_a_directory_without_tokenizer_files(ckpts, tmp_path, capsys):
    src = ckpts.path("qwen3", "gqa", "hf_dir")
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, d / f)
    for argv in (["sphere", "--workers", "1"], ["ov", "--layer", "0", "--head", "0"]):
        code = main([*argv, "--weights", str(d), "--prompt", PROMPT, "--out-dir", str(tmp_path / "o")])
        line = _one_line_error(capsys, code)
        assert "tokenizes to no tokens" in line or "tokenizer" in line
    assert not (tmp_path / "o").exists()


def test_sphere_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    model = build_tiny(T.LlamaConfig, T.LlamaModel, 0, vocab_size=64, hidden_size=32, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    save_checkpoint(model, build_tokenizer("none"), tmp_path / "m", "hf_dir")
    for argv in (["sphere", "--workers", "1"], ["ov", "--layer", "0", "--head", "0"]):
        code = main([*argv, "--weights", str(tmp_path / "m"), "--prompt", PROMPT, "--out-dir", str(tmp_path / "o")])
        assert "vocabulary has 64 entries" in _one_line_error(capsys, code)
