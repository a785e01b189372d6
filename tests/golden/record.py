"""Golden recordings of what every ``headlens`` command prints (issue 9: the redesign changes nothing a command
prints or computes).

Each case is one or more ``headlens`` argv lists, run in-process through ``headlens.cli.main(argv)``. A step
records its return code, stdout, stderr (normalised, see :func:`normalise`), the Python warnings it raised
(category and message) and the names of the files it wrote into the case's output directory. The inputs, the
embedded all-MiniLM-L6-v2 and tiny seeded checkpoints built with ``tests/tiny_models.py``, are made in a temporary
directory on every run (:func:`build_inputs`); no checkpoint is ever committed.

Record (with the code whose output is the reference on ``PYTHONPATH``)::

    HF_HUB_OFFLINE=1 python tests/golden/record.py --record            # writes tests/golden/<case>.txt
    HF_HUB_OFFLINE=1 python tests/golden/record.py --record --golden-dir /tmp/again   # e.g. to diff two runs
    HF_HUB_OFFLINE=1 python tests/golden/record.py --check [--only NAME ...]          # compare, print diffs

Imported by ``tests/cli/test_golden_outputs.py``, which runs the same cases against the current code. Only
``headlens.cli.main`` and ``headlens.errors.HeadlensError`` are imported from the package, so the recordings stay
usable however the package is organised inside.

Argv templates use three placeholders, replaced token by token: ``{ck}`` (the checkpoints), ``{data}`` (text
files, a corrupt checkpoint) and ``{out}`` (the case's own output directory, also the working directory while the
case runs, so the commands' default ``headlens-out/...`` directories land there too).
"""

from __future__ import annotations

import argparse
import difflib
import io
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent
_TESTS = GOLDEN_DIR.parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --------------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------------

PROMPT = "The true meaning of life is absurdity and suffering"  # tiny_models.PROMPT
SHORT = "The cat sat on the mat. The quick brown fox jumps over the lazy dog."
README_OV_PROMPT = ("The true meaning of life is absurdity and suffering. Octopuses have three hearts, and two of "
                    "them stop beating when they swim. The prime number theorem gives an asymptotic estimate for "
                    "the distribution of primes.")
CALIB_LINES = [
    "The true meaning of life is absurdity and suffering, said the old man to the young woman.",
    "She laughed and said that the meaning of life is love.",
    "The man looked at the river and did not answer for a long time.",
    "Mary went to Paris and John went to London; John gave a book to Mary.",
    "The cat sat on the mat. The quick brown fox jumps over the lazy dog.",
]
ROUTER_TEXTS = [PROMPT, "Octopuses have three hearts, and two of them stop beating when they swim.",
                "The prime number."]


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[tuple[str, ...], ...]


def case(name: str, *commands: str) -> Case:
    """``commands``: one shell-like command line per step, without the leading ``headlens``."""
    return Case(name, tuple(tuple(shlex.split(c)) for c in commands))


