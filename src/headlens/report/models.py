"""The table ``headlens models`` prints."""

from __future__ import annotations


def models_table(rows: list[dict]) -> list[str]:
    head = ("name", "architecture", "layers", "d", "heads/kv", "head_dim", "experts", "params", "bf16 MB",
            "held-out CE")
    table = [head]
    for r in rows:
        prov = r.get("provenance") or {}
        experts = f"{r['experts']} top-{r['experts_per_token']}" if r.get("experts") else "-"
        ce = f"{prov['heldout_loss']:.3f}" if prov.get("heldout_loss") is not None else "-"
        table.append((r["name"], r["architecture"], str(r["layers"]), str(r["hidden_size"]),
                      f"{r['heads']}/{r['kv_heads']}", str(r["head_dim"]), experts, f"{r['parameters'] / 1e6:.2f}M",
                      f"{r['weights_bytes'] / 1e6:.1f}", ce))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        prov = r.get("provenance") or {}
        lines.append(f"{r['name']}: {r['what']}")
        if prov.get("steps"):
            lines.append(f"  trained by tools/train/train.py at {str(prov['git_commit'])[:12]}: {prov['steps']:,} "
                         f"steps, {prov['tokens_seen']:,} tokens, {prov['wall_seconds'] / 60:.0f} min, seed "
                         f"{prov['seed']}; held-out CE {prov['heldout_loss']:.4f} nats/token over "
                         f"{prov['heldout_tokens_scored']:,} tokens")
            lines.append(f"  corpus: {'; '.join(prov['corpus'])}")
        elif prov.get("source"):
            lines.append(f"  {prov['source']}")
        if r.get("moe_layers"):
            lines.append(f"  MoE layers {r['moe_layers']}, the others dense")
        lines.append(f"  {r['path']}")
    return lines
