"""`headlens sphere` against a straight port of the notebook's code path, on one checkpoint and prompt.

Prints, measured side by side in one run:
- end-to-end wall time of the notebook port (load, hooks, forward, torch.pca_lowrank per layer, one
  matplotlib figure per layer saved as PNG with bbox_inches="tight", read back, written as a GIF) and of
  `headlens sphere` (load, one forward with capture, PCA + alignment + clustering metrics, frames rendered
  in worker processes, GIF, HTML page, metrics PNG/JSON/CSV), and their ratio (target: >= 2x);
- the capture overhead of `record_sites` over a bare forward (best of repeated, interleaved runs; target: <= 5%),
  and the capture's one-time start (site tracing and the first forward's identity check).

    .venv/bin/python bench/bench_sphere.py [--weights DIR] [--repeats 15] [--qwen3-layers 36]

Each end-to-end run is a fresh Python process (imports included, as a user would run it). Two
checkpoints by default, both with the notebook's prompt:
- the embedded all-MiniLM-L6-v2 (real weights, 6 layers, 420 BERT tokens);
- a Qwen3-architecture model with the notebook's depth (36 layers like Qwen3-4B, random weights, small
  width so it fits the 2-core machine) and the real Qwen tokenizer from ../shared/data/qwen3-tokenizer,
  so the prompt is the notebook's 404 tokens. Skipped when that folder is absent.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def notebook_port(model_dir: Path, prompt: str, out: Path) -> float:
    """The notebook's cells, ported as they are (the hook corrected to the decoder layer's input)."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    layer_list = model.encoder.layer if hasattr(model, "encoder") else model.layers  # the notebook: .layers
    layers: dict[int, torch.Tensor] = {}

    def make_hook(layer_id):
        def hook(module, args, kwargs):
            layers[layer_id] = kwargs.get("hidden_states", args[0] if args else None)

        return hook

    handles = [blk.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, blk in enumerate(layer_list)]
    inputs = tokenizer(prompt, return_tensors="pt")
    model(inputs.input_ids, attention_mask=inputs["attention_mask"])
    for h in handles:
        h.remove()
    pcas = {}
    for layer_idx in layers:
        X = layers[layer_idx][0]
        X_centered = X - X.mean(dim=0, keepdim=True)
        U, S, V = torch.pca_lowrank(X_centered, q=3)
        projected = X_centered @ V[:, :3]
        pcas[layer_idx] = (projected / projected.norm(dim=1, keepdim=True)).T.detach()
    labels = [tokenizer.decode([int(t)]) for t in inputs.input_ids[0]]
    frames = []
    for layer_idx in range(len(layer_list)):
        x, y, z = (pcas[layer_idx][i].numpy() for i in range(3))
        fig = plt.figure(figsize=(6, 6))
        ax = fig.add_subplot(111, projection="3d")
        u = torch.linspace(0, 2 * torch.pi, 100)
        v = torch.linspace(0, torch.pi, 100)
        u, v = torch.meshgrid(u, v, indexing="ij")
        ax.plot_surface((torch.cos(u) * torch.sin(v)).numpy(), (torch.sin(u) * torch.sin(v)).numpy(),
                        torch.cos(v).numpy(), color="c", alpha=0.1, edgecolor="none")
        ax.scatter(x, y, z, color="b", s=50)
        for xi, yi, zi, label in zip(x, y, z, labels):
            ax.text(xi, yi, zi, label, fontsize=10, color="k")
        ax.set_box_aspect([1, 1, 1])
        fname = out / f"frame_{layer_idx}.png"
        plt.savefig(fname, dpi=100, bbox_inches="tight")
        frames.append(fname)
        plt.close(fig)
    images = [Image.open(f).convert("RGB") for f in frames]  # the notebook used imageio.imread / mimsave
    images[0].save(out / "tokens.gif", save_all=True, append_images=images[1:], duration=1000, loop=0)
    return time.perf_counter() - t0


def headlens_sphere(model_dir: Path, prompt: str, out: Path) -> float:
    from headlens.cli import main

    t0 = time.perf_counter()
    devnull = open(os.devnull, "w")
    stdout, sys.stdout = sys.stdout, devnull
    try:
        code = main(["sphere", "--weights", str(model_dir), "--prompt", prompt, "--out-dir", str(out)])
    finally:
        sys.stdout = stdout
        devnull.close()
    assert code == 0
    return time.perf_counter() - t0


