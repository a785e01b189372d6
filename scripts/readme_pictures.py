"""Make the README's pictures: one small picture of each kind headlens draws, from the embedded models, offline.

    .venv/bin/python scripts/readme_pictures.py          # or: make pictures
    .venv/bin/python scripts/readme_pictures.py --markdown   # print the README's "Pictures" section

Each command of ``JOBS`` runs once, in-process through ``headlens.cli.main``, into a scratch directory; each entry
of ``PICTURES`` takes one of the figures it wrote (a GIF gives one frame), shrinks it to at most ``WIDTH`` px wide,
quantises it to a 256-colour palette (no dithering) and writes it as an optimised PNG into ``docs/pictures/``.
Files there that ``PICTURES`` does not name are removed, so the directory is exactly the list. Same checkout, same
pictures: the models, prompts and seeds are fixed, the commands run on the CPU, and the PNGs carry no metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PICTURES_DIR = ROOT / "docs" / "pictures"
WIDTH = 820  # px: wide enough to read in a README column, small enough to stay a few tens of kB
COLOURS = 256

# The Makefile's decoder prompt (LM_PROMPT) and its strongest previous-token head (LM_LAYER, LM_HEAD).
LM_PROMPT = ("The function returns a new list. If the argument is omitted, the default value is used. A QuerySet can "
             "be filtered, sliced and passed around without hitting the database.")

# job name -> headlens argv; {out} is the job's own output directory (shown as headlens-out/<job> in the README)
JOBS: dict[str, list[str]] = {
    "ov": ["ov", "--model", "tiny-lm", "--layer", "4", "--head", "7", "--latent-dim", "8", "--prompt", LM_PROMPT,
           "--heatmap", "--plot", "--out-dir", "{out}"],
    "sweep": ["sweep", "--model", "tiny-lm", "--prompt", LM_PROMPT, "--target-error", "0.3", "--out-dir", "{out}"],
    "sphere": ["sphere", "--model", "tiny-lm", "--prompt", LM_PROMPT, "--out-dir", "{out}"],
    "diagram": ["diagram", "--model", "tiny-lm", "--layer", "2", "--out-dir", "{out}"],
    "router": ["router", "--model", "tiny-moe", "--prompt", LM_PROMPT, "--out-dir", "{out}"],
    "toy-cluster": ["toy", "cluster", "--out-dir", "{out}"],
    "compress": ["compress", "--model", "tiny-lm", "--out-dir", "{out}"],
}


@dataclass(frozen=True)
class Picture:
    name: str  # file name under docs/pictures/
    title: str  # a few words, the picture's alt text and heading in the README
    job: str  # the JOBS entry that draws it
    source: str  # the figure, relative to the job's output directory
    caption: str  # one sentence: what it shows
    frame: int | None = None  # for a GIF: which frame (-1 = the last)


PICTURES: list[Picture] = [
    Picture("ov_spectrum.png", "OV spectrum", "ov", "tiny-lm_layer4_head7.png",
            "The singular values and cumulative energy of one head's OV circuit (tiny-lm layer 4 head 7): how many "
            "latent dimensions an MLA cache of this head needs."),
    Picture("ov_heatmap.png", "Attention heatmap", "ov", "tiny-lm_layer4_head7_heatmap.png",
            "The same head's attention over the prompt, labelled with the decoded tokens: it is tiny-lm's strongest "
            "previous-token head."),
    Picture("sweep_rank_e90.png", "Sweep heatmap", "sweep", "sweep_rank_e90.png",
            "Every head of tiny-lm at once: the OV rank that holds 90% of each head's energy, layer by query head."),
    Picture("sweep_budget.png", "Sweep budget", "sweep", "sweep_budget.png",
            "The KV-cache latent budget per layer for a 0.3 error target: plain and data-aware latents and the "
            "uniform allocation, against the full cache."),
    Picture("sphere_frame.png", "Sphere frame", "sphere", "tokens.gif",
            "The last frame of the sphere animation: every token of the prompt at tiny-lm's last layer input, "
            "projected to 3-D and normalised onto the unit sphere.", frame=-1),
    Picture("diagram.png", "Layer diagram", "diagram", "tiny-lm_layer2_diagram.png",
            "How tokens flow through one pre-norm decoder layer, traced on the real model, with the hook that "
            "captures each residual site."),
    Picture("router_coactivation.png", "Router co-activation", "router", "router_coactivation.png",
            "For each MoE layer of tiny-moe, how often expert j is chosen together with expert i for the same token."),
    Picture("toy_cluster_metrics.png", "Toy clustering", "toy-cluster", "sphere_metrics.png",
            "The token-clustering demo: 64 tokens through a deep shared-weight attention stack collapse into one "
            "cluster (mean cosine, clusters and effective rank through depth)."),
    Picture("compress_tradeoff.png", "Compress trade-off", "compress", "compress_tradeoff.png",
            "The latent cache put into the running tiny-lm: KV bytes saved against the next-token KL it costs, per "
            "budget and for the uniform allocation of the same bytes."),
]


def command_line(job: str) -> str:
    """The job as a user types it, writing under headlens-out/, with the prompt as "$P" (see `markdown`)."""
    words = [a.format(out=f"headlens-out/{job}") for a in JOBS[job]]
    return "headlens " + " ".join('"$P"' if w == LM_PROMPT else shlex.quote(w) for w in words)


def markdown() -> str:
    """The README's "Pictures" section, for `--markdown`."""
    lines = ["## Pictures", "",
             "One picture of each kind, made from the embedded models offline by `make pictures` "
             f"(`scripts/readme_pictures.py`: at most {WIDTH} px wide, 256 colours; the commands write the full-size "
             "figures). The commands read the decoders' prompt from `P`:", "", "```bash",
             f"P={shlex.quote(LM_PROMPT)}", "```", ""]
    for pic in PICTURES:
        lines += [f"**{pic.title}** (`headlens {JOBS[pic.job][0]}`). {pic.caption}", "", "```bash",
                  command_line(pic.job), "```", "", f"![{pic.title}](docs/pictures/{pic.name})", ""]
    return "\n".join(lines)


