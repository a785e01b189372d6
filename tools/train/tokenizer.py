"""Train the byte-level BPE tokenizer shared by tiny-lm and tiny-moe, on the training split only.

``python tools/train/tokenizer.py --data tools/train/data --out tools/train/tokenizer`` writes a HuggingFace
``PreTrainedTokenizerFast`` directory (``AutoTokenizer.from_pretrained`` loads it) and writes/prints the SHA-256 of
each file (``SHA256SUMS``; two runs give the same bytes, whatever RAYON_NUM_THREADS).  The tokenizer prepends ``<|bos|>`` when called with ``add_special_tokens=True`` (the default), so a prompt
looks like the start of a training document; ``train.py`` packs documents as ``<|bos|> text <|eos|>``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL = [PAD, BOS, EOS]  # ids 0, 1, 2
VOCAB_SIZE = 8192
MAX_LENGTH = 1024


def read_documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d for d in text.rstrip("\n").split("\n\n") if d]


def train(data: Path, out: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    docs = read_documents(data / "train.txt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "SHA256SUMS"
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("tools/train/data"))
    ap.add_argument("--out", type=Path, default=Path("tools/train/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    out = train(args.data, args.out, args.vocab_size)
    total = 0
    hashes = file_hashes(out)
    (out / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in hashes.items()))
    for name, digest in hashes.items():
        size = (out / name).stat().st_size
        total += size
        print(f"{digest}  {name}  ({size:,} bytes)")
    print(f"total {total:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
