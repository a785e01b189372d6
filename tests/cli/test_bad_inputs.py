"""Every command on a table of bad inputs, in-process: exit 2, exactly one stderr line
``headlens <cmd>: error: ...`` (naming what is wrong), no traceback, and no file left behind.

Placeholders in the argv templates: ``{qwen3}`` (a HuggingFace directory), ``{bare}`` (a bare safetensors file),
``{pt}`` (a bare .pt), ``{neox}`` (parallel residual), ``{moe}`` (a Qwen3-MoE directory), ``{pruned}`` (qwen3 with
layer 0 head 1 zeroed), ``{heads0}`` / ``{heads4}`` (config.json with 0 / "four" attention heads), ``{corrupt}``,
``{long}`` (a text longer than the tiny models' 128 positions), ``{dir}`` (an existing directory), ``{file}`` (an
existing file), ``{missing}`` (a path that does not exist). The working directory is a fresh temporary directory,
so default output directories land there and are checked too. An ``ENV:NAME=VALUE`` item sets an environment
variable for the case instead of being an argument. No case may raise a Python warning either (accelerate's
``UserWarning`` lines would come before headlens's own).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import PROMPT, build_model, save_checkpoint, tokenizer_for

from headlens.cli import main

LONG = " ".join(["octopus hearts beat"] * 100)  # > 128 tokens of the tiny tokenizer

CASES: list[tuple[str, list[str], str]] = [
    # ---- ov
    ("ov", ["--layer", "6"], "--layer 6"),
    ("ov", ["--head", "12"], "--head 12"),
    ("ov", ["--head", "-1"], "--head"),
    ("ov", ["--layer", "three"], "invalid integer"),
    ("ov", ["--latent-dim", "0"], "--latent-dim"),
    ("ov", ["--layer", "1", "--latent-dim", "33"], "--latent-dim 33"),
    ("ov", ["--heatmap"], "--heatmap"),
    ("ov", ["--prompt", " "], "empty"),
    ("ov", ["--prompt", "hi", "--traces", "x"], "--traces"),
    ("ov", ["--weights", "{missing}"], "no such file"),
    ("ov", ["--weights", "{corrupt}", "--num-heads", "4"], "corrupt"),
    ("ov", ["--weights", "{bare}"], "--num-heads"),
    ("ov", ["--weights", "{bare}", "--num-heads", "4", "--prompt", PROMPT], "HuggingFace"),
    ("ov", ["--weights", "{bare}", "--num-heads", "4", "--num-kv-heads", "3"], "--num-kv-heads 3"),
    ("ov", ["--num-heads", "0"], "--num-heads"),
    ("ov", ["--plot", "--out-dir", "{file}/sub"], "is a file"),
    ("ov", ["--json", "{dir}"], "directory"),
    ("ov", ["--plot-path", "{dir}"], "directory"),
    ("ov", ["--probe-tokens", "100000000000"], "--probe-tokens 100000000000 is above"),
    ("ov", ["--probe-tokens", "0"], "--probe-tokens"),
    ("ov", ["--seed", "100000000000000000000000"], "--seed"),
    ("ov", ["--revision", "main"], "--revision applies to --hf-repo only"),
    ("ov", ["--weights", "{qwen3}", "--revision", "main"], "--revision applies to --hf-repo only"),
    ("ov", ["--cache-dir", "{dir}"], "--cache-dir applies to --hf-repo only"),
    ("ov", ["--weights", "{qwen3}", "--hf-repo", "a/b"], "not both"),
    ("ov", ["--weights", "{pruned}", "--auto-infer", "--head", "1"], "numerically zero"),
    ("ov", ["--weights", "{heads0}", "--auto-infer"], "num_attention_heads is 0"),
    ("ov", ["--weights", "{heads4}", "--auto-infer"], 'num_attention_heads is "four"'),
    # ---- sphere
    ("sphere", ["--weights", "{pt}", "--num-heads", "4"], "HuggingFace"),
    ("sphere", ["--prompt", "hi", "--frame-seconds", "0"], "--frame-seconds"),
    ("sphere", ["--prompt", "hi", "--frame-seconds", "1e12"], "--frame-seconds"),
    ("sphere", ["--prompt", "hi", "--layers", "1,6"], "layer 6 is out of range"),
    ("sphere", ["--prompt", "hi", "--layers", "4:2"], "selects no layer"),
    ("sphere", ["--prompt", "hi", "--layers", "9:12"], "out of range"),
    ("sphere", ["--prompt", "hi", "--layers", "one,two"], "use a slice"),
    ("sphere", ["--prompt", "hi", "--layers", ""], "--layers '' is empty"),
    ("sphere", ["--prompt", "hi", "--layers", "1,,0"], "empty item"),
    ("sphere", ["--prompt", "hi", "--layers", "1,1"], "given twice"),
    ("sphere", ["--prompt-file", "{missing}"], "--prompt-file"),
    ("sphere", ["--weights", "{qwen3}", "--prompt", LONG], "--truncate"),
    ("sphere", ["--weights", "{neox}", "--prompt", PROMPT, "--site", "resid_mid"], "resid_mid"),
    ("sphere", ["--weights", "{heads4}", "--prompt", "hi"], 'num_attention_heads is "four"'),
    ("sphere", ["--prompt", "hi", "--json", "{dir}"], "directory"),
    # ---- diagram
    ("diagram", ["--layer", "7"], "--layer 7"),
    ("diagram", ["--weights", "{bare}", "--num-heads", "4"], "HuggingFace"),
    ("diagram", ["--weights", "{heads0}"], "num_attention_heads is 0"),
    # ---- sweep
    ("sweep", ["--target-error", "0.1", "--target-energy", "0.9"], "not allowed with"),
    ("sweep", ["--target-error", "1.5"], "--target-error"),
    ("sweep", ["--target-error", "nan"], "--target-error"),
    ("sweep", ["--target-energy", "0"], "--target-energy"),
    ("sweep", ["--calib", "{missing}"], "--calib"),
    ("sweep", ["--layers-per-task", "2"], "--layers-per-task applies to --executor ray only"),
    ("sweep", ["--workers", "2"], "--workers applies to --executor ray only"),
    ("sweep", ["--ray-address", "auto"], "--ray-address applies to --executor ray only"),
    ("sweep", ["--executor", "dask"], "invalid choice"),
    ("sweep", ["--executor", "ray", "--layers-per-task", "0"], "--layers-per-task must be a positive integer"),
    # ---- trajectory
    ("trajectory", [], "give the checkpoints"),
    ("trajectory", ["--weights", "{missing}"], "no such file"),
    ("trajectory", ["--hf-repo", "a/b"], "--hf-repo needs --revisions"),
    ("trajectory", ["--weights", "{qwen3}", "--revisions", "step1"], "--revisions and --cache-dir apply to --hf-repo"),
    ("trajectory", ["--weights", "{qwen3}", "--hf-repo", "a/b", "--revisions", "s1"], "not both"),
    ("trajectory", ["--weights", "{qwen3}", "{moe}", "--steps", "1"], "--steps gives 1 steps for 2 checkpoints"),
    ("trajectory", ["--weights", "{qwen3}", "{moe}", "--steps", "5,5"], "both have step 5"),
    ("trajectory", ["--weights", "{qwen3}", "--steps", "x"], "--steps"),
    ("trajectory", ["--weights", "{qwen3}", "--layers-per-task", "1"], "--layers-per-task applies to --executor ray"),
    ("trajectory", ["--weights", "{corrupt}"], "corrupt.safetensors"),
    ("trajectory", ["--weights", "{qwen3}", "--target-error", "2"], "--target-error"),
    ("trajectory", ["--weights", "{qwen3}", "--device-map", "auto"], "do not apply to trajectory"),
    ("sweep", ["--weights", "{qwen3}", "--k", "8,32"], "--k 32 is above head_dim 16"),
    ("sweep", ["--k", "8,x"], "--k '8,x'"),
    ("sweep", ["--k", "0"], "--k '0'"),
    ("sweep", ["--k", "8,,4"], "empty item"),
    ("sweep", ["--k", "8,8"], "8 is given twice"),
    ("sweep", ["--layers", "2:9"], "stop 9 is out of range"),
    ("sweep", ["--layers", ""], "--layers '' is empty"),
    ("sweep", ["--layers", "1,,0"], "empty item"),
    ("sweep", ["--kv-bytes", "0"], "--kv-bytes"),
    ("sweep", ["--kv-bytes", "1000"], "--kv-bytes"),
    ("sweep", ["--max-calib-tokens", "2"], "--max-calib-tokens"),
    ("sweep", ["--weights", "{qwen3}", "--calib", "{long}"], "has 1200 tokens but the model takes at most 128"),
    ("sweep", ["--weights", "{qwen3}", "--revision", "main"], "--revision applies to --hf-repo only"),
    ("sweep", ["--weights", "{heads4}"], 'num_attention_heads is "four"'),
    ("sweep", ["--json", "{dir}"], "directory"),
    # ---- router
    ("router", ["--weights", "{moe}", "--prompt", "hi", "--batch-size", "0"], "--batch-size"),
    ("router", ["--weights", "{moe}", "--prompt", "hi", "--color-layer", "5"], "--color-layer 5"),
    ("router", ["--weights", "{qwen3}", "--prompt", "hi"], "no MoE layers"),
    ("router", ["--model", "minilm", "--prompt", "hi"], "no MoE layers"),
    ("router", ["--model", "tiny-lm", "--prompt", "hi"], "no MoE layers in tiny-lm"),
    ("router", ["--model", "tiny-lm", "--weights", "{moe}"], "give either --model tiny-lm or --weights, not both"),
    ("sweep", ["--model", "tiny-moe", "--hf-repo", "a/b"], "give either --model tiny-moe or --hf-repo, not both"),
    ("ov", ["--model", "gpt2"], "--model: invalid choice: 'gpt2'"),
    ("sphere", ["--model", "tiny-lm", "--revision", "main"], "the embedded model tiny-lm is read from disk"),
    ("router", ["--weights", "{moe}", "--prompt", LONG], "--truncate"),
    ("router", ["--weights", "{moe}", "--prompt", " "], "empty"),
    ("router", ["--weights", "{moe}", "--revision", "main"], "--revision applies to --hf-repo only"),
    ("router", ["--weights", "{heads4}", "--prompt", "hi"], 'num_attention_heads is "four"'),
    ("router", ["--weights", "{bare}"], "HuggingFace model directory"),
    # ---- compress (default --model tiny-lm: hidden 256, 6 layers, 2 kv heads, head_dim 64)
    ("compress", ["--eval", "{missing}"], "--eval"),
    ("compress", ["--eval", "{empty}"], "is empty"),
    ("compress", ["--eval", "{short}", "--latent", "plain"], "every eval text needs at least 4"),
    ("compress", ["--calib", "{empty}"], "--calib"),
    ("compress", ["--calib", "{evalfile}", "--eval", "{evalfile}"], "--calib and --eval share 1 text(s)"),
    ("compress", ["--target-error", "0"], "--target-error 0: a target lies strictly between 0 and 1"),
    ("compress", ["--target-error", "0.1,1"], "--target-error 1: a target lies strictly between 0 and 1"),
    ("compress", ["--target-energy", "1.5"], "--target-energy 1.5"),
    ("compress", ["--target-error", "nan"], "--target-error nan"),
    ("compress", ["--target-error", "x"], "give numbers between 0 and 1"),
    ("compress", ["--target-error", "0.1", "--k", "8"], "not allowed with"),
    ("compress", ["--k", "65", "--latent", "plain"], "--k 65 is above head_dim 64"),
    ("compress", ["--weights", "{qwen3}", "--eval", "{evalfile}", "--k", "17", "--latent", "plain"],
     "--k 17 is above head_dim 16"),
    ("compress", ["--k", "8,x"], "--k '8,x'"),
    ("compress", ["--budget", "{budget_other}"], "belongs to another model"),
    ("compress", ["--budget", "{budget_layers}"], "has layer 6, but the model has 6 layers"),
    ("compress", ["--budget", "{budget_groups}"], "lists kv groups [0]"),
    ("compress", ["--budget", "{budget_nodigest}"], "does not say which model it belongs to"),
    ("compress", ["--budget", "{budget_plain}"], "has no k_data"),
    ("compress", ["--budget", "{file}"], "expected the sweep_budget.csv"),
    ("compress", ["--latent", "plain", "--budget", "{budget_binary}"], "is not a sweep budget: not UTF-8 text"),
    ("compress", ["--latent", "plain", "--budget", "{budget_dup}"],
     "lists layer 2 kv group 1 twice (lines 7 and 14): one row per (layer, kv group)"),
    ("compress", ["--eval", "{binary}"], "--eval {binary} is not UTF-8 text"),
    ("sweep", ["--calib", "{binary}"], "--calib {binary} is not UTF-8 text"),
    ("router", ["--prompt-file", "{binary}"], "--prompt-file {binary} is not UTF-8 text"),
    ("sphere", ["--prompt-file", "{nul}"], "--prompt-file {nul} is not a text file: it holds NUL bytes"),
    ("compress", ["--weights", "{qwen3}"], "--eval is required"),
    ("compress", ["--weights", "{qwen3}", "--eval", "{evalfile}"], "data-aware latents need --calib"),
    ("compress", ["--weights", "{qwen3}", "--eval", "{long}", "--k", "8", "--latent", "plain"],
     "has 1200 tokens but the model takes at most 128"),
    ("compress", ["--save-model", "{dir}/new"], "--save-model writes one configuration, this run has 6"),
    ("compress", ["--save-model", "{file}", "--k", "8", "--latent", "plain"], "already exists"),
    ("compress", ["--save-model", "{file}/model", "--k", "8", "--latent", "plain"],
     "--save-model {file}/model: cannot create output directory"),
    ("compress", ["--save-model", "{dir}/m", "--out-dir", "{dir}/m/report", "--k", "8", "--latent", "plain"],
     "would also hold the command's other files"),
    ("compress", ["--save-model", "{dir}/m", "--out-dir", "{dir}/m", "--k", "8", "--latent", "plain"],
     "give it a directory of its own"),
    ("compress", ["--latent", "fancy"], "invalid choice"),
    ("compress", ["--k", "8", "--key-k", "8"], "--key-k sizes key latents: choose --keys plain or data-aware too"),
    ("compress", ["--k", "8", "--keys", "plain", "--key-k", "65"], "--key-k 65 is above head_dim 64"),
    ("compress", ["--k", "8,16,24", "--keys", "plain", "--key-k", "8,8"], "--key-k gives 2 sizes for 3 budget values"),
    ("compress", ["--keys", "fancy"], "invalid choice"),
    ("compress", ["--saving", "1.5"], "--saving 1.5: a target lies strictly between 0 and 1"),
    ("compress", ["--saving", "0.7"], "values alone save at most 50%: add --keys"),
    ("compress", ["--kv-budget", "0"], "--kv-budget 0: KV bytes per token are positive"),
    ("compress", ["--k", "8", "--allocate", "greedy"], "--allocate greedy spends a budget of bytes"),
    ("compress", ["--saving", "0.5", "--k", "8"], "not allowed with"),
    ("compress", ["--allocate", "best"], "invalid choice"),
    ("compress", ["--weights", "{qwen3}", "--eval", "{evalfile}", "--saving", "0.6", "--keys", "plain", "--latent",
                  "plain"], "the greedy allocation needs --calib (calibration texts), or pass --allocate uniform"),
    ("compress", ["--saving", "0.99", "--keys", "plain"], "fewer than one for each of the 12 key latents"),
    ("compress", ["--kv-bytes", "0"], "--kv-bytes 0"),
    ("compress", ["--layers", "6"], "out of range"),
    ("compress", ["--weights", "{bare}", "--num-heads", "4", "--eval", "{evalfile}", "--latent", "plain"],
     "HuggingFace model directory"),
    ("compress", ["--generate", "0"], "--generate 0: generate at least 1 token"),
    ("compress", ["--model", "minilm", "--k", "8", "--latent", "plain", "--generate", "4"],
     "--generate 4: all-MiniLM-L6-v2 is an encoder (BERT): it keeps no KV cache"),
    # ---- generate ({cm}: compress --save-model of tiny-lm at k = 16; {cm_*}: that directory broken one way each)
    ("generate", ["--compressed", "{missing}"], "--compressed {missing}: no such directory"),
    ("generate", ["--compressed", "{dir}"], "--compressed {dir} has no headlens_latent.json: it is not a directory"),
    ("generate", ["--compressed", "{qwen3}"], "has no headlens_latent.json"),
    ("generate", ["--compressed", "{cm_badplan}"], "headlens_latent.json is not a latent plan"),
    ("generate", ["--compressed", "{cm_nofactors}"], "--compressed {cm_nofactors} lacks latent_factors.safetensors"),
    ("generate", ["--compressed", "{cm_noweights}"], "lacks the model weights (*.safetensors)"),
    ("generate", ["--compressed", "{cm_corrupt}"], "is not a readable latent factors file"),
    ("generate", ["--compressed", "{cm_other}"], "but the plan gives k = 4 and the model hidden size 256"),
    ("generate", ["--compressed", "{cm_encoder}"], "encode has shape"),
    ("generate", ["--compressed", "{cm_minilm}"], "--compressed {cm_minilm} is an encoder (BERT): it keeps no KV cache"),
    ("generate", ["--compressed", "{cm}", "--k", "8"], "--compressed carries its own latents: leave out --k"),
    ("generate", ["--compressed", "{cm}", "--latent", "plain", "--layers", "0"],
     "leave out --latent, --layers"),
    ("generate", ["--compressed", "{cm}", "--weights", "{qwen3}", "--prompt", "hi"],
     "is not the model --compressed {cm} was made from"),
    ("generate", ["--compressed", "{cm}", "--device-map", "auto"], "--device-map places the model the model flags name"),
    ("generate", ["--model", "minilm"], "all-MiniLM-L6-v2 is an encoder (BERT): it keeps no KV cache and generates no "
     "text"),
    ("generate", ["--weights", "{bert}", "--prompt", "hi"], "is an encoder (BERT)"),
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens 0: generate at least 1 token"),
    ("generate", ["--max-new-tokens", "-2"], "--max-new-tokens -2: generate at least 1 token"),
    ("generate", ["--max-new-tokens", "x"], "invalid integer"),
    ("generate", ["--k", "65"], "--k 65 is above head_dim 64"),
    ("generate", ["--k", "-1"], "--k -1: a latent size is a whole number"),
    ("generate", ["--weights", "{qwen3}"], "--prompt is required"),
    ("generate", ["--weights", "{qwen3}", "--prompt", LONG], "but the model takes at most 128"),
    ("generate", ["--weights", "{qwen3}", "--prompt", "hi", "--max-new-tokens", "200"],
     "with --max-new-tokens 200 that is"),
    ("generate", ["--weights", "{qwen3}", "--prompt", "hi", "--latent", "data-aware"],
     "data-aware latents need --calib"),
    ("generate", ["--prompt", " "], "--prompt is empty"),
    ("generate", ["--prompt-file", "{empty}"], "is empty"),
    ("generate", ["--prompt", "hi", "--prompt-file", "{evalfile}"], "not allowed with"),
    ("generate", ["--json", "{dir}"], "directory"),
    # ---- device and placement (every model-running command shares the flags; headlens.io.placement)
    ("ov", ["--device", "gpu"], "--device 'gpu' is not a device: choose auto, cpu, cuda, cuda:N, mps"),
    ("sphere", ["--device", "cuda:7"], "cuda:7"),
    ("router", ["--device", "mps"], "mps"),
    ("ov", ["--max-memory", "cpu=1GB"], "--max-memory applies with --device-map"),
    ("sphere", ["--offload-dir", "{dir}"], "--offload-dir applies with --device-map"),
    ("ov", ["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots' is not a size"),
    ("ov", ["--device-map", "auto", "--max-memory", "cpu"], "is not DEVICE=SIZE"),
    ("ov", ["--device-map", "auto", "--max-memory", "ram=1GB"], "'ram' is not a device"),
    ("ov", ["--device-map", "auto", "--max-memory", "9=1GB"], "GPU 9 does not exist"),
    ("sweep", ["--device-map", "auto", "--max-memory", "cpu=1GB,cpu=2GB"], "cpu is given twice"),
    ("sphere", ["--device-map", "fastest"], "choose auto, balanced, sequential or a JSON file"),
    ("sphere", ["--device-map", "{map_list}"], "expected a JSON object"),
    ("sphere", ["--device-map", "{map_cuda}"], "CUDA is not available"),
    ("sphere", ["--weights", "{qwen3}", "--prompt", PROMPT, "--device-map", "{map_partial}"], "places no device for"),
    ("diagram", ["--device", "cpu", "--device-map", "auto"], "not both"),
    ("compress", ["--device-map", "auto", "--offload-dir", "{file}/off"], "is a file"),
    ("compress", ["--device-map", "auto", "--max-memory", "cpu=1MB"], "compress replaces weights in place"),
    ("ov", ["ENV:HEADLENS_DEVICE=tpu"],
     "the environment variable HEADLENS_DEVICE 'tpu' is not a device: choose auto, cpu, cuda, cuda:N, mps; pass "
     "--device or unset HEADLENS_DEVICE"),
    ("router", ["ENV:HEADLENS_DEVICE=cuda:3", "--prompt", "hi"], "the environment variable HEADLENS_DEVICE cuda:3"),
    ("router", ["--prompt", "hi", "--device-map", "{map_disk}"], "give --offload-dir DIR for them"),
    ("router", ["--prompt", "hi", "--device-map", "{map_unmatched}"],
     "--device-map {map_unmatched}: 2 key(s) match no module of tiny-moe (Qwen3MoeModel): 'foo', 'model.bar'; its "
     "modules are named like embed_tokens, layers.0, layers.5, norm"),
    ("compress", ["--k", "8", "--latent", "plain", "--device-map", "{map_unmatched}"],
     "match no module of tiny-lm (Qwen3ForCausalLM): 'foo', 'model.bar'; its modules are named like "
     "model.embed_tokens, model.layers.0, model.layers.5, model.norm, lm_head (with or without the leading model.)"),
    ("sphere", ["--prompt", "hi", "--model", "tiny-lm", "--device-map", "{map_some}"],
     "--device-map {map_some} places no device for 5 module(s) of tiny-lm: layers.1, layers.2, layers.3, layers.4, "
     "norm; give every module a device"),
    ("compress", ["--k", "8", "--latent", "plain", "--device-map", "{map_some}"],
     "--device-map {map_some} places no device for 5 module(s) of tiny-lm: model.layers.1, model.layers.2, "
     "model.layers.3, model.layers.4, model.norm; give every module a device"),
    ("diagram", ["--model", "tiny-lm", "--device-map", "{map_twice}"], "places layers.1 twice, on cpu and disk"),
    ("sweep", ["--model", "tiny-lm", "--device-map", "{map_cpu}"], "--device-map places the modules of a loaded "
     "model, but a weight-only sweep loads none"),
    ("sweep", ["--model", "tiny-lm", "--device-map", "auto"], "a weight-only sweep loads none"),
    ("ov", ["--model", "tiny-lm", "--device-map", "{map_cpu}"], "without --prompt the head is analysed from its "
     "weights alone"),
    ("sphere", ["--traces", "{missing}", "--device-map", "{map_cpu}"], "--traces reads a trace file and loads none"),
    # ---- toy
    ("toy", [], "choose"),
    ("toy", ["create", "--out", "toy.txt"], ".safetensors"),
    ("toy", ["create", "--out", "toy.safetensors", "--plant", "geometric", "--plant-decay", "-1"], "--plant-decay"),
    ("toy", ["create", "--out", "toy.safetensors", "--plant", "geometric", "--plant-decay", "nan"], "--plant-decay"),
    ("toy", ["create", "--out", "toy.safetensors", "--plant-decay", "-1"], "--plant-decay shape a planted spectrum"),
    ("toy", ["run", "--plant-rank", "3"], "--plant-rank shape a planted spectrum: add --plant"),
    ("toy", ["trace", "--weights", "{missing}", "--out", "t"], "no such file"),
    ("toy", ["cluster", "--tokens", "2"], "--tokens"),
    ("toy", ["cluster", "--beta", "nan"], "--beta"),
    ("toy", ["run", "--latent-dim", "99"], "--latent-dim"),
]

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpts) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-inputs")
    paths = {"qwen3": ckpts.path("qwen3", "gqa", "hf_dir"), "bare": ckpts.path("qwen3", "gqa", "safetensors"),
             "pt": ckpts.path("llama", "gqa", "pt"), "neox": ckpts.path("gpt_neox", "mha", "hf_dir"),
             "moe": ckpts.path("qwen3_moe", "gqa", "hf_dir"), "bert": ckpts.path("bert", "mha", "hf_dir"),
             "gptj": ckpts.path("gptj", "mha", "hf_dir")}
    model = build_model("qwen3", "gqa")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0
    paths["pruned"] = save_checkpoint(model, tokenizer_for("qwen3"), root / "pruned", "hf_dir")
    for name, value in (("heads0", 0), ("heads4", "four")):
        d = root / name
        shutil.copytree(paths["qwen3"], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_attention_heads"] = value
        (d / "config.json").write_text(json.dumps(cfg))
        paths[name] = d
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    paths["corrupt"] = corrupt
    (root / "long.txt").write_text(" ".join(["octopus hearts beat"] * 100) + "\nshort\n")
    paths["long"] = root / "long.txt"
    (root / "a-dir").mkdir()
    paths["dir"] = root / "a-dir"
    (root / "a-file").write_text("x")
    paths["file"] = root / "a-file"
    paths["missing"] = root / "missing.safetensors"
    five = [f"layers.{i}" for i in range(5)]
    for name, mapping in (("map_list", [1]), ("map_cuda", {"": "cuda:0"}),
                          ("map_partial", {"embed_tokens": "cpu", "layers.0": "disk"}), ("map_disk", {"": "disk"}),
                          ("map_unmatched", {"": "cpu", "foo": "cpu", "model.bar": "disk"}),
                          ("map_some", {"embed_tokens": "cpu", "model.layers.0": "cpu", "layers.5": "disk"}),
                          ("map_twice", {"": "cpu", "layers.1": "cpu", "model.layers.1": "disk"}),
                          ("map_cpu", {k: "cpu" for k in ("embed_tokens", "norm", *five, "layers.5")})):
        (root / f"{name}.json").write_text(json.dumps(mapping))
        paths[name] = root / f"{name}.json"
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    paths["binary"] = root / "binary.txt"
    (root / "nul.txt").write_bytes(b"a prompt\x00with a NUL byte\n")
    paths["nul"] = root / "nul.txt"
    paths.update(_compress_inputs(root, paths["qwen3"]))
    paths.update(_generate_inputs(root, paths["qwen3"], paths["evalfile"]))
    return {k: str(v) for k, v in paths.items()}


def _generate_inputs(root: Path, qwen3, evalfile) -> dict[str, Path]:
    """compress --save-model of tiny-lm (k = 16, plain) and copies broken one way each: its plan not JSON, its factors
    or weights missing, its factors corrupt, another model's plan and factors (the tiny qwen3's, k = 4), an encoder
    that does not invert its up-projection; and one of MiniLM (an encoder)."""
    from safetensors.torch import load_file, save_file

    cm, q3 = root / "cm", root / "q3"
    for argv in (["--model", "tiny-lm", "--k", "16", "--save-model", str(cm)],
                 ["--weights", str(qwen3), "--k", "4", "--save-model", str(q3)],
                 ["--model", "minilm", "--k", "8", "--save-model", str(root / "cm_minilm")]):
        assert main(["compress", *argv, "--latent", "plain", "--eval", str(evalfile), "--out-dir",
                     str(root / f"{Path(argv[-1]).name}-report")]) == 0
    out = {"cm": cm, "cm_minilm": root / "cm_minilm"}

    def broken(name: str) -> Path:
        d = root / f"cm_{name}"
        shutil.copytree(cm, d)
        out[f"cm_{name}"] = d
        return d

    (broken("badplan") / "headlens_latent.json").write_text("{not json")
    (broken("nofactors") / "latent_factors.safetensors").unlink()
    (broken("noweights") / "model.safetensors").unlink()
    (broken("corrupt") / "latent_factors.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    other = broken("other")
    for name in ("headlens_latent.json", "latent_factors.safetensors"):
        shutil.copy(q3 / name, other / name)
    d = broken("encoder")
    sd = load_file(str(d / "latent_factors.safetensors"))
    sd["layer0.group0.encode"] = sd["layer0.group0.encode"][:, :8].contiguous()
    save_file(sd, str(d / "latent_factors.safetensors"))
    return out


def _compress_inputs(root: Path, qwen3: str) -> dict[str, Path]:
    """Eval texts, and sweep budgets for tiny-lm that are wrong in one way each (made by `headlens sweep`)."""
    from headlens.circuits.sweep_parts import weights_digest
    from headlens.io.source import ModelSource
    from headlens.io.tables import read_table, write_csv

    out = {}
    for name, text in (("empty", ""), ("short", "a\n"), ("evalfile", "one two three four five six seven\n")):
        (root / f"{name}.txt").write_text(text)
        out[name] = root / f"{name}.txt"
    assert main(["sweep", "--weights", str(qwen3), "--no-qk", "--out-dir", str(root / "sw-other")]) == 0
    out["budget_other"] = root / "sw-other" / "sweep_budget.csv"
    digest = weights_digest(ModelSource(embedded="tiny-lm").checkpoint())
    rows = [{"layer": layer, "kv_head": g, "k_plain": 8, "k_data": 8, "model_weights": digest}
            for layer in range(6) for g in range(2)]
    variants = {"budget_layers": rows + [{**rows[0], "layer": 6}],
                "budget_groups": [r for r in rows if r["kv_head"] == 0],
                "budget_nodigest": [{k: v for k, v in r.items() if k != "model_weights"} for r in rows],
                "budget_plain": [{**r, "k_data": None} for r in rows],
                "budget_dup": rows + [{**rows[5], "k_plain": 4}]}  # layer 2 kv group 1 again, on line 14
    for name, table in variants.items():
        out[name] = write_csv(root / f"{name}.csv", table)
    assert len(read_table(out["budget_layers"])) == 13
    out["budget_binary"] = root / "budget_binary.csv"
    out["budget_binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00\x01")
    return out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("cmd,argv,needle", CASES, ids=[f"{c}:{' '.join(a)[:60]}" for c, a, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(inputs, capsys, tmp_path, monkeypatch, cmd, argv, needle):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for item in argv:
        if item.startswith("ENV:"):
            name, _, value = item[4:].partition("=")
            monkeypatch.setenv(name, value)
    args = [a.format(**inputs) if "{" in a else a for a in argv if not a.startswith("ENV:")]
    needle = needle.format(**inputs) if "{" in needle else needle
    if cmd in ("ov", "sphere", "diagram", "sweep", "router", "compress", "generate") and "--out-dir" not in args:
        args += ["--out-dir", str(work / "out")]
    before = _files(Path(inputs["qwen3"]).parent.parent)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([cmd, *args])
    out, err = capsys.readouterr()
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.match(rf"headlens {cmd}( \w+)?: error: ", lines[0]), lines[0]
    assert needle.format(**inputs) in lines[0], lines[0]
    assert _files(work) == set(), _files(work)  # no output directory, no file, no temporary, no lock
    assert _files(Path(inputs["qwen3"]).parent.parent) == before  # nothing written next to the inputs