def capture_overhead(model_dir: Path, prompt: str, repeats: int) -> tuple[float, float, float]:
    """(bare forward, a forward under capture, a capture's one-time start), best of ``repeats``, interleaved.

    A capture (``record_sites(resid_pre, every layer)``) starts with a short traced pass that finds the hook sites
    and a first forward that checks the residual identities: once a run. The forward under capture is the next
    forward in the same capture, the cost of the hooks themselves; the start is the entry plus that first forward,
    less a bare forward."""
    import torch

    from headlens.io.source import load_hf_model
    from headlens.residual.capture import record_sites
    from headlens.io.checkpoint import open_model

    ck = open_model(weights=model_dir, auto_infer=True)
    model, tok = load_hf_model(model_dir, torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    bare, hooked, start = [], [], []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with record_sites(model, ck.spec, ("resid_pre",)):
                model(input_ids=ids)  # the first forward: identities checked
                t1 = time.perf_counter()
                model(input_ids=ids)
                t2 = time.perf_counter()
            start.append(t1 - t0)
            hooked.append(t2 - t1)
    return min(bare), min(hooked), min(start) - min(bare)


def _timed_subprocess(which: str, model_dir: Path, prompt_file: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--run", which, "--weights", str(model_dir), "--prompt-file",
                    str(prompt_file), "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def build_qwen3_like(out: Path, layers: int, tokenizer_dir: Path) -> Path:
    """A Qwen3 model with the notebook's depth and the real Qwen tokenizer (random weights)."""
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, out / f.name)
    return out


def compare(label: str, model_dir: Path, prompt: str, tmp: Path) -> None:
    pf = tmp / "prompt.txt"
    pf.write_text(prompt)
    (tmp / "a").mkdir()
    t_nb = _timed_subprocess("notebook", model_dir, pf, tmp / "a")
    t_hl = _timed_subprocess("headlens", model_dir, pf, tmp / "b")
    print(f"[{label}] notebook port end to end: {t_nb:7.2f} s   headlens sphere: {t_hl:7.2f} s   "
          f"speed-up {t_nb / t_hl:.2f}x (target >= 2x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="HF model directory (default: embedded MiniLM)")
    p.add_argument("--prompt-file", type=Path, default=None, help="prompt text (default: the notebook's)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--qwen3-layers", type=int, default=36, help="depth of the Qwen3-like model (0: skip it)")
    p.add_argument("--run", choices=("notebook", "headlens"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    from headlens.io.checkpoint import embedded_model_dir
    from headlens.prompts import NOTEBOOK_PROMPT

    model_dir = args.weights or embedded_model_dir()
    prompt = args.prompt_file.read_text() if args.prompt_file else NOTEBOOK_PROMPT
    if args.run == "notebook":
        notebook_port(model_dir, prompt, args.out)
        return
    if args.run == "headlens":
        headlens_sphere(model_dir, prompt, args.out)
        return
    print(f"cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        compare(model_dir.name if args.weights else "all-MiniLM-L6-v2, 6 layers", model_dir, prompt, Path(tmp))
    tok_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen3-tokenizer"
    if args.qwen3_layers and not args.weights:
        if tok_dir.exists():
            with tempfile.TemporaryDirectory() as tmp:
                qdir = build_qwen3_like(Path(tmp) / "qwen3-like", args.qwen3_layers, tok_dir)
                (Path(tmp) / "run").mkdir()
                compare(f"Qwen3-like, {args.qwen3_layers} layers, 404 tokens", qdir, prompt, Path(tmp) / "run")
        else:
            print(f"[Qwen3-like] skipped: {tok_dir} is absent")
    bare, hooked, start = capture_overhead(model_dir, prompt, args.repeats)
    print(f"bare forward (best of {args.repeats}): {bare * 1e3:7.1f} ms; under record_sites(resid_pre, all "
          f"layers): {hooked * 1e3:7.1f} ms; overhead {100 * (hooked / bare - 1):+.1f}% (target <= 5%)")
    print(f"a capture's one-time start (the traced pass finding the sites, the first forward checking the residual "
          f"identities), once a run: +{start * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
