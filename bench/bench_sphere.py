"""`headlens sphere` against a straight port of the notebook's code path, on one checkpoint and prompt.

Prints, measured side by side in one run:
- end-to-end wall time of the notebook port (load, hooks, forward, torch.pca_lowrank per layer, one
  matplotlib figure per layer saved as PNG with bbox_inches="tight", read back, written as a GIF) and of
  `headlens sphere` (load, one forward with capture, PCA + alignment + clustering metrics, frames rendered
  in worker processes, GIF, HTML page, metrics PNG/JSON/CSV), and their ratio (target: >= 2x);
- the capture overhead of `record_sites` over a bare forward (median of repeated, interleaved runs;
  target: <= 5%).

    .venv/bin/python bench/bench_sphere.py [--weights DIR] [--repeats 7]

Each end-to-end run is a fresh Python process (imports included, as a user would run it). Default
checkpoint: the embedded all-MiniLM-L6-v2; default prompt: the notebook's (420 BERT tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    layer_list = model.encoder.layer if hasattr(model, "encoder") else model.layers
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


def capture_overhead(model_dir: Path, prompt: str, repeats: int) -> tuple[float, float]:
    import torch

    from headlens.capture import load_hf_model, record_sites
    from headlens.loading import open_model

    ck = open_model(weights=model_dir, auto_infer=True)
    model, tok = load_hf_model(model_dir, torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    bare, hooked = [], []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with record_sites(model, ck.spec, ("resid_pre",)):
                model(input_ids=ids)
            hooked.append(time.perf_counter() - t0)
    return statistics.median(bare), statistics.median(hooked)


def _timed_subprocess(which: str, model_dir: Path, prompt_file: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--run", which, "--weights", str(model_dir), "--prompt-file",
                    str(prompt_file), "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="HF model directory (default: embedded MiniLM)")
    p.add_argument("--prompt-file", type=Path, default=None, help="prompt text (default: the notebook's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--run", choices=("notebook", "headlens"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    from headlens.loading import embedded_model_dir
    from headlens.prompts import NOTEBOOK_PROMPT

    model_dir = args.weights or embedded_model_dir()
    prompt = args.prompt_file.read_text() if args.prompt_file else NOTEBOOK_PROMPT
    if args.run == "notebook":
        notebook_port(model_dir, prompt, args.out)
        return
    if args.run == "headlens":
        headlens_sphere(model_dir, prompt, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pf = Path(tmp) / "prompt.txt"
        pf.write_text(prompt)
        (Path(tmp) / "a").mkdir()
        t_nb = _timed_subprocess("notebook", model_dir, pf, Path(tmp) / "a")
        t_hl = _timed_subprocess("headlens", model_dir, pf, Path(tmp) / "b")
    bare, hooked = capture_overhead(model_dir, prompt, args.repeats)
    print(f"checkpoint: {model_dir}  cores: {os.cpu_count()}")
    print(f"notebook port end to end:   {t_nb:7.2f} s")
    print(f"headlens sphere end to end: {t_hl:7.2f} s   speed-up {t_nb / t_hl:.2f}x (target >= 2x)")
    print(f"bare forward (median of {args.repeats}): {bare * 1e3:7.1f} ms; with record_sites(resid_pre, all "
          f"layers): {hooked * 1e3:7.1f} ms; overhead {100 * (hooked / bare - 1):+.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