Q = shlex.quote
CASES: list[Case] = [
    # ---------------------------------------------------------------- help and usage
    case("help_top", "--help"),
    case("help_ov", "ov --help"),
    case("help_sphere", "sphere --help"),
    case("help_diagram", "diagram --help"),
    case("help_sweep", "sweep --help"),
    case("help_trajectory", "trajectory --help"),
    case("help_compress", "compress --help"),
    case("help_generate", "generate --help"),
    case("help_router", "router --help"),
    case("help_toy", "toy --help", "toy create --help", "toy trace --help", "toy cluster --help",
         "toy run --help"),
    # ---------------------------------------------------------------- ov on the embedded MiniLM
    case("ov_minilm_defaults", "ov"),
    case("ov_minilm_weight_only", "ov --layer 3 --head 5 --latent-dim 8"),
    case("ov_minilm_readme_demo",
         f"ov --layer 3 --head 5 --latent-dim 8 --prompt {Q(README_OV_PROMPT)} --heatmap --plot "
         "--out-dir headlens-out --json"),
    case("ov_minilm_prompt", f"ov --layer 2 --head 7 --latent-dim 8 --prompt {Q(SHORT)}"),
    case("ov_minilm_fold_norm_json", "ov --layer 1 --head 0 --latent-dim 16 --fold-norm --json {out}/r.json"),
    case("ov_minilm_fold_norm_prompt_heatmap",
         f"ov --layer 4 --head 3 --latent-dim 4 --fold-norm --prompt {Q(SHORT)} --heatmap "
         "--plot-path {out}/pics/spec.png"),
    case("ov_minilm_float64_probes", "ov --layer 5 --head 11 --dtype float64 --probe-tokens 300 --seed 3"),
    # ---------------------------------------------------------------- ov on tiny checkpoints
    case("ov_qwen3_gqa_prompt_heatmap_json",
         f"ov --weights {{ck}}/tiny-qwen3 --auto-infer --layer 1 --head 3 --latent-dim 4 --prompt {Q(PROMPT)} "
         "--heatmap --plot --json --out-dir {out}/o"),
    case("ov_qwen3_gqa_weight_only", "ov --weights {ck}/tiny-qwen3 --layer 0 --head 2"),
    case("ov_qwen2_sharded_prompt",
         f"ov --weights {{ck}}/tiny-qwen2-sharded --auto-infer --layer 1 --head 0 --latent-dim 8 --prompt {Q(SHORT)}"),
    case("ov_gpt2_prompt_heatmap",
         f"ov --weights {{ck}}/tiny-gpt2 --layer 1 --head 2 --latent-dim 4 --prompt {Q(PROMPT)} --heatmap "
         "--out-dir {out}/o"),
    case("ov_gpt_neox_fold_norm_prompt",
         f"ov --weights {{ck}}/tiny-neox --head 1 --latent-dim 8 --fold-norm --prompt {Q(PROMPT)}"),
    case("ov_phi3_json", "ov --weights {ck}/tiny-phi3 --auto-infer --layer 1 --head 3 --latent-dim 4 --json "
                         "--out-dir {out}/o"),
    case("ov_gemma2_fold_norm", "ov --weights {ck}/tiny-gemma2 --layer 1 --head 1 --latent-dim 6 --fold-norm"),
    case("ov_bare_safetensors", "ov --weights {ck}/qwen3-st/model.safetensors --num-heads 4 --layer 1 --head 1 "
                                "--latent-dim 4 --plot --out-dir {out}/o"),
    case("ov_bare_pt_mqa", "ov --weights {ck}/llama-pt/model.pt --num-heads 4 --num-kv-heads 1 --layer 0 --head 3 "
                           "--latent-dim 8"),
    # ---------------------------------------------------------------- sphere
    case("sphere_minilm_short", f"sphere --prompt {Q(SHORT)} --out-dir {{out}}/s --workers 1"),
    case("sphere_minilm_layers_global",
         f"sphere --prompt {Q(SHORT)} --layers 0:6:2 --basis global --no-labels --frame-seconds 0.25 "
         "--json {out}/full.json"),
    case("sphere_qwen3_resid_mid", f"sphere --weights {{ck}}/tiny-qwen3 --prompt {Q(PROMPT)} --site resid_mid "
                                   "--layers 0,1 --out-dir {out}/s --workers 1"),
    case("sphere_qwen3_resid_post", f"sphere --weights {{ck}}/tiny-qwen3 --prompt {Q(SHORT)} --site resid_post "
                                    "--layers 1 --no-align --drop-first --half --out-dir {out}/s --workers 1"),
    case("sphere_llama_outliers", f"sphere --weights {{ck}}/tiny-llama --prompt {Q(SHORT)} --outlier-factor 1.2 "
                                  "--drop-outliers --cluster-threshold 0.5 --out-dir {out}/s --workers 1"),
    case("sphere_gpt2_default_prompt_truncated", "sphere --weights {ck}/tiny-gpt2 --truncate --layers all "
                                                 "--out-dir {out}/s --workers 2"),
    case("sphere_phi3_prompt_file", "sphere --weights {ck}/tiny-phi3 --prompt-file {data}/prompt.txt "
                                    "--site resid_post --out-dir {out}/s --workers 1"),
    # ---------------------------------------------------------------- diagram
    case("diagram_minilm_readme", "diagram --layer 2"),
    case("diagram_qwen3_json", "diagram --weights {ck}/tiny-qwen3 --layer 1 --json --out-dir {out}/d"),
    case("diagram_gemma2", "diagram --weights {ck}/tiny-gemma2 --out-dir {out}/d"),
    case("diagram_gpt_neox", "diagram --weights {ck}/tiny-neox --layer 1 --out-dir {out}/d"),
    case("diagram_gpt2_json_path", "diagram --weights {ck}/tiny-gpt2 --out-dir {out}/d --json {out}/g.json"),
    # ---------------------------------------------------------------- sweep
    case("sweep_minilm_weight_only", "sweep --out-dir {out}/sw"),
    case("sweep_minilm_calib_target_error",
         "sweep --calib {data}/calib.txt --target-error 0.3 --layers 3:6 --out-dir headlens-out/sweep"),
    case("sweep_minilm_energy_k_no_qk", "sweep --target-energy 0.9 --layers 4,5 --k 4,8 --no-qk --out-dir {out}/sw"),
    case("sweep_qwen3_weight_only_k",
         "sweep --weights {ck}/tiny-qwen3 --auto-infer --k 2,4,8 --no-qk --out-dir {out}/sw"),
    case("sweep_qwen3_calib_fold_norm",
         "sweep --weights {ck}/tiny-qwen3 --calib {data}/calib.txt --target-error 0.3 --fold-norm "
         "--max-calib-tokens 40 --out-dir {out}/sw --json {out}/summary.json"),
    case("sweep_gpt2_prompt_energy", f"sweep --weights {{ck}}/tiny-gpt2 --prompt {Q(PROMPT)} --target-energy 0.95 "
                                     "--out-dir {out}/sw"),
    case("sweep_phi3_neox_weight_only", "sweep --weights {ck}/tiny-phi3 --target-error 0.5 --out-dir {out}/phi3",
         "sweep --weights {ck}/tiny-neox --k 16 --kv-bytes 1 --out-dir {out}/neox"),
    case("sweep_bare_safetensors", "sweep --weights {ck}/qwen3-st/model.safetensors --num-heads 4 --k 4,16 "
                                   "--out-dir {out}/sw"),
    case("sweep_resume", "sweep --weights {ck}/tiny-qwen3 --layers 0 --k 8 --out-dir {out}/sw",
         "sweep --weights {ck}/tiny-qwen3 --k 8 --resume --out-dir {out}/sw",
         "sweep --weights {ck}/tiny-qwen3 --k 4 --resume --out-dir {out}/sw"),
    # ---------------------------------------------------------------- router
    case("router_qwen3_moe_readme", "router --weights {ck}/tiny-qwen3-moe --prompt-file {data}/texts.txt"),
    case("router_olmoe_prompt", f"router --weights {{ck}}/tiny-olmoe --prompt {Q(PROMPT)} --color-layer 1 "
                                "--out-dir {out}/r"),
    case("router_mixtral_batches", "router --weights {ck}/tiny-mixtral --prompt-file {data}/texts.txt "
                                   "--batch-size 2 --out-dir {out}/r"),
    # ---------------------------------------------------------------- toy
    case("toy_readme_tour",
         "toy create --out toy.safetensors --heads 4 --kv-heads 2 --plant geometric --plant-rank 6",
         "ov --weights toy.safetensors --num-heads 4 --layer 1 --head 2 --latent-dim 3",
         "toy trace --weights toy.safetensors --inputs anisotropic --out traces",
         "ov --weights toy.safetensors --num-heads 4 --traces traces --layer 1 --head 2 --latent-dim 3 --heatmap",
         "sphere --traces traces --out-dir sph --workers 1"),
    case("toy_variants",
         "toy create --out toy.pt --d-model 48 --heads 4 --kv-heads 1 --head-dim 8 --layers 3 --rope --no-causal "
         "--plant power --plant-decay 1.5 --seed 7",
         "toy trace --weights toy.pt --inputs random --tokens 24 --input-seed 4 --out tr_random",
         "toy trace --weights toy.pt --inputs embeddings --embeddings-from {ck}/tiny-qwen3 --tokens 30 --out tr_emb",
         "ov --weights toy.pt --num-heads 4 --layer 2 --head 1 --traces tr_emb --latent-dim 2 --json",
         "sphere --traces tr_random.safetensors --layers 1: --no-labels --out-dir sph --workers 1",
         "toy create --out flat.safetensors --heads 2 --no-norm --no-residual --plant flat --plant-rank 3"),
    case("toy_run", "toy run --out-dir run --plant geometric --plant-rank 6 --tokens 48 --kv-heads 2 --latent-dim 3"),
    case("toy_cluster_readme", "toy cluster"),
    case("toy_cluster_small", "toy cluster --tokens 12 --dim 5 --depth 3 --beta 2 --seed 3 --frame-seconds 0.2 "
                              "--out-dir {out}/c"),
    # ---------------------------------------------------------------- bad input: one line on stderr, exit 2
    case("bad_no_command", ""),
    case("bad_unknown_command", "frobnicate"),
    case("bad_ov_layer", "ov --layer 6"),
    case("bad_ov_head", "ov --layer 0 --head 12"),
    case("bad_ov_negative_head", "ov --head -1"),
    case("bad_ov_latent_dim_zero", "ov --latent-dim 0"),
    case("bad_ov_latent_dim_above_rank", "ov --layer 1 --latent-dim 33"),
    case("bad_ov_layer_not_int", "ov --layer three"),
    case("bad_ov_missing_file", "ov --weights {data}/nope.safetensors"),
    case("bad_ov_corrupt_safetensors", "ov --weights {data}/corrupt.safetensors --num-heads 4"),
    case("bad_ov_heatmap_without_prompt", "ov --heatmap"),
    case("bad_ov_empty_prompt", "ov --prompt ' '"),
    case("bad_ov_prompt_and_traces", "ov --prompt hi --traces x"),
    case("bad_ov_bare_without_num_heads", "ov --weights {ck}/qwen3-st/model.safetensors"),
    case("bad_ov_bare_contradicting_kv_heads", "ov --weights {ck}/qwen3-st/model.safetensors --num-heads 4 "
                                               "--num-kv-heads 3"),
    case("bad_ov_bare_prompt", f"ov --weights {{ck}}/qwen3-st/model.safetensors --num-heads 4 --prompt {Q(PROMPT)}"),
    case("bad_ov_unwritable_out_dir", "ov --plot --out-dir {data}/calib.txt/sub"),
    case("bad_sphere_layers_out_of_range", "sphere --prompt hi --layers 9:12 --out-dir {out}/s"),
    case("bad_sphere_layers_syntax", "sphere --prompt hi --layers one,two --out-dir {out}/s"),
    case("bad_sphere_layers_empty", "sphere --prompt hi --layers 4:2 --out-dir {out}/s"),
    case("bad_sphere_layer_list", "sphere --prompt hi --layers 1,6 --out-dir {out}/s"),
    case("bad_sphere_resid_mid_parallel", f"sphere --weights {{ck}}/tiny-neox --prompt {Q(PROMPT)} --site resid_mid "
                                          "--out-dir {out}/s"),
    case("bad_sphere_frame_seconds", "sphere --prompt hi --frame-seconds 0 --out-dir {out}/s"),
    case("bad_sphere_bare_state_dict", "sphere --weights {ck}/llama-pt/model.pt --num-heads 4 --out-dir {out}/s"),
    case("bad_sphere_prompt_too_long", "sphere --weights {ck}/tiny-phi3 --prompt-file {data}/calib.txt "
                                       "--out-dir {out}/s"),
    case("bad_sphere_prompt_file_missing", "sphere --prompt-file {data}/missing.txt --out-dir {out}/s"),
    case("bad_diagram_layer", "diagram --layer 7"),
    case("bad_diagram_bare_state_dict", "diagram --weights {ck}/qwen3-st/model.safetensors --num-heads 4"),
    case("bad_sweep_k_zero", "sweep --k 0 --out-dir {out}/sw"),
    case("bad_sweep_k_syntax", "sweep --k 8,x --out-dir {out}/sw"),
    case("bad_sweep_k_above_head_dim", "sweep --weights {ck}/tiny-qwen3 --k 8,32 --out-dir {out}/sw"),
    case("bad_sweep_target_error", "sweep --target-error 1.5 --out-dir {out}/sw"),
    case("bad_sweep_both_targets", "sweep --target-error 0.1 --target-energy 0.9"),
    case("bad_sweep_calib_missing", "sweep --calib {data}/missing.txt --out-dir {out}/sw"),
    case("bad_sweep_layers", "sweep --layers 2:9 --out-dir {out}/sw"),
    case("bad_sweep_resume_other_config", "sweep --weights {ck}/tiny-qwen3 --layers 0 --out-dir {out}/sw",
         "sweep --weights {ck}/tiny-gpt2 --resume --out-dir {out}/sw"),
    case("bad_router_dense_model", "router --weights {ck}/tiny-qwen3 --prompt hi --out-dir {out}/r"),
    case("bad_router_embedded_dense", "router --model minilm --prompt hi --out-dir {out}/r"),
    case("bad_router_color_layer", "router --weights {ck}/tiny-qwen3-moe --prompt hi --color-layer 5 "
                                   "--out-dir {out}/r"),
    case("bad_router_batch_size", "router --weights {ck}/tiny-qwen3-moe --prompt hi --batch-size 0 "
                                  "--out-dir {out}/r"),
    case("bad_toy_no_action", "toy"),
    case("bad_toy_create_suffix", "toy create --out toy.txt"),
    case("bad_toy_trace_missing_weights", "toy trace --weights {data}/missing.safetensors --out t"),
    case("bad_toy_trace_inputs", "toy create --out toy.safetensors",
         "toy trace --weights toy.safetensors --inputs embeddings --out t",
         "toy trace --weights toy.safetensors --inputs embeddings --embeddings-from {ck}/tiny-qwen3 --out t",
         "toy trace --weights toy.safetensors --inputs anisotropic --input-decay 1.5 --out t",
         "toy trace --weights toy.safetensors --tokens 1 --out t",
         "ov --weights toy.safetensors --num-heads 4 --layer 0 --traces {data}/missing"),
    case("bad_toy_cluster_tokens", "toy cluster --tokens 2 --out-dir {out}/c"),
]

