"""Devices, precision and accelerate's device maps (headlens.io.placement) on the CPU.

- ``--device cpu`` gives exactly the default's numbers for every command (the default is ``auto``, the CPU here);
- ``--dtype auto`` is float32 on the CPU and the checkpoint's own dtype on an accelerator;
- a device map that offloads most of a model to disk gives the same numbers as the model in memory (``ov`` with a
  prompt, ``sphere``, ``router``), and a subprocess run of a checkpoint several times larger than its
  ``--max-memory`` stays under a memory bound well below the checkpoint's size;
- a device map splitting a tiny model's layers between ``cpu`` and ``disk`` captures the same residual stream as
  the unsplit model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from outputs import close, numbers
from tiny_models import PROMPT

from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.io.placement import Placement, parse_max_memory
from headlens.io.source import ModelSource

LM_PROMPT = ("The function returns a new list. If the argument is omitted, the default value is used. A QuerySet "
             "can be filtered, sliced and passed around without hitting the database.")

# Every command that runs a model, on the embedded models (argv after the command, before --out-dir).
COMMANDS = {
    "ov-prompt": ["ov", "--model", "tiny-lm", "--layer", "2", "--head", "1", "--prompt", LM_PROMPT, "--heatmap",
                  "--json"],
    "ov-weights": ["ov", "--model", "tiny-lm", "--layer", "3", "--head", "0", "--fold-norm", "--json"],
    "sphere": ["sphere", "--model", "tiny-lm", "--prompt", LM_PROMPT, "--workers", "1"],
    "diagram": ["diagram", "--model", "tiny-lm", "--layer", "1", "--json"],
    "router": ["router", "--model", "tiny-moe", "--prompt", LM_PROMPT],
    "sweep": ["sweep", "--model", "tiny-lm", "--k", "8,16"],
    "sweep-calib": ["sweep", "--model", "tiny-lm", "--k", "8,16", "--calib", "{calib}", "--max-calib-tokens", "256"],
    "compress": ["compress", "--model", "tiny-lm", "--k", "16,32", "--eval", "{eval}", "--calib", "{calib}",
                 "--max-calib-tokens", "256"],
}


def eval_texts(tmp: Path) -> dict[str, str]:
    calib = tmp / "calib.txt"
    calib.write_text("\n".join([LM_PROMPT, "Python lists grow at the end; a tuple cannot change once made.",
                                "The database returns the rows in the order of the index."]) + "\n")
    ev = tmp / "eval.txt"
    ev.write_text("A function can return several values as a tuple.\nThe loop ends when the list is empty.\n")
    return {"calib": str(calib), "eval": str(ev)}


def _run(argv: list[str], out: Path, extra: list[str], capsys) -> str:
    capsys.readouterr()
    assert main([*argv, "--out-dir", str(out), *extra]) == 0
    return capsys.readouterr().out.replace(str(out), "<out>")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means CUDA on this machine: tests/gpu compares it")
@pytest.mark.parametrize("name", list(COMMANDS))
def test_device_cpu_gives_exactly_the_default_numbers(name, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HEADLENS_DEVICE", raising=False)  # the default: auto (the CPU on this machine)
    texts = eval_texts(tmp_path)
    argv = [a.format(**texts) for a in COMMANDS[name]]
    printed_default = _run(argv, tmp_path / "default", [], capsys)
    printed_cpu = _run(argv, tmp_path / "cpu", ["--device", "cpu"], capsys)
    a, b = numbers(tmp_path / "default"), numbers(tmp_path / "cpu")
    assert a and a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in a:
        assert a[key] == b[key], key
    assert _untimed(printed_default) == _untimed(printed_cpu)


def _untimed(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "seconds" not in line)


def test_dtype_auto_is_float32_on_the_cpu_and_the_checkpoints_on_an_accelerator(monkeypatch):
    cfg = {"model_type": "qwen3", "torch_dtype": "bfloat16"}
    assert Placement(device="cpu").dtype("auto", cfg) == torch.float32
    assert Placement(device="cpu").dtype("float16", cfg) == torch.float16
    monkeypatch.setattr(Placement, "on_accelerator", property(lambda self: True))
    assert Placement(device="cpu").dtype("auto", cfg) == torch.bfloat16
    assert Placement(device="cpu").dtype("auto", {"dtype": "float16"}) == torch.float16
    assert Placement(device="cpu").dtype("auto", {"text_config": {"torch_dtype": "bfloat16"}}) == torch.bfloat16
    assert Placement(device="cpu").dtype("auto", {}) == torch.float32  # nothing said: float32
    # the embedded tiny-lm is stored in bfloat16: auto on an accelerator runs it so
    assert ModelSource(embedded="tiny-lm", device="cpu").dtype("auto") == torch.bfloat16


def test_max_memory_syntax():
    assert parse_max_memory("cpu=60GiB,disk=100GB") == {"cpu": 60 * 2**30, "disk": 100 * 10**9}
    assert parse_max_memory("cpu=1000") == {"cpu": 1000}
    for bad in ("", "cpu", "cpu=", "=1GB", "cpu=1GB,cpu=1GB", "gpu0=1GB", "cpu=-1GB", "cpu=0"):
        with pytest.raises(HeadlensError, match="max_memory"):
            parse_max_memory(bad)


# ------------------------------------------------------------------------------------------ disk offload


def _say_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """A Qwen3 decoder of ~330 MB in float32 (20 layers of hidden 512) with the tiny-lm tokenizer: several times
    the 40 MB --max-memory the offload runs get, and large next to the interpreter's own footprint."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from headlens.io.embedded import embedded_dir

    tok_dir = embedded_dir("tiny-lm")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=20,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("big") / "qwen3-big"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    size = _say_size(out)
    assert 280e6 < size < 400e6, size  # large for a test, still seconds to build and read
    return out


