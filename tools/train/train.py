"""Train tiny-lm (Qwen3ForCausalLM) or tiny-moe (Qwen3MoeForCausalLM) on the corpus built by corpus.py.

    python tools/train/train.py --model tiny-lm  --minutes 40 --threads 1 --out tools/train/out/tiny-lm
    python tools/train/train.py --model tiny-moe --minutes 40 --threads 1 --out tools/train/out/tiny-moe

Documents are packed into one token stream as ``<|bos|> text <|eos|>``; each step draws ``--batch`` random
windows of ``--seq-len`` + 1 tokens from the training stream (a seeded generator, so the data order depends only
on ``--seed``).  AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up then cosine decay to
10% of ``--lr``.  The schedule runs over ``--steps`` when given (deterministic), otherwise over the wall-clock
budget ``--minutes`` (then the step count depends on the machine's speed; it is recorded).  Training stops at
whichever of ``--steps`` and ``--minutes`` comes first.  Every ``--eval-every`` steps the loss on a fixed sample
of held-out windows is printed; at the end the whole held-out split is scored (non-overlapping windows, every
token after the first of a window predicted once) in float32 from the saved bf16 weights.

The output directory is an ordinary HuggingFace model directory (config.json, model.safetensors in bf16, the
tokenizer) plus PROVENANCE.md and provenance.json.  Losses are natural-log cross-entropy per token (nats).

``--save-every N`` (with ``--steps``) also writes a training trajectory: ``<out>/checkpoint-<step>/`` at step 0
(the initialisation, before any update), every N steps and at the last step, each an HF directory in bf16 like the
final one plus a ``trainer_state.json`` as transformers' Trainer writes it (``global_step``, ``max_steps``,
``log_history`` with the train losses logged every ``--log-every`` steps and the held-out samples as
``eval_loss``); ``headlens trajectory`` reads such a directory.  Saving draws no random numbers, so the trained
weights are the same with or without it.  ``--train-file`` / ``--heldout-file`` train and score on other texts
(same format: documents separated by a blank line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpus import HELDOUT_AT, HELDOUT_EVERY, SOURCES  # noqa: E402
from tokenizer import read_documents  # noqa: E402

TINY_LM_INTERMEDIATE = 512

LICENCES = {
    "python3.11-doc": "PSF License Version 2 (Python documentation; code examples also 0BSD)",
    "python-django-doc": "BSD-3-Clause (Django documentation)",
}


def model_config(name: str, vocab_size: int, bos: int, eos: int, pad: int, max_pos: int,
                 intermediate: int | None = None):
    common = dict(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=max_pos, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        attention_dropout=0.0, initializer_range=0.02,
    )
    if name == "tiny-lm":
        from transformers import Qwen3Config

        return Qwen3Config(intermediate_size=intermediate or TINY_LM_INTERMEDIATE, **common)
    if name == "tiny-moe":
        from transformers import Qwen3MoeConfig

        # MoE on layers 1, 3, 5; dense SwiGLU on 0, 2, 4, so a dense layer sits between any two MoE layers.
        return Qwen3MoeConfig(
            intermediate_size=512, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[0, 2, 4], norm_topk_prob=True,
            output_router_logits=True, router_aux_loss_coef=0.01, **common,
        )
    raise SystemExit(f"--model {name!r}: choose tiny-lm or tiny-moe")


def build_model(name: str, tok, seq_len: int, seed: int, experts_impl: str = "eager", intermediate: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, max(1024, seq_len),
                          intermediate)
    torch.manual_seed(seed)
    extra = {"experts_implementation": experts_impl} if name == "tiny-moe" else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa", **extra)
    return model


def encode_stream(tok, path: Path):
    """All documents of a split as one int64 tensor: <|bos|> doc <|eos|> <|bos|> doc <|eos|> ..."""
    import torch

    docs = read_documents(path)
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.append(tok.bos_token_id)
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long), len(docs)


def ce_loss(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def heldout_loss(model, stream, seq_len: int, batch: int, max_windows: int | None = None) -> tuple[float, int]:
    """Mean CE over non-overlapping windows of seq_len+1 tokens (stride seq_len); returns (loss, tokens)."""
    import torch

    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    starts = torch.arange(n) * seq_len
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            s = starts[i:i + batch]
            idx = s[:, None] + torch.arange(seq_len + 1)[None, :]
            win = stream[idx]
            logits = model(input_ids=win[:, :-1]).logits
            import torch.nn.functional as F

            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += win[:, 1:].numel()
    model.train()
    return total / count, count


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(HERE)], cwd=HERE, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+uncommitted changes in tools/train" if dirty else "")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lr_at(progress: float, warmup: float, lr: float, min_ratio: float = 0.1) -> float:
    if progress < warmup:
        return lr * max(progress / warmup, 0.01)
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def write_checkpoint(model, tok, root: Path, step: int, *, max_steps: int, log_history: list[dict], epoch: float,
                     tokens_seen: int, batch: int, logging_steps: int, eval_steps: int, save_steps: int,
                     num_train_epochs: int, dtype=None) -> Path:
    """Write ``root/checkpoint-<step>/`` the way transformers' Trainer lays out a checkpoint: an HF model directory
    (config.json, model.safetensors, the tokenizer) and ``trainer_state.json`` (``TrainerState.save_to_json``, so
    ``TrainerState.load_from_json`` reads it back).  ``model`` is left untouched (a copy is cast to ``dtype``,
    default bfloat16, and saved).  Used by train.py ``--save-every`` and micro_trajectory.py."""
    import copy

    import torch
    from transformers.trainer_callback import TrainerControl, TrainerState

    out = root / f"checkpoint-{step}"
    out.mkdir(parents=True, exist_ok=True)
    snapshot = copy.deepcopy(model).to(dtype or torch.bfloat16)
    if hasattr(snapshot.config, "output_router_logits"):
        snapshot.config.output_router_logits = False  # as the final save does: inference needs no router logits
    snapshot.save_pretrained(str(out))
    del snapshot
    tok.save_pretrained(str(out))
    state = TrainerState(
        epoch=epoch, global_step=step, max_steps=max_steps, logging_steps=logging_steps, eval_steps=eval_steps,
        save_steps=save_steps, train_batch_size=batch, num_train_epochs=num_train_epochs,
        num_input_tokens_seen=tokens_seen, log_history=[dict(e) for e in log_history],
        stateful_callbacks=[TrainerControl(should_training_stop=step >= max_steps)],
    )
    state.save_to_json(str(out / "trainer_state.json"))
    return out


def write_provenance(out: Path, info: dict) -> None:
    (out / "provenance.json").write_text(json.dumps(info, indent=1) + "\n")
    c = info["corpus"]
    lines = [
        f"# {info['model']}: provenance",
        "",
        f"- Architecture: `{info['architecture']}`, {info['parameters']:,} parameters "
        f"({info['parameters_unique']:,} stored, tied embeddings), weights bf16 "
        f"({info['weights_bytes']:,} bytes, `model.safetensors` SHA-256 `{info['weights_sha256']}`).",
        "- Corpus: " + "; ".join(f"Debian `{s['package']}` {s['version']} ({s['licence']})" for s in c["sources"])
        + f", extracted by `tools/train/corpus.py`; held-out rule: {c['heldout_rule']}.",
        f"- Training split SHA-256 `{c['train_sha256']}` ({c['train_bytes']:,} bytes, {c['train_tokens']:,} tokens); "
        f"held-out SHA-256 `{c['heldout_sha256']}` ({c['heldout_bytes']:,} bytes, {c['heldout_tokens']:,} tokens)"
        + (f"; files `{info['train_file']}` and `{info['heldout_file']}`" if info.get("train_file") else "") + ".",
        f"- Tokenizer: byte-level BPE, {info['vocab_size']} tokens (`tools/train/tokenizer.py`), "
        f"`tokenizer.json` SHA-256 `{info['tokenizer_sha256']}`.",
        f"- Script: `tools/train/train.py` at commit `{info['git_commit']}`; command `{info['command']}`.",
        f"- Seed {info['seed']}; AdamW lr {info['lr']} (warm-up {info['warmup']:.0%}, cosine to 10%), "
        f"weight decay {info['weight_decay']}, batch {info['batch']} x {info['seq_len']} tokens.",
        f"- Steps {info['steps']:,}; tokens seen {info['tokens_seen']:,} "
        f"({info['tokens_seen'] / max(1, c['train_tokens']):.2f} epochs); wall time {info['wall_seconds']:.0f} s "
        f"on {info['threads']} thread(s) ({info['tokens_per_second']:.0f} tokens/s); torch {info['torch']}, "
        f"transformers {info['transformers']}, {info['machine']}.",
        f"- Final train loss {info['final_train_loss']:.4f} nats/token (mean of the last {info['train_loss_window']} "
        f"steps); held-out loss {info['heldout_loss']:.4f} nats/token over {info['heldout_tokens_scored']:,} "
        f"tokens (float32 compute from the saved bf16 weights, windows of {info['seq_len']}).",
        "",
    ]
    (out / "PROVENANCE.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny-lm", "tiny-moe"], required=True)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--train-file", type=Path, default=None, help="training text (default DATA/train.txt)")
    ap.add_argument("--heldout-file", type=Path, default=None, help="held-out text (default DATA/heldout.txt)")
    ap.add_argument("--tokenizer", type=Path, default=HERE / "tokenizer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget for the training loop")
    ap.add_argument("--steps", type=int, default=None, help="schedule length in steps (else by wall clock)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the schedule")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--intermediate", type=int, default=None,
                    help=f"tiny-lm SwiGLU width (default {TINY_LM_INTERMEDIATE})")
    ap.add_argument("--experts-impl", default="eager",
                    help="tiny-moe experts kernel (transformers experts_implementation); eager is fastest on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward (inductor)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between held-out samples")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=None,
                    help="also write OUT/checkpoint-<step>/ at step 0, every N steps and the last (needs --steps)")
    args = ap.parse_args(argv)
    if args.save_every is not None and (args.save_every < 1 or args.steps is None):
        ap.error("--save-every N needs N >= 1 and --steps (a trajectory follows a fixed schedule)")
    train_file = args.train_file or args.data / "train.txt"
    heldout_file = args.heldout_file or args.data / "heldout.txt"

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    commit = git_commit()  # the code that runs, read before training (the checkout may move on meanwhile)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    t0 = time.time()
    train_stream, n_train_docs = encode_stream(tok, train_file)
    held_stream, n_held_docs = encode_stream(tok, heldout_file)
    print(f"encoded {n_train_docs} train documents -> {len(train_stream):,} tokens, {n_held_docs} held-out -> "
          f"{len(held_stream):,} tokens in {time.time() - t0:.1f} s", flush=True)

    model = build_model(args.model, tok, args.seq_len, args.seed, args.experts_impl, args.intermediate)
    n_params = sum(p.numel() for p in model.parameters())
    n_unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"{args.model}: {type(model).__name__}, {n_unique:,} parameters ({2 * n_unique / 1e6:.2f} MB in bf16)",
          flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    fwd = torch.compile(model) if args.compile else model  # shares the parameters; `model` is what gets saved
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    is_moe = args.model == "tiny-moe"
    recent: list[float] = []
    history = []
    step, tokens_seen = 0, 0
    log_history: list[dict] = []  # Trainer's log_history: train losses and held-out samples (eval_loss)

    def save_checkpoint() -> None:
        per_epoch = len(train_stream) / (args.batch * args.seq_len)  # steps per epoch of the training stream
        write_checkpoint(model, tok, args.out, step, max_steps=args.steps, log_history=log_history,
                         epoch=step / per_epoch, tokens_seen=tokens_seen, batch=args.batch,
                         logging_steps=args.log_every, eval_steps=args.eval_every, save_steps=args.save_every,
                         num_train_epochs=max(1, math.ceil(args.steps / per_epoch)))
        print(f"step {step} saved {args.out / f'checkpoint-{step}'}", flush=True)

    if args.save_every:
        save_checkpoint()  # the initialisation
    model.train()
    start = time.time()
    while True:
        elapsed = time.time() - start
        if elapsed >= budget or (args.steps is not None and step >= args.steps):
            break
        progress = step / args.steps if args.steps else elapsed / budget
        lr = lr_at(progress, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_stream) - args.seq_len - 1, (args.batch,), generator=gen)
        win = train_stream[starts[:, None] + torch.arange(args.seq_len + 1)[None, :]]
        out = fwd(input_ids=win[:, :-1])
        loss = ce_loss(out.logits, win[:, 1:])
        total = loss
        if is_moe and getattr(out, "aux_loss", None) is not None:
            total = loss + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += win[:, :-1].numel()
        recent.append(loss.item())
        recent = recent[-50:]
        epoch = tokens_seen / len(train_stream)
        if step % args.log_every == 0:
            el = time.time() - start
            mean_loss = sum(recent[-args.log_every:]) / len(recent[-args.log_every:])
            log_history.append({"loss": mean_loss, "grad_norm": float(grad_norm), "learning_rate": lr,
                                "epoch": epoch, "step": step})
            print(f"step {step} loss {mean_loss:.4f} lr {lr:.2e} "
                  f"tokens {tokens_seen:,} {tokens_seen / el:.0f} tok/s elapsed {el:.0f}s", flush=True)
        if step % args.eval_every == 0:
            h, _ = heldout_loss(model, held_stream, args.seq_len, args.batch, args.eval_windows)
            history.append({"step": step, "tokens": tokens_seen, "seconds": round(time.time() - start, 1),
                            "train_loss": sum(recent) / len(recent), "heldout_sample_loss": h})
            log_history.append({"eval_loss": h, "epoch": epoch, "step": step})
            print(f"step {step} held-out sample ({args.eval_windows} windows) loss {h:.4f}", flush=True)
        if args.save_every and step % args.save_every == 0:
            save_checkpoint()
    wall = time.time() - start
    if args.save_every and step % args.save_every != 0:
        save_checkpoint()  # the last step (a --minutes cap may stop before --steps)
    print(f"trained {step} steps, {tokens_seen:,} tokens in {wall:.0f} s ({tokens_seen / max(wall, 1e-9):.0f} tok/s)",
          flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False if is_moe else getattr(model.config, "output_router_logits", None)
    model.to(torch.bfloat16).save_pretrained(str(args.out))
    tok.save_pretrained(str(args.out))
    # Score the held-out split from the saved bf16 weights, computed in float32 (what a test would reload).
    reloaded = AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    h_loss, h_tokens = heldout_loss(reloaded, held_stream, args.seq_len, args.batch)
    q_loss, q_tokens = heldout_loss(reloaded, held_stream, args.seq_len, args.batch, 32)  # what a quick test checks
    print(f"held-out loss (bf16 weights, float32 compute) {h_loss:.4f} nats/token over {h_tokens:,} tokens",
          flush=True)

    manifest_path = args.data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    sources = [{"package": s.package, "version": next((m["version"] for m in manifest.get("sources", [])
                                                       if m["package"] == s.package), "?"),
                "licence": LICENCES.get(s.package, "?")} for s in SOURCES]
    weights = args.out / "model.safetensors"
    info = {
        "model": args.model,
        "architecture": type(reloaded).__name__,
        "parameters": n_params,
        "parameters_unique": n_unique,
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": sha256(weights),
        "vocab_size": len(tok),
        "tokenizer_sha256": sha256(args.out / "tokenizer.json"),
        "corpus": {
            "sources": sources,
            "heldout_rule": f"document index % {HELDOUT_EVERY} == {HELDOUT_AT}",
            "train_sha256": sha256(train_file),
            "heldout_sha256": sha256(heldout_file),
            "train_bytes": train_file.stat().st_size,
            "heldout_bytes": heldout_file.stat().st_size,
            "train_tokens": len(train_stream),
            "heldout_tokens": len(held_stream),
        },
        "train_file": str(train_file) if args.train_file or args.heldout_file else None,  # None: the corpus's
        "heldout_file": str(heldout_file) if args.train_file or args.heldout_file else None,
        "save_every": args.save_every,
        "git_commit": commit,
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]) if argv is None
        else "main(" + repr(argv) + ")",
        "seed": args.seed,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "compile": args.compile,
        "experts_implementation": args.experts_impl if is_moe else None,
        "minutes_budget": args.minutes,
        "steps_schedule": args.steps,
        "steps": step,
        "tokens_seen": tokens_seen,
        "wall_seconds": wall,
        "tokens_per_second": tokens_seen / max(wall, 1e-9),
        "final_train_loss": sum(recent) / max(1, len(recent)),
        "train_loss_window": len(recent),
        "heldout_loss": h_loss,
        "heldout_tokens_scored": h_tokens,
        "heldout_first32_loss": q_loss,
        "heldout_first32_tokens": q_tokens,
        "history": history,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    write_provenance(args.out, info)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