# name -> (family, variant, format, perturb_norms); the model name headlens prints is the directory's name
CHECKPOINTS = {
    "tiny-qwen3": ("qwen3", "gqa", "hf_dir", False),
    "qwen3-st": ("qwen3", "gqa", "safetensors", False),
    "tiny-qwen2-sharded": ("qwen2", "mha", "hf_sharded", False),
    "tiny-llama": ("llama", "gqa", "hf_dir", False),
    "llama-pt": ("llama", "mqa", "pt", False),
    "tiny-gpt2": ("gpt2", "mha", "hf_dir", False),
    "tiny-neox": ("gpt_neox", "mha", "hf_dir", False),
    "tiny-phi3": ("phi3", "gqa", "hf_dir", False),
    "tiny-gemma2": ("gemma2", "gqa", "hf_dir", True),
    "tiny-qwen3-moe": ("qwen3_moe", "gqa", "hf_dir", False),
    "tiny-olmoe": ("olmoe", "gqa", "hf_dir", False),
    "tiny-mixtral": ("mixtral", "mqa", "hf_dir", False),
}


def build_inputs(root: Path) -> dict[str, str]:
    """Build every checkpoint and text file under ``root``; returns the placeholder -> path table."""
    from tiny_models import build_model, save_checkpoint, tokenizer_for

    root = Path(root)
    ck, data = root / "ck", root / "data"
    data.mkdir(parents=True, exist_ok=True)
    models: dict = {}
    for name, (family, variant, fmt, perturb) in CHECKPOINTS.items():
        key = (family, variant, perturb)
        if key not in models:
            models[key] = build_model(family, variant, perturb_norms=perturb)
        save_checkpoint(models[key], tokenizer_for(family), ck / name, fmt)
    (data / "calib.txt").write_text("\n".join(CALIB_LINES) + "\n", encoding="utf-8")
    (data / "prompt.txt").write_text(SHORT + "\n", encoding="utf-8")
    (data / "texts.txt").write_text("\n".join(ROUTER_TEXTS) + "\n", encoding="utf-8")
    (data / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": nonsense}" + b"\0" * 64)
    return {"{ck}": str(ck), "{data}": str(data), "<root>": str(root)}