OFFLOAD = ["--device-map", "auto", "--max-memory", "cpu=40MB"]


def test_disk_offload_gives_the_same_numbers(big_checkpoint, tmp_path, capsys):
    w = str(big_checkpoint)
    runs = {
        "ov": ["ov", "--weights", w, "--layer", "13", "--head", "3", "--prompt", LM_PROMPT, "--heatmap", "--json"],
        "sphere": ["sphere", "--weights", w, "--prompt", LM_PROMPT, "--workers", "1", "--layers", "0:20:4"],
    }
    for name, argv in runs.items():
        _run(argv, tmp_path / f"{name}-mem", [], capsys)
        _run(argv, tmp_path / f"{name}-disk", [*OFFLOAD, "--offload-dir", str(tmp_path / "off")], capsys)
        a, b = numbers(tmp_path / f"{name}-mem"), numbers(tmp_path / f"{name}-disk")
        assert a and a == b, name
    _check_offloaded(big_checkpoint, tmp_path)


def _check_offloaded(directory: Path, tmp: Path) -> None:
    """The placement accelerate chose for the offload runs: most of the weights on disk."""
    model = ModelSource(weights=directory, device_map="auto", max_memory="cpu=40MB",
                        offload_dir=tmp / "off2").model(directory)
    assert "disk" in set(model.hf_device_map.values()), model.hf_device_map
    total = sum(p.numel() for p in model.parameters())
    meta = sum(p.numel() for p in model.parameters() if p.device.type == "meta")
    assert meta > 0.8 * total, (meta, total, model.hf_device_map)


def test_router_counts_under_disk_offload(tmp_path, capsys):
    """Every expert count and the printed statistics are identical; the float statistics in the JSON agree to
    1e-6 (the offloaded experts run the same float32 products, summed in another order: 1e-9 seen)."""
    argv = ["router", "--model", "tiny-moe", "--prompt", LM_PROMPT]
    printed_mem = _run(argv, tmp_path / "mem", [], capsys)
    printed_disk = _run(argv, tmp_path / "disk", ["--device-map", "auto", "--max-memory", "cpu=1MB",
                                                  "--offload-dir", str(tmp_path / "off")], capsys)
    assert printed_mem == printed_disk
    a, b = numbers(tmp_path / "mem"), numbers(tmp_path / "disk")
    assert a["router_stats.csv"] == b["router_stats.csv"]
    dump_a, dump_b = a["router_dump.json"], b["router_dump.json"]
    for s_a, s_b in zip(dump_a["stats"], dump_b["stats"]):  # type: ignore[index]
        counts = ("tokens", "load_share", "dead_experts", "coactivation", "repeat_consecutive")  # from the top-k
        assert all(s_a[k] == s_b[k] for k in counts), counts
    close(dump_a, dump_b)


_PEAK = textwrap.dedent("""
    import json, sys
    from headlens.cli import main
    code = 0
    if sys.argv[1:]:
        code = main(sys.argv[1:])
    else:  # the interpreter with everything a run imports and one frame drawn (the drawing does not scale with
        # the model: --workers 1 draws in this process), and no model
        import numpy as np
        import torch, transformers, accelerate  # noqa: F401
        from headlens.residual import sphere, capture  # noqa: F401
        from transformers import Qwen3ForCausalLM  # noqa: F401
        from headlens.report.sphere_frames import render_frame
        pts = np.random.default_rng(0).normal(size=(40, 3))
        render_frame({"points": pts / np.linalg.norm(pts, axis=1, keepdims=True), "tokens": [f"t{i}" for i in range(40)],
                      "positions": list(range(40)), "title": "baseline", "first": 0})
    # VmHWM, this process's own peak (ru_maxrss would carry the forking parent's: Linux keeps it over exec)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(json.dumps({"code": code, "peak": int(hwm.split()[1]) * 1024}))
""")


def _peak(argv: list[str], cwd: Path) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEADLENS_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-c", _PEAK, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    return int(result["peak"])


