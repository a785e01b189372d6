"""A micro training trajectory in seconds: a tiny Qwen3ForCausalLM trained briefly, checkpointed along the way.

    python tools/train/micro_trajectory.py --out /tmp/micro-trajectory

writes ``<out>/checkpoint-<step>/`` for each of ``--steps`` (step 0 is the initialisation, before any update), each
an ordinary HuggingFace model directory (config.json, model.safetensors, the tokenizer) plus ``trainer_state.json``
as transformers' Trainer writes it (``global_step``, ``max_steps``, ``log_history`` with the training loss of every
step so far).  The writing is train.py's ``write_checkpoint``, the one ``train.py --save-every`` uses, so
``headlens trajectory`` reads both alike.  Tests build it in a temporary directory (``write_micro_trajectory``).

The model: hidden 64, 2 layers, 4 query heads, 2 kv heads, head_dim 16, SwiGLU 128, tied embeddings, the committed
tokenizer (``tools/train/tokenizer/``, 8,192 tokens); ~0.6M parameters, trained in float32 with a seeded
initialisation and data order (deterministic on one machine and thread count), AdamW with a short warm-up and a
constant learning rate.  It trains on ``tools/train/heldout.txt``, the only corpus text that is committed: the run
is for demonstrating training dynamics (the OV circuits' spectra moving away from the random initialisation, the
loss falling), not for a held-out score, and its losses are on the text it trains on.  Checkpoints are saved in
float32 (~2.4 MB each), so step 0 is exactly the seeded initialisation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from train import encode_stream, lr_at, write_checkpoint  # noqa: E402

TEXT = HERE / "heldout.txt"
TOKENIZER = HERE / "tokenizer"
STEPS = (0, 10, 20, 40, 80)
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128)
BATCH, SEQ_LEN, LR, WARMUP_STEPS = 8, 64, 3e-3, 5


def micro_config(tok):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tok), max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attention_dropout=0.0, initializer_range=0.02, **SHAPE,
    )


def build_micro_model(tok, seed: int = 0):
    """The seeded initialisation (what checkpoint-0 holds)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(micro_config(tok), dtype=torch.float32, attn_implementation="sdpa")


def load_tokenizer(path: Path = TOKENIZER):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def write_micro_trajectory(out_dir: Path, steps=STEPS, seed: int = 0, *, text: Path = TEXT, lr: float = LR,
                           batch: int = BATCH, seq_len: int = SEQ_LEN, threads: int | None = 1,
                           verbose: bool = False) -> list[Path]:
    """Train the micro model for max(steps) steps and write ``out_dir/checkpoint-<s>/`` for each s in ``steps``
    (0 = the initialisation); returns the checkpoint directories in step order.

    Runs on ``threads`` torch threads (restored afterwards; None: torch's setting): one thread is the fastest for a
    model this small, by far on a loaded machine (70 s instead of 8 s with 2 threads beside two busy processes on
    2 cores), and a fixed thread count keeps the float32 reductions, hence the trajectory, the same everywhere."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(Path(out_dir), steps, seed, text, lr, batch, seq_len, verbose)
    finally:
        torch.set_num_threads(previous)


def _train(out_dir: Path, steps, seed: int, text: Path, lr: float, batch: int, seq_len: int,
           verbose: bool) -> list[Path]:
    import torch
    import torch.nn.functional as F

    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    tok = load_tokenizer()
    stream, _ = encode_stream(tok, text)
    model = build_micro_model(tok, seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    max_steps = steps[-1]
    per_epoch = len(stream) / (batch * seq_len)
    warmup = WARMUP_STEPS / max(1, max_steps)
    log_history: list[dict] = []
    paths: list[Path] = []
    tokens_seen = 0
    t0 = time.time()
    model.train()
    for step in range(max_steps + 1):
        if step in steps:
            paths.append(write_checkpoint(
                model, tok, out_dir, step, max_steps=max_steps, log_history=log_history, epoch=step / per_epoch,
                tokens_seen=tokens_seen, batch=batch, logging_steps=1, eval_steps=max_steps or 1,
                save_steps=max_steps or 1, num_train_epochs=1, dtype=torch.float32))
        if step == max_steps:
            break
        lr_now = lr_at(step / max_steps, warmup, lr, min_ratio=1.0)  # warm-up, then constant
        for g in opt.param_groups:
            g["lr"] = lr_now
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        win = stream[starts[:, None] + torch.arange(seq_len + 1)[None, :]]
        logits = model(input_ids=win[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += win[:, :-1].numel()
        log_history.append({"loss": loss.item(), "grad_norm": float(grad_norm), "learning_rate": lr_now,
                            "epoch": (step + 1) / per_epoch, "step": step + 1})
        if verbose and (step + 1) % 10 == 0:
            print(f"step {step + 1} loss {loss.item():.4f} lr {lr_now:.2e} {time.time() - t0:.1f}s", flush=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="checkpoint steps, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the fastest here)")
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = write_micro_trajectory(args.out, [int(s) for s in args.steps.split(",")], args.seed, lr=args.lr,
                                   threads=args.threads, verbose=True)
    for p in paths:
        print(f"wrote {p} ({(p / 'model.safetensors').stat().st_size:,} bytes)")
    print(f"{len(paths)} checkpoints in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