def run_jobs(scratch: Path, jobs: list[str]) -> dict[str, Path]:
    from headlens.cli import main

    outs = {}
    for job in jobs:
        out = scratch / job
        argv = [a.format(out=out) for a in JOBS[job]]
        start = time.perf_counter()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = main(argv)
        if rc != 0:
            sys.stderr.write(printed.getvalue())
            raise SystemExit(f"headlens {shlex.join(argv)} exited {rc}")
        print(f"{time.perf_counter() - start:5.1f} s  {command_line(job)[:100]}")
        outs[job] = out
    return outs


def shrink(source: Path, frame: int | None, target: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """Writes one frame of ``source`` to ``target``, at most WIDTH px wide, as an optimised palette PNG."""
    from PIL import Image

    with Image.open(source) as im:
        if frame is not None:
            im.seek(frame % im.n_frames)
        full = im.size
        rgb = im.convert("RGB")
    if rgb.width > WIDTH:
        rgb = rgb.resize((WIDTH, round(rgb.height * WIDTH / rgb.width)), Image.Resampling.LANCZOS)
    small = rgb.quantize(colors=COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = target.with_name(target.name + ".tmp")
    small.save(tmp, format="PNG", optimize=True)
    tmp.replace(target)
    return full, small.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's Pictures section and exit")
    parser.add_argument("--out", type=Path, default=PICTURES_DIR, help="default docs/pictures/")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="run the commands into DIR and keep their full outputs (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown())
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HEADLENS_DEVICE"] = "cpu"  # the same numbers, hence the same pictures, on any machine
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        scratch = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="headlens-pictures-")))
        outs = run_jobs(scratch, list(dict.fromkeys(p.job for p in PICTURES)))
        for pic in PICTURES:
            full, small = shrink(outs[pic.job] / pic.source, pic.frame, args.out / pic.name)
            size = (args.out / pic.name).stat().st_size
            print(f"{pic.name:28s} {full[0]}x{full[1]} -> {small[0]}x{small[1]}  {size / 1024:6.1f} kB")
    names = {p.name for p in PICTURES}
    for stale in sorted(args.out.iterdir()):
        if stale.name not in names:
            stale.unlink()
            print(f"removed {stale.name} (not in PICTURES)")
    total = sum((args.out / n).stat().st_size for n in names)
    print(f"{len(names)} pictures, {total / 1024:.0f} kB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