def test_offloaded_run_stays_under_a_memory_bound(big_checkpoint, tmp_path):
    """The sphere of a 330 MB checkpoint with --max-memory cpu=40MB: its peak RSS above the interpreter's own stays
    under half the checkpoint (the same run in memory needs the whole checkpoint, checked as the control)."""
    size = _say_size(big_checkpoint)
    argv = ["sphere", "--weights", str(big_checkpoint), "--prompt", LM_PROMPT, "--workers", "1", "--layers", "0:20:4"]
    base = _peak([], tmp_path)
    in_memory = _peak([*argv, "--out-dir", str(tmp_path / "mem")], tmp_path)
    offloaded = _peak([*argv, "--out-dir", str(tmp_path / "disk"), *OFFLOAD, "--offload-dir",
                       str(tmp_path / "off")], tmp_path)
    assert in_memory - base > 0.8 * size, (in_memory - base, size)  # the control: the bound can fail
    assert offloaded - base < 0.5 * size, (offloaded - base, size, in_memory - base)


# ------------------------------------------------------------------------------ a map split cpu / disk


def test_cpu_disk_split_captures_the_same_residual_stream(ckpts, tmp_path):
    from headlens.arch import SPECS
    from headlens.residual.capture import record_sites

    directory = ckpts.path("qwen3", "gqa", "hf_dir")
    plain = ModelSource(weights=directory).model(directory)
    n = plain.config.num_hidden_layers
    assert n >= 2
    split = {"embed_tokens": "cpu", "rotary_emb": "cpu", "norm": "cpu",
             **{f"layers.{i}": ("cpu" if i % 2 == 0 else "disk") for i in range(n)}}
    placed = ModelSource(weights=directory, device_map=split, offload_dir=tmp_path / "off").model(directory)
    assert {v for v in placed.hf_device_map.values()} == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in placed.layers[1].parameters())  # really offloaded
    tok = ModelSource(weights=directory).tokenizer(directory)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    spec = SPECS["qwen3"]
    streams = []
    for model in (plain, placed):
        with torch.no_grad(), record_sites(model, spec, ("resid_pre", "resid_mid", "resid_post", "final")) as rec:
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        streams.append((rec.values, hidden))
    (a, ha), (b, hb) = streams
    for site in a:
        assert a[site].keys() == b[site].keys() and a[site], site
        for layer in a[site]:
            assert torch.equal(a[site][layer], b[site][layer]), (site, layer)
    for x, y in zip(ha, hb):
        assert torch.equal(x, y)
    for layer in range(n):  # and HuggingFace's own hidden states are what resid_pre captured
        assert torch.equal(b["resid_pre"][layer], hb[layer].cpu())


# ------------------------------------------------------------------------ module names in a map, either way


def test_a_map_names_modules_either_way_in_every_command(ckpts, tmp_path, capsys):
    """The base model (sphere, ov, router, diagram) names its blocks ``layers.0``, a causal LM (compress)
    ``model.layers.0``: a map written either way places the same modules in both, ``lm_head`` is dropped where the
    base model is loaded, and a tied ``lm_head`` left out follows the input embedding."""
    directory = ckpts.path("qwen3", "gqa", "hf_dir")
    n = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    short = {"embed_tokens": "cpu", "norm": "cpu", "lm_head": "cpu",
             **{f"layers.{i}": ("cpu" if i % 2 == 0 else "disk") for i in range(n)}}
    long = {(k if k == "lm_head" else f"model.{k}"): v for k, v in short.items()}
    for mapping in (short, long):
        src = ModelSource(weights=directory, device_map=mapping, offload_dir=tmp_path / "off")
        base, lm = src.model(directory), src.lm_model(directory)
        assert base.hf_device_map == {k: v for k, v in short.items() if k != "lm_head"}
        assert lm.hf_device_map == long
        assert any(p.device.type == "meta" for p in base.layers[1].parameters())  # really on disk
        assert any(p.device.type == "meta" for p in lm.model.layers[1].parameters())
    # the command line: sphere reads either file to the same numbers as without a map
    files = {}
    for name, mapping in (("short", short), ("long", long)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(mapping))
    argv = ["sphere", "--weights", str(directory), "--prompt", PROMPT, "--workers", "1"]
    _run(argv, tmp_path / "plain", [], capsys)
    for name, path in files.items():
        _run(argv, tmp_path / name, ["--device-map", str(path), "--offload-dir", str(tmp_path / "off")], capsys)
        assert numbers(tmp_path / name) == numbers(tmp_path / "plain"), name
    # compress on tiny-lm (tied embeddings): a map in the base model's names, without lm_head
    cpu_map = tmp_path / "cpu.json"
    cpu_map.write_text(json.dumps({"embed_tokens": "cpu", "norm": "cpu", **{f"layers.{i}": "cpu" for i in range(6)}}))
    texts = eval_texts(tmp_path)
    _run(["compress", "--model", "tiny-lm", "--k", "16", "--latent", "plain", "--eval", texts["eval"]],
         tmp_path / "compress", ["--device-map", str(cpu_map)], capsys)
