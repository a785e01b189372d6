"""``headlens sweep`` on a multi-head latent attention checkpoint: the per-head and per-layer tables, the summary
JSON and the lines it prints. Takes a :class:`~headlens.circuits.mla.MLASweepResult`."""

from __future__ import annotations

from pathlib import Path

from headlens.circuits.mla import MLASweepResult


def mla_lines(r: MLASweepResult) -> list[str]:
    """A header, one line per layer, and what the cache holds against per-head keys and values."""
    m = r.mla
    lines = [f"{r.name}: multi-head latent attention, {m.num_layers} layers, {m.num_heads} heads, kv_lora_rank "
             f"{m.kv_lora_rank} (+ {m.qk_rope_head_dim} RoPE key dims), v_head_dim {m.v_head_dim}, hidden "
             f"{m.hidden_size}; sweeping {len(r.layers)} layer(s)"]
    for row in r.layer_rows():
        lines.append(f"layer {row['layer']:3d}: heads read {row['head_latent_e90_mean']:.1f} (max "
                     f"{row['head_latent_e90_max']}) of {row['kv_lora_rank']} latent directions at 90% energy; "
                     f"all heads together {row['layer_latent_e90']} (99%: {row['layer_latent_e99']}); latent map "
                     f"rank {row['latent_map_rank']}")
    lines.append(f"KV bytes/token/layer: {r.kv_bytes_latent} cached as the latent (+RoPE key) vs "
                 f"{r.kv_bytes_expanded} for per-head keys and values ({r.kv_bytes} bytes per value)")
    lines.append(f"note: {r.layers[0].note}" if r.layers else "note: no layer selected")
    return lines


def write_mla_report(r: MLASweepResult, out_dir: Path, json_path: Path | None = None) -> list[Path]:
    """``sweep_mla_heads.csv``, ``sweep_mla_layers.csv`` and ``sweep_summary.json``; returns the paths."""
    from headlens.io.files import write_json
    from headlens.io.tables import write_csv

    paths = [write_csv(out_dir / "sweep_mla_heads.csv", r.head_rows()),
             write_csv(out_dir / "sweep_mla_layers.csv", r.layer_rows())]
    paths.append(write_json(json_path or out_dir / "sweep_summary.json", r.to_json()))
    return paths
