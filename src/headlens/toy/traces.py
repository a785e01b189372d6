"""Inputs for a toy stack, its activation traces (saved and loaded), and its residual stream on the sphere.

A trace file is a pair ``<stem>.safetensors`` + ``<stem>.json`` (see :func:`save_traces`); ``headlens ov
--traces`` reads the attention inputs and probabilities from it, ``headlens sphere --traces`` the stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from headlens.errors import HeadlensError

if TYPE_CHECKING:
    from headlens.residual.sphere import SphereConfig, SphereResult
    from headlens.toy.stack import ToyStack

INPUT_KINDS = ("random", "anisotropic", "embeddings")
MAX_TOKENS = 8192  # traced tokens: each layer keeps (H, N, N) attention probabilities
# Names of the token-embedding matrix in the families headlens reads (Llama-like, BERT, GPT-2, GPT-NeoX).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight")


@dataclass
class TraceInputs:
    """The tokens fed to a toy: how many and of which kind."""

    inputs: str = "anisotropic"  # "random" (isotropic), "anisotropic" or "embeddings" (a real checkpoint's rows)
    tokens: int = 256  # number of tokens N
    input_decay: float = 0.8  # anisotropic: covariance eigenvalues decay^i in a random basis
    input_seed: int = 1  # seed of the inputs (and of the embedding rows drawn)
    embeddings_from: str | None = None  # HuggingFace model directory whose token embeddings feed the toy

    def validate(self) -> None:
        """Raise a HeadlensError naming ``inputs``, ``tokens``, ``input_decay`` or ``embeddings_from``."""
        if self.inputs not in INPUT_KINDS:
            raise HeadlensError(f"`inputs` {self.inputs!r}: choose {', '.join(INPUT_KINDS)}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or not 2 <= self.tokens <= MAX_TOKENS:
            raise HeadlensError(f"`tokens` must be an integer in 2..{MAX_TOKENS}, got {self.tokens}")
        if not 0 < self.input_decay <= 1:  # also refuses nan
            raise HeadlensError(f"`input_decay` must be in (0, 1], got {self.input_decay:g}")
        if self.inputs == "embeddings" and not self.embeddings_from:
            raise HeadlensError("`inputs` embeddings needs `embeddings_from` DIR (a HuggingFace model directory)")


def make_inputs(kind: str, n_tokens: int, d: int, seed: int = 0, decay: float = 0.8,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Token inputs (N, d): ``random`` (isotropic Gaussian), ``anisotropic`` (covariance eigenvalues decay^i in a
    random basis) or ``embeddings`` (rows of a real checkpoint's embedding matrix, given)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n_tokens, d, generator=gen)
    if kind == "anisotropic":
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        scales = decay ** torch.arange(d, dtype=torch.float64)
        return ((torch.randn(n_tokens, d, generator=gen, dtype=torch.float64) * scales) @ Q.T).float()
    if kind == "embeddings":
        if embeddings is None or embeddings.shape[1] != d:
            raise HeadlensError(f"embedding inputs need an embedding matrix of width {d}")
        idx = torch.randint(0, embeddings.shape[0], (n_tokens,), generator=gen)
        return embeddings[idx].float()
    raise HeadlensError(f"unknown inputs {kind!r}: choose random, anisotropic or embeddings")


def embedding_matrix(directory: str, d_model: int) -> torch.Tensor:
    """The token-embedding matrix (vocab, d_model) of the checkpoint in ``directory``, as float32."""
    from headlens.io.tensors import open_path

    src = open_path(Path(directory))
    names = [k for k in src.keys() if k.endswith(EMBEDDING_SUFFIXES)]
    if not names:
        raise HeadlensError(f"no token embedding matrix found in {directory}")
    emb = src.read(names[0]).float()
    assert emb.ndim == 2, f"{names[0]} has shape {tuple(emb.shape)}, expected (vocab, d)"
    if emb.shape[1] != d_model:
        raise HeadlensError(f"the embeddings are {emb.shape[1]} wide but the toy's d_model is {d_model}: create the "
                            f"toy with `d_model` {emb.shape[1]}")
    return emb


def toy_inputs(spec: TraceInputs, d_model: int) -> torch.Tensor:
    """The (N, d_model) inputs ``spec`` describes; checks its options first."""
    spec.validate()
    emb = None
    if spec.inputs == "embeddings":
        emb = embedding_matrix(spec.embeddings_from, d_model)
    return make_inputs(spec.inputs, spec.tokens, d_model, seed=spec.input_seed, decay=spec.input_decay,
                       embeddings=emb)


# ------------------------------------------------------------------------------------------- traces


def trace(model: ToyStack, x: torch.Tensor) -> list[dict]:
    """Run ``x`` (N, d) through the stack and return every layer's trace (see :func:`save_traces`)."""
    traces: list[dict] = []
    with torch.no_grad():
        model(x, traces)
    return traces


