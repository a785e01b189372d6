"""``headlens ov`` outputs: the seed tool's lines and headlens' own, the spectrum plot, the attention heatmap
and the JSON file. Takes an :class:`~headlens.circuits.ov.OVResult`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from headlens.circuits.ov import OVResult
from headlens.errors import as_flags
from headlens.io.quantized import weights_line
from headlens.report.figures import _pyplot, save_figure
from headlens.words import count


def default_stem(model_name: str, layer: int, head: int) -> str:
    """``<model>_layer<L>_head<H>``, as the seed tool named its plots."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name) or "model"
    return f"{safe}_layer{layer}_head{head}"


@dataclass
class OVFiles:
    """Where the report goes; None: not asked for."""

    plot: Path | None  # the spectrum / cumulative energy PNG
    heatmap: Path | None  # the attention heatmap PNG
    json: Path | None  # every number of the OVResult

    @classmethod
    def choose(cls, model_name: str, layer: int, head: int, out_dir: Path, plot: bool = False,
               plot_path: str | None = None, heatmap: bool = False, json: str | None = None) -> "OVFiles":
        """The seed's names under ``out_dir`` (``<stem>.png``, ``<stem>_heatmap.png``, ``<stem>.json``);
        ``plot_path`` moves the plot (and the heatmap next to it); ``json=""`` means the default name."""
        stem = default_stem(model_name, layer, head)
        plot_file = Path(plot_path) if plot_path else out_dir / f"{stem}.png"
        heatmap_file = plot_file.with_name(plot_file.stem + "_heatmap.png") if plot_path \
            else out_dir / f"{stem}_heatmap.png"
        json_file = None if json is None else (Path(json) if json else out_dir / f"{stem}.json")
        return cls(plot=plot_file if plot or plot_path is not None else None,
                   heatmap=heatmap_file if heatmap else None, json=json_file)

    @property
    def qk_plot(self) -> Path | None:
        """The QK circuit's spectrum plot: the plot's name with ``_qk`` before the suffix."""
        return None if self.plot is None else self.plot.with_name(self.plot.stem + "_qk" + self.plot.suffix)

    def directories(self) -> list[Path]:
        """The directories the files go into (plot, heatmap, json order), to check before any work."""
        return [p.parent for p in (self.plot, self.heatmap, self.json) if p is not None]


def write_ov_outputs(result: OVResult, files: OVFiles) -> list[str]:
    """Write the files ``files`` names (recording them in ``result.files``); returns the lines to print."""
    from headlens.io.files import write_json

    name = result.model["name"]
    ov = result.circuit != "qk"
    lines = report_lines(result) if ov else [report_lines(result)[0]]
    if files.plot is not None and ov:
        title = f"{name} layer {result.layer} head {result.head}: W_OV spectrum (rank {result.rank})"
        save_spectrum_plot(files.plot, result.singular_values, result.cumulative_energy, result.latent_dim, title,
                           rank=result.rank)
        result.files["plot"] = str(files.plot)
        lines.append(f"saved plot -> {files.plot}")
    if files.heatmap is not None:
        assert result.attention is not None and result.tokens is not None
        title = f"{name} layer {result.layer} head {result.head} (kv head {result.kv_head}): attention"
        save_attention_heatmap(files.heatmap, np.asarray(result.attention), result.tokens, title)
        result.files["heatmap"] = str(files.heatmap)
        lines.append(f"saved heatmap -> {files.heatmap}")
    if ov:
        lines.extend(extra_lines(result))
    if result.qk is not None:
        lines.extend(qk_lines(result))
        if files.qk_plot is not None:
            q = result.qk
            title = f"{name} layer {result.layer} head {result.head}: W_QK spectrum (rank {q.rank})"
            save_spectrum_plot(files.qk_plot, q.singular_values, q.cumulative_energy, q.latent_dim, title,
                               rank=q.rank, matrix="W_{QK}")
            result.files["qk_plot"] = str(files.qk_plot)
            lines.append(f"saved qk plot -> {files.qk_plot}")
    if files.json is not None:
        result.files["json"] = str(files.json)
        write_json(files.json, result.to_json())
        lines.append(f"saved json -> {files.json}")
    return lines


