"""What every subcommand shares: the one-line-error parser, integer parsing, and the model flags."""

from __future__ import annotations

import argparse

from headlens.errors import as_flags
from headlens.selection import DTYPE_CHOICES

# Library parameters whose flag is not spelled --<name with dashes>, for every command and per command.
FLAG_NAMES = {"ks": "--k", "embedded": "--model"}
COMMAND_FLAG_NAMES = {"toy": {"n_heads": "--heads", "n_kv_heads": "--kv-heads", "n_layers": "--layers",
                              "kind": "--plant", "rank": "--plant-rank", "decay": "--plant-decay",
                              "layers": "--depth"},
                      "compress": {"target_errors": "--target-error", "target_energies": "--target-energy",
                                   "latents": "--latent", "eval_texts": "--eval", "calib_texts": "--calib",
                                   "key_ks": "--key-k", "savings": "--saving"},
                      "sweep": {"calibration": "--calib", "with_qk": "--no-qk"},
                      "router": {"texts": "--prompt"},
                      "generate": {"prompts": "--prompt", "calib_texts": "--calib", "latent": "--latent"}}


def with_flags(message: str, command: str) -> str:
    """A library message (parameters in backticks) as ``command`` shows it: each parameter as its flag."""
    return as_flags(message, {**FLAG_NAMES, **COMMAND_FLAG_NAMES.get(command, {})})


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def command_parser(sub, name: str, help: str, description: str, default_model: str = "minilm"
                   ) -> argparse.ArgumentParser:
    """The subcommand ``name`` with the model flags every command that reads a checkpoint shares."""
    p = sub.add_parser(name, help=help, description=description)
    add_model_args(p, default_model)
    return p


def add_model_args(p: argparse.ArgumentParser, default_model: str = "minilm") -> None:
    """Flags every command shares to pick a checkpoint; ``default_model`` is the embedded model used when none
    of ``--model``, ``--weights`` and ``--hf-repo`` is given."""
    from headlens.io.embedded import NAMES

    p.set_defaults(default_model=default_model)
    g = p.add_argument_group(f"model (default: --model {default_model}, an embedded checkpoint)")
    g.add_argument("--model", choices=NAMES, metavar="NAME",
                   help=f"an embedded checkpoint: {', '.join(NAMES)} (default {default_model}; "
                        "`headlens models` lists them)")
    g.add_argument("--weights", metavar="PATH",
                   help="a .safetensors file, a .pt/.bin state dict, or a HuggingFace model directory "
                        "(single-file or sharded)")
    g.add_argument("--hf-repo", metavar="ORG/NAME",
                   help="a hub repo read through the local hub cache, e.g. Qwen/Qwen3-0.6B "
                        "(honours HF_HUB_OFFLINE; downloads only the files needed)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) for --hf-repo")
    g.add_argument("--cache-dir", metavar="DIR", help="hub cache directory (default: HF_HUB_CACHE)")
    g.add_argument("--auto-infer", action="store_true",
                   help="read layers, heads, kv heads, head_dim and hidden size from config.json")
    g.add_argument("--num-heads", type=int_arg, metavar="H",
                   help="query heads, for a bare state dict without config.json")
    g.add_argument("--num-kv-heads", type=int_arg, metavar="G",
                   help="key/value heads (GQA/MQA), for a bare state dict; inferred from shapes if omitted")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub repo's own modeling code (off unless you ask for it)")
    add_placement_args(p)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Where the model runs and in what precision (headlens.io.placement)."""
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", metavar="DEV",
                   help="auto, cpu, cuda, cuda:N or mps (default: $HEADLENS_DEVICE, else auto = CUDA when "
                        "present, else the CPU); captured values come back to the CPU")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="precision the weights are rounded to and the model runs in (default auto: float32 on "
                        "the CPU, the checkpoint's own torch_dtype on an accelerator); spectra are always "
                        "accumulated in float64 (float32 on mps, said in the output)")
    g.add_argument("--device-map", metavar="MAP",
                   help="place the model with accelerate: auto, balanced, sequential, or a JSON file mapping "
                        "module names to devices (cpu, disk, 0, cuda:1, ...); for models larger than one GPU "
                        "or than RAM")
    g.add_argument("--max-memory", metavar="SPEC",
                   help="with --device-map: memory per device in accelerate's syntax, e.g. 0=20GiB,1=20GiB,"
                        "cpu=60GiB")
    g.add_argument("--offload-dir", metavar="DIR",
                   help="with --device-map: where the weights that fit nowhere else are offloaded to disk")



def model_source(args: argparse.Namespace):
    """The :class:`~headlens.io.source.ModelSource` the model flags name."""
    from headlens.io.source import ModelSource

    embedded = args.model
    if embedded is None and args.weights is None and args.hf_repo is None:
        embedded = args.default_model
    return ModelSource(weights=args.weights, hf_repo=args.hf_repo, revision=args.revision, cache_dir=args.cache_dir,
                       auto_infer=args.auto_infer, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                       trust_remote_code=args.trust_remote_code, embedded=embedded, device=args.device,
                       device_map=args.device_map, max_memory=args.max_memory, offload_dir=args.offload_dir)


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """Where the work runs (headlens.executor): here in order, or as Ray tasks."""
    from headlens.executor import EXECUTORS

    g = p.add_argument_group("executor")
    g.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="serial (default: here, one layer after the other) or ray (one task per block of layers, "
                        "each reading only its own tensors; needs the extra: pip install 'headlens[ray]')")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="with --executor ray: join this running cluster (auto, HOST:6379, ray://HOST:10001) "
                        "instead of starting a local Ray for the run")
    g.add_argument("--workers", type=int_arg, metavar="N",
                   help="with --executor ray and no --ray-address: CPUs of the local Ray (default: this machine's)")
    g.add_argument("--layers-per-task", type=int_arg, metavar="N",
                   help="with --executor ray: layers per task (default: about two tasks per CPU)")


def executor_from(args: argparse.Namespace):
    """The executor the flags name (enter it around the run), refusing the Ray flags without ``--executor ray``."""
    from headlens.executor import check_layers_per_task, make_executor

    check_layers_per_task(args.layers_per_task, args.executor)
    return make_executor(args.executor, args.ray_address, args.workers)
