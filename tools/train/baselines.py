"""Unigram and bigram baselines on the held-out split, with the models' tokenizer: cross-entropy in nats/token.

    python tools/train/baselines.py [--data tools/train/data] [--tokenizer tools/train/tokenizer] [--json FILE]

Both splits are packed exactly as train.py packs them (``<|bos|> doc <|eos|>`` ...).  The tokens scored are the
ones train.py's final held-out loss scores: positions 1 .. n*seq_len of the held-out stream, n = (len-1)//seq_len,
each predicted from the token before it (bigram) or from nothing (unigram).  Models fitted on the training split:

- unigram, add-k: p(w) = (c(w) + k) / (N + k V);
- bigram, add-k: p(w | v) = (c(v w) + k) / (c(v) + k V);
- bigram interpolated with the add-1 unigram (Jelinek-Mercer): p(w | v) = l c(v w)/c(v) + (1 - l) p_uni(w).

V is the full vocabulary (8192).  k and l are listed on a grid rather than tuned, so every number is shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def streams(data: Path, tokenizer: Path):
    from transformers import AutoTokenizer

    from train import encode_stream

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    train, _ = encode_stream(tok, data / "train.txt")
    held, _ = encode_stream(tok, data / "heldout.txt")
    return train.numpy(), held.numpy(), len(tok)


def evaluate(train: np.ndarray, held: np.ndarray, vocab: int, seq_len: int) -> dict:
    n_pred = ((len(held) - 1) // seq_len) * seq_len
    ctx, tgt = held[:n_pred].astype(np.int64), held[1:n_pred + 1].astype(np.int64)
    uni = np.bincount(train, minlength=vocab).astype(np.float64)
    n = uni.sum()
    pair_keys = train[:-1].astype(np.int64) * vocab + train[1:].astype(np.int64)
    keys, counts = np.unique(pair_keys, return_counts=True)
    ctx_counts = np.bincount(train[:-1], minlength=vocab).astype(np.float64)
    q = ctx * vocab + tgt
    pos = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
    c_pair = np.where(keys[pos] == q, counts[pos], 0).astype(np.float64)
    c_ctx = ctx_counts[ctx]
    res: dict = {"tokens_scored": int(n_pred), "train_tokens": int(len(train)), "vocab": vocab,
                 "unigram_add_k": {}, "bigram_add_k": {}, "bigram_interpolated": {}}
    for k in (1.0, 0.1, 0.01):
        p = (uni[tgt] + k) / (n + k * vocab)
        res["unigram_add_k"][str(k)] = float(-np.log(p).mean())
    for k in (1.0, 0.1, 0.01, 0.001):
        p = (c_pair + k) / (c_ctx + k * vocab)
        res["bigram_add_k"][str(k)] = float(-np.log(p).mean())
    p_uni = (uni[tgt] + 1.0) / (n + vocab)
    ml = np.divide(c_pair, c_ctx, out=np.zeros_like(c_pair), where=c_ctx > 0)
    for lam in (0.5, 0.7, 0.8, 0.9, 0.95):
        p = lam * ml + (1 - lam) * p_uni
        res["bigram_interpolated"][str(lam)] = float(-np.log(p).mean())
    res["best"] = {name: min(res[name].values()) for name in ("unigram_add_k", "bigram_add_k", "bigram_interpolated")}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--tokenizer", type=Path, default=HERE / "tokenizer")
    ap.add_argument("--seq-len", type=int, default=256, help="train.py's --seq-len (which tokens are scored)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    train, held, vocab = streams(args.data, args.tokenizer)
    res = evaluate(train, held, vocab, args.seq_len)
    print(f"train {res['train_tokens']:,} tokens; held-out tokens scored {res['tokens_scored']:,}; vocab {vocab}")
    print(f"uniform: {np.log(vocab):.4f} nats/token")
    for name in ("unigram_add_k", "bigram_add_k", "bigram_interpolated"):
        row = "  ".join(f"{k}: {v:.4f}" for k, v in res[name].items())
        print(f"{name:20s} {row}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
