"""What the ``toy`` commands print: the created stack, the clustering demo's metrics, and one line per head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from headlens.words import count

if TYPE_CHECKING:
    import torch

    from headlens.report.cluster import ClusterFiles
    from headlens.toy.cluster import ClusterConfig, ClusterDemo
    from headlens.toy.run import ToyHeadOV, ToyRun
    from headlens.toy.stack import ToyConfig


def create_lines(c: ToyConfig, planted: torch.Tensor | None, out: Path) -> list[str]:
    """The toy's shape, its planted spectrum (if any) and where it was saved."""
    lines = [f"toy: {count(c.n_layers, 'layer')}, d_model {c.d_model}, {count(c.n_heads, 'query head')}, "
             f"{count(c.n_kv_heads, 'kv head')}, "
             f"head_dim {c.head_dim}, causal={c.causal}, rope={c.rope}, pre_norm={c.pre_norm}, residual={c.residual}"]
    if planted is not None:
        lines.append("planted W_OV singular values: " + " ".join(f"{v:.3e}" for v in planted.tolist()))
    lines.append(f"saved toy -> {out} (config: {out}.toy.json); analyse it with: headlens ov --weights {out} "
                 f"--num-heads {c.n_heads}")
    return lines


def cluster_lines(cfg: ClusterConfig, demo: ClusterDemo, files: ClusterFiles) -> list[str]:
    """The demo's setup, clustering metrics per pictured layer, the files written and the summary sentences."""
    lines = [f"clustering demo: {cfg.tokens} tokens in {cfg.dim} dims, {count(cfg.layers, 'shared-weight layer')}, "
             "beta "
             f"{cfg.beta:g}"]
    lines += [f"layer {m.layer:3d}: mean cos {m.mean_cos:.3f}  clusters {m.n_clusters}  eff. rank "
              f"{m.effective_rank:.2f}" for m in demo.sphere.metrics]
    return lines + files.lines() + list(demo.summary)


def head_line(h: ToyHeadOV, planted: bool) -> str:
    return (f"layer {h.layer} head {h.head}: rank {h.rank}  rel_error {h.rel_error:.3e}  plain cache_error "
            f"{h.cache_error_plain:.3e}  data-aware {h.data_aware_error:.3e} (held-out "
            f"{h.heldout_data_aware:.3e} vs plain {h.heldout_plain:.3e})"
            + (f"  |sigma - planted| / sigma_1 = {h.planted_max_rel_dev:.1e}" if planted else ""))


def run_lines(run: ToyRun, json_path: Path) -> list[str]:
    """``toy run``: the toy, one line per head's OV analysis, and the files written."""
    c = run.config
    lines = [f"toy: {count(c.n_layers, 'layer')}, {count(c.n_heads, 'head')} ({c.n_kv_heads} kv), head_dim "
             f"{c.head_dim}; "
             f"{run.n_tokens} {run.inputs} tokens; latent_dim {run.latent_dim}"]
    lines += [head_line(h, run.planted is not None) for h in run.heads]
    return lines + [f"saved toy -> {run.weights}", f"saved traces -> {run.traces}", f"saved json -> {json_path}"]