def save_traces(path: Path, model: ToyStack, traces: list[dict], meta: dict | None = None) -> tuple[Path, Path]:
    """``<path>.safetensors`` with, per layer l: ``layer{l}.input`` (N, d) residual stream in,
    ``layer{l}.attn_in`` (N, d) attention input, ``layer{l}.q`` (H, N, hd), ``layer{l}.k``/``.v`` (G, N, hd),
    ``layer{l}.probs`` (H, N, N), ``layer{l}.head_out`` (H, N, d), ``layer{l}.output`` (N, d); and
    ``<path>.json`` with the config and metadata. Returns the two paths."""
    from safetensors.torch import save_file

    from headlens.io.files import atomic_path, write_json

    tensors = {f"layer{l}.{k}": v.detach().float().contiguous().clone() for l, t in enumerate(traces)
               for k, v in t.items()}
    st, js = Path(str(path) + ".safetensors"), Path(str(path) + ".json")
    with atomic_path(st) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "headlens-toy-traces"})
    write_json(js, {"config": asdict(model.cfg), "layers": len(traces), "tokens": int(traces[0]["input"].shape[0]),
                    **(meta or {})})
    return st, js


def load_traces(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a trace file written by :func:`save_traces` (path with or without suffix)."""
    from headlens.io.files import read_json_and_tensors

    return read_json_and_tensors(path, "traces")


def trace_stream(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The residual stream of a trace: ``{l: input of layer l}`` for each layer, then ``{L: output of the last
    layer}``; each (N, d)."""
    n = int(meta["layers"])
    stream = {l: tensors[f"layer{l}.input"] for l in range(n)}
    stream[n] = tensors[f"layer{n - 1}.output"]
    tokens = int(meta["tokens"])
    for l, x in stream.items():
        assert x.ndim == 2 and x.shape[0] == tokens, f"stream state {l} has shape {tuple(x.shape)}, {tokens} tokens"
    return stream


def sphere_from_traces(path: str | Path, cfg: SphereConfig,
                       on_checked: Callable[[], object] | None = None) -> SphereResult:
    """The stream states of a trace file (layer inputs, then the last layer's output) on the unit sphere, as
    ``headlens sphere`` projects a model's; ``cfg.layers`` selects among the L + 1 states. ``on_checked`` is
    called once the file is read and the selection checked, before projecting. Returns a
    :class:`~headlens.residual.sphere.SphereResult`."""
    from headlens.residual.sphere import sphere_from_stream
    from headlens.selection import parse_layers

    cfg.check()
    meta, tensors = load_traces(path)
    stream = trace_stream(meta, tensors)
    n = len(stream) - 1
    layers = parse_layers(cfg.layers, n + 1)
    hidden = {l: stream[l].double() for l in layers}
    tokens = [f"t{i}" for i in range(int(meta["tokens"]))]
    name = Path(path).name.removesuffix(".safetensors").removesuffix(".json")
    header = (f"{name}: {len(tokens)} traced tokens, {len(layers)} of {n + 1} stream states (layer inputs, then the "
              f"last layer's output) from {path}")
    if on_checked is not None:
        on_checked()
    return sphere_from_stream(hidden, tokens, cfg, name=name,
                              model={"name": name, "source": str(path), **meta.get("config", {})}, header=header)
