"""Peak memory of a long-prompt heatmap run: one layer's attention probabilities, not every layer's (issue 13).

Builds a Qwen3-shaped checkpoint with random weights in a temporary directory (the tokenizer of the embedded
tiny-lm), makes a prompt of ``--tokens`` tokens from the embedded texts, and runs, each in a fresh process whose
own peak RSS is read back with ``os.wait4``:

- ``headlens ov --heatmap --json`` on it (the probabilities captured, the heatmap drawn and written), and with
  ``--old-cli`` the same command with capture.py as it was before issue 13 (read from git);
- the forward passes alone, in a small inline script that loads the model the same way (``load_hf_model``),
  resets the peak-RSS mark after loading (``/proc/self/clear_refs``) and reports the forward's own peak:
  ``baseline`` (the model's forward, no probabilities), ``capture_layer`` (the one-layer eager route, what the
  command runs) and ``old`` (the whole model eager with ``output_attentions=True``, what capture_layer did before).

Then prints the peaks side by side with the theory: L x H x N x N x 4 bytes (every layer's probabilities, float32)
against H x N x N x 4 (one layer's).

    .venv/bin/python bench/bench_heatmap_memory.py [--layers 12] [--hidden 512] [--heads 16] [--tokens 2048]
        [--old-cli] [--skip-cli]

About four minutes on 2 cores (six with --old-cli); the old forward's peak is about 4 GiB at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = ROOT / "src" / "headlens" / "models" / "tiny-lm"
TEXTS = ROOT / "src" / "headlens" / "models" / "texts"
VENV_BIN = Path(sys.executable).parent

# capture.py before issue 13 (the whole model eager, output_attentions=True), for --old-cli.
BEFORE = "3065a1a^"
# ``headlens ov`` with that capture.py in place of the current one.
OLD_CLI = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("headlens.residual.capture", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["headlens.residual.capture"] = module
spec.loader.exec_module(module)
from headlens.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Run in a fresh interpreter: load the model, reset the peak-RSS mark, run one forward, print what it cost.
CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from headlens.arch import SPECS
from headlens.io.source import load_hf_model
from headlens.residual.capture import capture_layer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

mode, directory, prompt_file, layer, head = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
prompt = open(prompt_file).read()
model, tok = load_hf_model(Path(directory), torch.float32)
spec = SPECS["qwen3"]
ids = tok(prompt, return_tensors="pt")["input_ids"]
loaded = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS mark back to the current RSS: the forward's own peak from here on
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
with torch.no_grad():
    if mode == "baseline":
        model(input_ids=ids)
        probs = None
    elif mode == "capture_layer":
        probs = capture_layer(model, tok, spec, layer, prompt, want_probs=True).attn_probs[head]
    else:  # the old capture: the whole model eager, transformers collects every layer's attentions
        model.set_attn_implementation("eager")
        probs = model(input_ids=ids, output_attentions=True).attentions[layer][0, head].clone()
wall = time.perf_counter() - t0
print(json.dumps({"loaded": loaded, "forward_peak": status("VmHWM"), "reset": reset, "wall": wall,
                  "tokens": int(ids.shape[1]), "row_sum": None if probs is None else float(probs[-1].sum())}))
"""


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, str]:
    """Run ``cmd``; (its own peak RSS in bytes, wall seconds, stdout)."""
    t0 = time.perf_counter()
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEADLENS_DEVICE": "cpu", "TQDM_DISABLE": "1"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        sys.exit(f"{log.stem} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss * 1024, wall, text  # Linux: ru_maxrss in KiB