# --------------------------------------------------------------------------------------------------------------
# running and normalising
# --------------------------------------------------------------------------------------------------------------

_TQDM = re.compile(r"\d+%\||\|\s*\d+/\d+\s*\[|\d+(?:\.\d+)?\s*(?:it|s)/(?:s|it)\b|\[\d\d:\d\d<")
_DURATION = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|s|sec|secs|seconds)\b(?![-\w])")
_ADDR = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def normalise(text: str, roots: list[str], stderr: bool = False) -> str:
    """Paths under the temporary root -> ``<TMP>``; durations (``12.3 s``, ``0.45s``, ``30 ms``) -> ``<DURATION>``;
    object addresses -> ``0x<ADDR>``; on stderr, tqdm progress-bar segments (``\\r``-separated; anything with
    ``NN%|``, ``| n/N [``, ``it/s`` or ``[00:00<``) are dropped, and lines that held nothing else."""
    for r in sorted(set(roots), key=len, reverse=True):
        text = text.replace(r, "<TMP>")
    lines = []
    for line in text.split("\n"):
        if stderr:
            parts = [p for p in line.split("\r") if p.strip() and not _TQDM.search(p)]
            if not parts and line.strip():
                continue  # a line that was only progress bars
            line = parts[-1] if parts else line
        line = _DURATION.sub("<DURATION>", line)
        line = _ADDR.sub("0x<ADDR>", line)
        lines.append(line)
    return "\n".join(lines)


