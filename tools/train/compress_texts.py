"""Write the calibration and eval texts `headlens compress` uses by default for the embedded models.

    .venv/bin/python tools/train/compress_texts.py        # rewrites src/headlens/models/texts/*.txt
    .venv/bin/python tools/train/compress_texts.py --check  # exit 1 if the committed files differ

Decoders (tiny-lm, tiny-moe): paragraphs of the held-out split (``heldout.txt``, never trained on) of 200 to 600
characters, in file order, each once; the even-numbered ones calibrate, the odd-numbered ones are the eval texts, so the two
never share a paragraph. MiniLM: the eval texts are the 25 sentences of the residual-stream notebook's prompt
(``headlens.prompts.NOTEBOOK_PROMPT``, one topic each, so nearest-neighbour agreement means something); its
calibration texts are the first held-out paragraphs of the same length range not used above.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "src" / "headlens" / "models" / "texts"
N_CALIB, N_EVAL, N_MINILM_CALIB = 24, 32, 24


def paragraphs() -> list[str]:
    lines = (HERE / "heldout.txt").read_text(encoding="utf-8").splitlines()
    keep = [ln.strip() for ln in lines if 200 <= len(ln.strip()) <= 600]
    return list(dict.fromkeys(keep))  # a paragraph repeated in the docs counts once, so no text is in both sets


def texts() -> dict[str, list[str]]:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from headlens.prompts import NOTEBOOK_PROMPT

    paras = paragraphs()
    calib, held = paras[0::2][:N_CALIB], paras[1::2][:N_EVAL]
    rest = paras[2 * max(N_CALIB, N_EVAL):][:N_MINILM_CALIB]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", NOTEBOOK_PROMPT) if s.strip()]
    return {"decoder_calib.txt": calib, "decoder_eval.txt": held, "minilm_calib.txt": rest,
            "minilm_eval.txt": sentences}


def main() -> int:
    want = {name: "\n".join(lines) + "\n" for name, lines in texts().items()}
    if "--check" in sys.argv[1:]:
        bad = [n for n, t in want.items() if not (OUT / n).exists() or (OUT / n).read_text(encoding="utf-8") != t]
        print("texts differ: " + ", ".join(bad) if bad else "texts match")
        return 1 if bad else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in want.items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"{OUT / name}: {text.count(chr(10))} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