def build_checkpoint(directory: Path, args) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen3Config(vocab_size=8192, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                                   max_position_embeddings=max(4096, 2 * args.tokens), tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(str(TINY_LM))
    tok.model_max_length = cfg.max_position_embeddings  # tiny-lm's says 1024
    tok.save_pretrained(directory)


def make_prompt(n: int) -> str:
    """A prompt of exactly ``n`` tokens (the embedded texts, repeated as needed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY_LM))
    text = "\n".join(p.read_text() for p in sorted(TEXTS.glob("*.txt")))
    ids = tok(text)["input_ids"]
    while len(ids) < n + 64:
        ids = ids + ids
    k = n
    for _ in range(32):  # decoding and re-encoding may merge or split a token at the cut: adjust the cut
        prompt = tok.decode(ids[:k])
        got = len(tok(prompt)["input_ids"])
        if got == n:
            return prompt
        k += n - got
    sys.exit(f"could not cut a prompt of exactly {n} tokens")


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layer", type=int, default=None, help="layer of the heatmap (default: the middle one)")
    p.add_argument("--head", type=int, default=3)
    p.add_argument("--skip-cli", action="store_true", help="only the forward passes, not headlens ov")
    p.add_argument("--old-cli", action="store_true",
                   help=f"also run headlens ov with capture.py as it was before issue 13 (git {BEFORE})")
    p.add_argument("--keep", metavar="DIR", help="keep the checkpoint and outputs in DIR")
    args = p.parse_args()
    layer = args.layers // 2 if args.layer is None else args.layer
    L, H, N = args.layers, args.heads, args.tokens

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_heatmap_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = work / "qwen3"
        t0 = time.perf_counter()
        build_checkpoint(ckpt, args)
        prompt = make_prompt(N)
        prompt_file = work / "prompt.txt"
        prompt_file.write_text(prompt)
        print(f"checkpoint: Qwen3-shaped, {L} layers, hidden {args.hidden}, {H} heads ({args.kv_heads} kv) of "
              f"{args.head_dim}, random weights, float32 ({time.perf_counter() - t0:.1f} s to build); prompt "
              f"{N} tokens; heatmap of layer {layer} head {args.head}; {os.cpu_count()} cores",
              flush=True)

        rows = []
        for mode in ("baseline", "capture_layer", "old"):
            peak, wall, out = run_measured([sys.executable, "-c", CHILD, mode, str(ckpt), str(prompt_file),
                                            str(layer), str(args.head)], work / f"{mode}.log")
            info = json.loads(out.strip().splitlines()[-1])
            assert info["tokens"] == N, info
            rows.append((mode, peak, info))
            print(f"  {mode}: peak {mib(peak)} MiB, forward {info['wall']:.1f} s", flush=True)

        clis = []
        if not args.skip_cli:
            variants = [("`headlens ov --heatmap --json`", [str(VENV_BIN / "headlens")])]
            if args.old_cli:
                before = work / "capture_before.py"
                before.write_text(subprocess.run(["git", "show", f"{BEFORE}:src/headlens/residual/capture.py"],
                                                 cwd=ROOT, check=True, capture_output=True, text=True).stdout)
                variants.append((f"the same with capture.py before issue 13 ({BEFORE})",
                                 [sys.executable, "-c", OLD_CLI, str(before)]))
            for i, (name, head_cmd) in enumerate(variants):
                out_dir = work / f"out{i}"
                json_path = out_dir / "ov.json"
                cmd = head_cmd + ["ov", "--weights", str(ckpt), "--layer", str(layer), "--head", str(args.head),
                                  "--prompt", prompt, "--heatmap", "--json", str(json_path), "--out-dir", str(out_dir),
                                  "--dtype", "float32", "--device", "cpu"]
                peak, wall, _ = run_measured(cmd, work / f"cli{i}.log")
                result = json.loads(json_path.read_text())
                attention = result.get("attention")
                assert attention is not None and len(attention) == N, "the JSON holds no N x N attention"
                png = Path(result["files"]["heatmap"]).stat().st_size
                clis.append((name, peak, wall, png))
                print(f"  {name}: peak {mib(peak)} MiB, {wall:.1f} s", flush=True)

        one, every = H * N * N * 4, L * H * N * N * 4
        base = rows[0][2]["forward_peak"]
        print()
        print(f"theory (float32 probabilities): one layer H x N x N x 4 = {H} x {N} x {N} x 4 = {mib(one)} MiB; "
              f"every layer L x H x N x N x 4 = {L} x that = {mib(every)} MiB")
        print()
        print("| run | RSS after loading (MiB) | peak RSS (MiB) | peak - baseline's peak (MiB) "
              "| in units of H x N x N x 4 | forward / command (s) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for mode, peak, info in rows:
            extra = info["forward_peak"] - base
            print(f"| {mode} | {mib(info['loaded'])} | {mib(info['forward_peak'])} | {mib(extra)} | {extra / one:.2f} "
                  f"| {info['wall']:.1f} |")
        for name, peak, wall, png in clis:
            print(f"| {name} (the whole command: imports, load, capture, analysis, JSON, a {png / 2**20:.1f} MiB "
                  f"PNG) | | {mib(peak)} | | | {wall:.1f} |")
        if not rows[0][2]["reset"]:
            print("(no /proc/self/clear_refs here: each forward's peak includes the load's)")
        else:
            print("(the inline runs reset the peak-RSS mark after loading: their peak is the forward's)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