@dataclass
class StepResult:
    command: str
    rc: object
    stdout: str
    stderr: str
    warnings: list[str]
    files: list[str]


def _files(root: Path) -> set[str]:
    return ({p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
             and p.name != ".headlens-manifest.json"} if root.exists() else set())  # the output sets' record


def run_argv(argv: list[str], cwd: Path) -> tuple[object, str, str, list[str]]:
    """``headlens.cli.main(argv)`` in-process, in ``cwd``: (return code, stdout, stderr, warnings)."""
    from headlens.cli import main
    from headlens.errors import HeadlensError

    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps --help text to the terminal width
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err):
            # as in a fresh process: each warning location once, the interpreter's default ignores
            warnings.simplefilter("default")
            for cat in _IGNORED_WARNINGS:
                warnings.simplefilter("ignore", cat)
            try:
                rc: object = main(argv)
            except SystemExit as exc:  # main() should turn these into return codes
                rc = f"SystemExit({exc.code!r}) escaped main()"
            except HeadlensError as exc:
                rc = f"HeadlensError escaped main(): {exc}"
            except Exception as exc:  # a crash is recorded, so the same crash compares equal
                rc = f"{type(exc).__name__} escaped main(): {exc}"
    finally:
        os.chdir(old_cwd)
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    found = [f"{w.category.__name__}: {w.message}" for w in caught]
    return rc, out.getvalue(), err.getvalue(), found