def _fmt_list(values: list[float], fmt: str, n: int = 10) -> str:
    return " ".join(format(v, fmt) for v in values[:n])


def report_lines(r: OVResult) -> list[str]:
    """The seed tool's lines, in its order and number formats (file lines are added by the caller)."""
    return [
        f"layer={r.layer} head={r.head} num_heads={r.num_heads} num_value_heads={r.num_value_heads}",
        f"W_OV shape: ({r.shape[0]}, {r.shape[1]}) rank: {r.rank}",
        f"condition number: {r.condition_number:.3e}",
        f"latent_dim={r.latent_dim} rel_error={r.rel_error:.3e} cache_error={r.cache_error:.3e}",
        f"singular values (top 10): {_fmt_list(r.singular_values, '.3e')}",
        f"cumulative energy (top 10): {_fmt_list(r.cumulative_energy, '.3f')}",
    ]


def _inputs_subject(cache_inputs: str) -> str:
    """The inputs as the subject of a sentence, with its verb: ``"the prompt has"``, ``"the traces have"``."""
    return {"prompt": "the prompt has", "traces": "the traces have"}.get(cache_inputs, f"the {cache_inputs} have")


def _inputs_line(r: OVResult) -> str:
    if r.cache_inputs == "prompt":
        return (f"cache_error inputs: the prompt's {count(r.cache_tokens, 'token')} at the input of layer "
                f"{r.layer}'s attention")
    if r.cache_inputs == "traces":
        return (f"cache_error inputs: {count(r.cache_tokens, 'traced token')} at the input of layer {r.layer}'s "
                f"attention (toy traces)")
    return (f"cache_error inputs: {r.cache_tokens} seeded Gaussian probe tokens (seed {r.seed}); "
            f"pass --prompt to use real activations")


def extra_lines(r: OVResult) -> list[str]:
    """What headlens adds after the seed's lines: definitions and the data-aware comparison."""
    group = r.num_heads // r.num_value_heads
    kind = "MHA" if group == 1 else ("MQA" if r.num_value_heads == 1 else "GQA")
    norm = "no" if not r.norm_folded else "yes"
    lines = [
        f"condition number is sigma_1/sigma_r over the numerical rank r={r.rank} "
        f"(tolerance {r.rank_tolerance:.3e} = max(d, d) * eps({r.rank_eps_dtype}) * sigma_1)",
        f"head map: query head {r.head} reads kv head {r.kv_head} ({kind}, {group} query head(s) per kv head), "
        f"head_dim={r.head_dim} hidden_size={r.hidden_size}; norm gain folded: {norm}"
        + (f" ({r.norm_key})" if r.norm_key and r.norm_folded else ""),
        _inputs_line(r),
    ]
    quantized = weights_line(r.model)
    if quantized:
        lines.append(quantized)  # the spectrum is the dequantized weights'
    lines += _latent_attention_lines(r)
    da = r.data_aware
    if da is not None:
        lines.append(f"latent_dim={r.latent_dim} on the {r.cache_inputs}: data-aware (whitened) error="
                     f"{da.whitened_error:.3e} plain cache_error={da.plain_cache_error:.3e} (in-sample, "
                     f"{count(da.n_tokens, 'token')})")
        if da.heldout_whitened_error is not None and da.heldout_plain_error is not None:
            lines.append(f"held-out (fit on {da.heldout_fit_tokens} even-position tokens, measured on "
                         f"{da.heldout_test_tokens} odd ones): data-aware error={da.heldout_whitened_error:.3e} "
                         f"plain cache_error={da.heldout_plain_error:.3e}")
        if da.n_tokens <= r.latent_dim:
            lines.append(f"note: {_inputs_subject(r.cache_inputs)} {count(da.n_tokens, 'token')} <= latent_dim "
                         f"{r.latent_dim}, so the data-aware latent is exact on {'it' if da.n_tokens == 1 else 'them'}; "
                         f"use more tokens to measure it")
    return lines


