"""A HuggingFace-style checkpoint with Qwen3-4B's attention at full size and everything else tiny.

Every layer's ``self_attn.{q,k,v,o}_proj.weight`` has the real Qwen3-4B shape (36 layers, hidden 2560,
32 query heads, 8 kv heads, head_dim 128) in bfloat16, random and seeded, scaled by ``1/sqrt(fan_in)``;
``q_norm``/``k_norm`` (head_dim,), ``input_layernorm``/``post_attention_layernorm`` (hidden,) are ones plus
a little noise; the MLP, the embedding and the vocabulary are tiny (``intermediate_size = vocab_size = 16``),
so the directory is ~1.9 GB of attention weights that transformers can still load as a Qwen3 model.

Shards (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) are written tensor by
tensor by a streaming safetensors writer (the header is computed from the shapes first), so generating
needs the memory of one tensor, not of a shard.

    python bench/make_qwen3_4b_attention.py OUT_DIR [--layers 36] [--dtype bfloat16] [--shard-layers 4]
"""

from __future__ import annotations

import argparse
import json
import struct
import time
import zlib
from pathlib import Path

import torch

_ST_NAME = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPE_BY_NAME = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}


def _layer_tensors(layer: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                   inter: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of one decoder layer, in the order HF writes them."""
    p = f"model.layers.{layer}."
    return [
        (p + "input_layernorm.weight", (hidden,), "norm"),
        (p + "mlp.down_proj.weight", (hidden, inter), "linear"),
        (p + "mlp.gate_proj.weight", (inter, hidden), "linear"),
        (p + "mlp.up_proj.weight", (inter, hidden), "linear"),
        (p + "post_attention_layernorm.weight", (hidden,), "norm"),
        (p + "self_attn.k_norm.weight", (head_dim,), "norm"),
        (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden), "linear"),
        (p + "self_attn.o_proj.weight", (hidden, heads * head_dim), "linear"),
        (p + "self_attn.q_norm.weight", (head_dim,), "norm"),
        (p + "self_attn.q_proj.weight", (heads * head_dim, hidden), "linear"),
        (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden), "linear"),
    ]


def _make(name: str, shape: tuple[int, ...], kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    # One generator per tensor, seeded from (seed, name): the values do not depend on the sharding.
    gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    if kind == "norm":
        t = 1.0 + 0.02 * torch.randn(shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    return t.to(dtype).contiguous()


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], str]], dtype: torch.dtype,
                       seed: int) -> int:
    """Stream ``entries`` into one safetensors file, one tensor in memory at a time. Returns bytes written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _ in entries:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [off, off + n * itemsize]}
        off += n * itemsize
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape, kind in entries:
            t = _make(name, shape, kind, dtype, seed)
            fh.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return 8 + len(raw) + off


def make_checkpoint(out_dir, layers: int = 36, hidden: int = 2560, heads: int = 32, kv_heads: int = 8,
                    head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    shard_layers: int = 4, vocab_size: int = 16, intermediate_size: int = 16) -> Path:
    """Write the checkpoint directory ``out_dir`` (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_layers = max(1, shard_layers)
    groups = [list(range(i, min(i + shard_layers, layers))) for i in range(0, layers, shard_layers)] or [[]]
    n = len(groups)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        entries = []
        if i == 0:
            entries.append(("model.embed_tokens.weight", (vocab_size, hidden), "linear"))
        for layer in group:
            entries.extend(_layer_tensors(layer, hidden, heads, kv_heads, head_dim, intermediate_size))
        if i == n - 1:
            entries.append(("model.norm.weight", (hidden,), "norm"))
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        total += _write_safetensors(out / fname, entries, dtype, seed)
        weight_map.update({name: fname for name, _, _ in entries})
    index = {"metadata": {"total_size": sum(
        (torch.empty((), dtype=dtype).element_size() * _numel(s)) for _, s, _ in _all_entries(
            layers, hidden, heads, kv_heads, head_dim, vocab_size, intermediate_size))},
        "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 40960,
        "max_window_layers": layers,
        "model_type": "qwen3",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _all_entries(layers, hidden, heads, kv_heads, head_dim, vocab_size, inter):
    yield "model.embed_tokens.weight", (vocab_size, hidden), "linear"
    for layer in range(layers):
        yield from _layer_tensors(layer, hidden, heads, kv_heads, head_dim, inter)
    yield "model.norm.weight", (hidden,), "norm"


def checkpoint_bytes(path) -> int:
    """Bytes of the safetensors shards under ``path``."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(_DTYPE_BY_NAME), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-layers", type=int, default=4)
    a = p.parse_args()
    t0 = time.perf_counter()
    out = make_checkpoint(a.out_dir, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                          head_dim=a.head_dim, dtype=_DTYPE_BY_NAME[a.dtype], seed=a.seed,
                          shard_layers=a.shard_layers)
    print(f"wrote {out} ({checkpoint_bytes(out) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