def substitute(argv: tuple[str, ...], table: dict[str, str]) -> list[str]:
    out = []
    for tok in argv:
        for key, value in table.items():
            tok = tok.replace(key, value)
        out.append(tok)
    return out


def run_case(c: Case, inputs: dict[str, str]) -> str:
    """Run every step of ``c`` in a fresh ``<root>/out/<name>`` and return the rendered, normalised record."""
    root = Path(inputs["<root>"])
    out_dir = root / "out" / c.name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    table = {**{k: v for k, v in inputs.items() if k.startswith("{")}, "{out}": str(out_dir)}
    roots = [str(root), os.path.realpath(root)]
    steps = []
    for argv in c.steps:
        before = _files(out_dir)
        rc, so, se, ws = run_argv(substitute(argv, table), out_dir)
        files = sorted(_files(out_dir) - before)
        steps.append(StepResult(command=shlex.join(("headlens", *argv)), rc=rc,
                                stdout=normalise(so, roots), stderr=normalise(se, roots, stderr=True),
                                warnings=[normalise(w, roots) for w in ws], files=files))
    return render(c, steps)


def _block(label: str, text: str) -> list[str]:
    if text == "":
        return [f"{label}: (empty)"]
    body = text[:-1] if text.endswith("\n") else text
    lines = [f"{label}:" + ("" if text.endswith("\n") else " (no final newline)")]
    return lines + ["| " + line if line else "|" for line in body.split("\n")]