def qk_lines(r: OVResult) -> list[str]:
    """The QK circuit's lines: the seed's spectral lines for W_QK, its definition, the prompt's logits, and what the
    form leaves out."""
    q = r.qk
    assert q is not None
    lines = [
        f"W_QK shape: ({q.shape[0]}, {q.shape[1]}) rank: {q.rank}",
        f"W_QK condition number: {q.condition_number:.3e}",
        f"W_QK latent_dim={q.latent_dim} rel_error={q.rel_error:.3e}",
        f"W_QK singular values (top 10): {_fmt_list(q.singular_values, '.3e')}",
        f"W_QK cumulative energy (top 10): {_fmt_list(q.cumulative_energy, '.3f')}",
        f"W_QK = (W_Q^h)^T W_K^g: query head {r.head} reads key head {q.kv_head}; logit of query x_s on key x_t = "
        f"x_s^T W_QK x_t / sqrt(head_dim); condition number over the numerical rank r={q.rank} (tolerance "
        f"{q.rank_tolerance:.3e} = max(d, d) * eps({q.rank_eps_dtype}) * sigma_1)",
    ]
    if q.prompt_logit_rel_error is not None:
        where = "causal positions, key <= query" if q.prompt_positions == "causal" else "all positions, an encoder"
        tokens = count(q.prompt_tokens or 0, "token")
        lines.append(f"W_QK latent_dim={q.latent_dim} on the {r.cache_inputs}'s logits ({tokens}, "
                     f"{where}): logit rel_error={q.prompt_logit_rel_error:.3e} "
                     f"attention KL(full || rank-k)={q.prompt_attention_kl:.3e} nats (mean over queries)")
    else:
        lines.append("W_QK on real tokens: pass --prompt to measure the rank-k form's logit error and attention KL")
    lines += [f"W_QK leaves out / folds in: {as_flags(note)}" for note in q.notes]  # `fold_norm` as its flag
    return lines


def _latent_attention_lines(r: OVResult) -> list[str]:
    """For a multi-head latent attention checkpoint: what W_OV is, and how much of the cached latent is read."""
    m = r.latent
    if not m:
        return []
    r_kv = m["kv_lora_rank"]
    return [
        f"multi-head latent attention: W_OV = W_O^h W_UV^h diag(gamma) W_DKV through the cached latent of "
        f"kv_lora_rank={r_kv} (rank <= min(v_head_dim={r.head_dim}, {r_kv})); {m['note']}"
        + ("; the prompt's tokens are scaled by it" if r.cache_inputs == "prompt" else ""),
        f"latent use: head {r.head} reads {m['head_latent_e90']} of the {r_kv} latent directions at 90% energy "
        f"({m['head_latent_e99']} at 99%); layer {r.layer}'s heads together {m['layer_latent_e90']} "
        f"({m['layer_latent_e99']}); the shared latent map diag(gamma) W_DKV has rank {m['latent_map_rank']}",
    ]


# ---------------------------------------------------------------------------------------------- figures


def save_spectrum_plot(path: Path, singular_values: Sequence[float], energy: Sequence[float], latent_dim: int,
                       title: str, rank: int | None = None, matrix: str = "W_{OV}") -> Path:
    """Singular values (log scale) and cumulative energy with the latent dim marked."""
    plt = _pyplot()
    s = np.asarray(singular_values, dtype=float)
    e = np.asarray(energy, dtype=float)
    idx = np.arange(1, len(s) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    positive = s > 0
    ax1.semilogy(idx[positive], s[positive], marker=".", lw=1)
    ax1.axvline(latent_dim, color="C3", ls="--", lw=1, label=f"latent dim k={latent_dim}")
    if rank is not None and rank < len(s):
        ax1.axvline(rank, color="0.5", ls=":", lw=1, label=f"numerical rank {rank}")
    ax1.set_xlabel("index i")
    ax1.set_ylabel("singular value $\\sigma_i$")
    ax1.set_title(f"singular spectrum of ${matrix}$")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.plot(idx, e, marker=".", lw=1)
    ax2.axvline(latent_dim, color="C3", ls="--", lw=1)
    if 0 < latent_dim <= len(e):
        ek = e[latent_dim - 1]
        ax2.axhline(ek, color="C3", ls=":", lw=1)
        ax2.annotate(f"E_{latent_dim} = {ek:.3f}", (latent_dim, ek), textcoords="offset points",
                     xytext=(6, -14), color="C3")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("k")
    ax2.set_ylabel("cumulative energy $E_k$")
    ax2.set_title("$E_k = \\sum_{i\\leq k} \\sigma_i^2 / \\sum_i \\sigma_i^2$")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


HEATMAP_DPI = 110
HEATMAP_FONTSIZE = 8  # tick labels, in points
HEATMAP_PITCH_IN = 0.2  # inches of heatmap per token up to 40 tokens (8 pt labels need ~0.15)
HEATMAP_SIDE_IN = (3.0, 8.0)  # the heatmap's side in inches, at least and at most


def attention_heatmap_figure(probs: np.ndarray, tokens: Sequence[str], title: str):
    """The figure of :func:`save_attention_heatmap` (a matplotlib ``Figure``, not yet saved).

    ``probs`` is (N, N), query rows x key columns. Up to 40 tokens every one is labelled; above that every
    s-th (s = 2, 5, 10, 20, 50, ..., at most 40 labels an axis, each ``"<position>: <token>"``). The size is
    bounded: the heatmap is 3 to 8 inches a side whatever N, its labels (cut to 14 characters) placed around
    it by :func:`~headlens.report.panels.place_panels` (at most ~11 x 11 inches in all).
    """
    from headlens.report.labels import tick_positions, tick_step, token_label
    from headlens.report.panels import place_panels

    n = len(tokens)
    assert probs.shape == (n, n), (probs.shape, n)
    plt = _pyplot()
    ticks = tick_positions(n)
    step = tick_step(n)
    labels = [token_label(tokens[i]) if step == 1 else f"{i}: {token_label(tokens[i], 10)}" for i in ticks]
    side = min(max(HEATMAP_PITCH_IN * n, HEATMAP_SIDE_IN[0]), HEATMAP_SIDE_IN[1])
    fig = plt.figure(dpi=HEATMAP_DPI)
    ax, cax = fig.add_axes((0.1, 0.1, 0.5, 0.5)), fig.add_axes((0.7, 0.1, 0.05, 0.5))
    im = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=max(float(np.max(probs)), 1e-12), aspect="auto",
                   interpolation="nearest" if n <= 400 else "antialiased")  # square: the box is square
    ax.set_xticks(ticks, labels, rotation=90, fontsize=HEATMAP_FONTSIZE)
    ax.set_yticks(ticks, labels, fontsize=HEATMAP_FONTSIZE)
    ax.set_xlabel("key token (attended to)" + ("" if step == 1 else f"; a label every {step} tokens"))
    ax.set_ylabel("query token")
    fig.colorbar(im, cax=cax, label="attention probability")
    place_panels(fig, [[ax]], (side, side), cax, title=title, title_size=10)
    return fig


def save_attention_heatmap(path: Path, probs: np.ndarray, tokens: Sequence[str], title: str) -> Path:
    """Attention probabilities ``probs`` (N, N), query rows x key columns, labelled with the decoded tokens
    (:func:`attention_heatmap_figure`), saved as a PNG at 110 dpi (at most ~1250 x 1250 px); returns ``path``."""
    return save_figure(attention_heatmap_figure(probs, tokens, title), path, dpi=HEATMAP_DPI)