def render(c: Case, steps: list[StepResult]) -> str:
    lines = [f"# golden output of headlens, case {c.name} (tests/golden/record.py; re-record: "
             "python tests/golden/record.py --record --only " + c.name + ")"]
    for i, s in enumerate(steps, 1):
        lines.append("")
        lines.append(f"=== step {i}: $ {s.command}")
        lines.append(f"exit: {s.rc}")
        lines += _block("stdout", s.stdout)
        lines += _block("stderr", s.stderr)
        if s.warnings:
            lines.append("warnings:")
            lines += ["| " + w for w in s.warnings]
        lines.append("files written:" + ("" if s.files else " (none)"))
        lines += ["  " + f for f in s.files]
    return "\n".join(lines) + "\n"


def golden_path(name: str, golden_dir: Path = GOLDEN_DIR) -> Path:
    return Path(golden_dir) / f"{name}.txt"


def diff(want: str, got: str, name: str) -> str:
    return "".join(difflib.unified_diff(want.splitlines(keepends=True), got.splitlines(keepends=True),
                                        fromfile=f"golden/{name}.txt", tofile=f"{name} (current code)", n=2))


def _check_names() -> None:
    names = [c.name for c in CASES]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"duplicate case names: {sorted(dup)}"
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names), names


_check_names()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help="write <golden-dir>/<case>.txt")
    mode.add_argument("--check", action="store_true", help="compare with <golden-dir>/<case>.txt, print diffs")
    ap.add_argument("--golden-dir", type=Path, default=GOLDEN_DIR)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these cases")
    ap.add_argument("--keep", type=Path, default=None, help="build the inputs here instead of a temporary dir")
    args = ap.parse_args(argv)

    import headlens

    print(f"headlens from {Path(headlens.__file__).parent}", file=sys.stderr)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in cases}
    if unknown:
        ap.error(f"unknown cases: {sorted(unknown)}")
    args.golden_dir.mkdir(parents=True, exist_ok=True)
    if args.record and not args.only:  # a full recording: drop goldens of cases that no longer exist
        for stale in set(args.golden_dir.glob("*.txt")) - {golden_path(c.name, args.golden_dir) for c in CASES}:
            stale.unlink()
    tmp = None
    if args.keep:
        root = args.keep
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="headlens-golden-")
        root = Path(tmp.name)
    failed = []
    try:
        t0 = time.perf_counter()
        inputs = build_inputs(root)
        print(f"inputs built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for c in cases:
            t = time.perf_counter()
            got = run_case(c, inputs)
            path = golden_path(c.name, args.golden_dir)
            if args.record:
                path.write_text(got, encoding="utf-8")
                status = "recorded"
            else:
                want = path.read_text(encoding="utf-8") if path.exists() else ""
                status = "ok" if got == want else "DIFFERS"
                if got != want:
                    failed.append(c.name)
                    print(diff(want, got, c.name), file=sys.stderr)
            print(f"{c.name:45s} {status:9s} {time.perf_counter() - t:6.2f} s", file=sys.stderr, flush=True)
        print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if failed:
        print(f"{len(failed)} case(s) differ: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
