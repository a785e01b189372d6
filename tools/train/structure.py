"""What training produced: the embedded tiny-lm / tiny-moe against the same configs at initialisation (seed 0, the
exact weights train.py started from) and against the n-gram baselines.

    .venv/bin/python tools/train/structure.py --json tools/train/structure.json

Measured on the committed held-out split (tools/train/heldout.txt), the first --tokens tokens of each of its
documents, each as the model saw documents in training (<|bos|> first):
- attention sinks: per head, the mean attention from query positions 1.. to position 0 (the <|bos|>); the share of
  heads where it exceeds 0.3 (the sink measure of Xiao et al. 2023 / Gu et al. 2024);
- previous-token heads: per head, the mean attention from position t to t-1 (t >= 2); heads above 0.5 are listed,
  with the count above 0.3 and the top three;
- the residual-stream norm of the first token against the median norm of the others, at every layer's input;
- OV rank at 90% energy of every head (float64 SVD of W_O^h W_V^g), trained against initialisation;
- tiny-moe: expert load CV, normalised load entropy and per-token routing entropy per MoE layer (headlens.route),
  trained against init;
- greedy and sampled text from tiny-lm.
Independent of headlens where it can be (attention and hidden states are HuggingFace's own eager outputs); the
router statistics come from headlens.route, which tests/test_trained_decoders.py checks against the gate weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tokenizer import read_documents  # noqa: E402
from train import build_model  # noqa: E402

PROMPTS = ["The function returns", "A QuerySet is", "To install the package,", "In Python, a list"]


def batches(tok, docs: list[str], n_tokens: int) -> list[torch.Tensor]:
    out = []
    for d in docs:
        ids = tok(d, return_tensors="pt", truncation=True, max_length=n_tokens)["input_ids"]  # <|bos|> first
        assert int(ids[0, 0]) == tok.bos_token_id
        if ids.shape[1] == n_tokens:
            out.append(ids)
    return out


def attention_structure(model, inputs: list[torch.Tensor]) -> dict:
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    sink = torch.zeros(L, H, dtype=torch.float64)
    prev = torch.zeros(L, H, dtype=torch.float64)
    first_vs_median = torch.zeros(L + 1, dtype=torch.float64)
    with torch.no_grad():
        for ids in inputs:
            out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
            for l, a in enumerate(out.attentions):
                a = a[0].double()  # (H, T, T)
                sink[l] += a[:, 1:, 0].mean(-1)
                T = a.shape[-1]
                prev[l] += a[:, torch.arange(2, T), torch.arange(1, T - 1)].mean(-1)
            for l, h in enumerate(out.hidden_states):  # hidden_states[l] is layer l's input; [L] the final norm's
                n = h[0].double().norm(dim=-1)
                first_vs_median[l] += n[0] / n[1:].median()
    k = len(inputs)
    sink, prev, first_vs_median = sink / k, prev / k, first_vs_median / k
    heads = [(l, h) for l in range(L) for h in range(H)]
    return {
        "sink_share_above_0.3": float((sink > 0.3).double().mean()),
        "sink_heads": int((sink > 0.3).sum()),
        "heads": L * H,
        "sink_mean_per_layer": [round(float(x), 4) for x in sink.mean(-1)],
        "previous_token_heads_above_0.5": [{"layer": l, "head": h, "score": round(float(prev[l, h]), 3)}
                                           for l, h in heads if prev[l, h] > 0.5],
        "previous_token_heads_above_0.3": int((prev > 0.3).sum()),
        "previous_token_top3": [{"layer": int(i // H), "head": int(i % H), "score": round(float(prev.flatten()[i]), 3)}
                                for i in prev.flatten().argsort(descending=True)[:3]],
        "first_token_norm_over_median_per_layer_input": [round(float(x), 2) for x in first_vs_median[:L]],
    }


def ov_rank90(model) -> list[int]:
    cfg = model.config
    H, G, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ranks = []
    for layer in model.model.layers:
        Wv = layer.self_attn.v_proj.weight.detach().double()
        Wo = layer.self_attn.o_proj.weight.detach().double()
        for h in range(H):
            g = h // (H // G)
            s = torch.linalg.svdvals(Wo[:, h * hd:(h + 1) * hd] @ Wv[g * hd:(g + 1) * hd])
            E = torch.cumsum(s**2, 0) / (s**2).sum()
            ranks.append(int(torch.searchsorted(E, torch.tensor(0.9, dtype=E.dtype))) + 1)
    return ranks


def summary(ranks: list[int]) -> dict:
    t = torch.tensor(ranks, dtype=torch.float64)
    return {"mean": round(float(t.mean()), 2), "median": float(t.median()), "min": int(t.min()), "max": int(t.max())}


def router_stats(directory: Path, texts: list[str]) -> list[dict]:
    from headlens import ModelSource, RouterConfig, route

    r = route(ModelSource(weights=str(directory)), texts, RouterConfig(progress=False, batch_size=8))
    return [{"layer": layer, "load_cv": round(s.load_cv, 4), "load_entropy_norm": round(s.load_entropy_norm, 4),
             "routing_entropy_norm": round(s.routing_entropy_norm, 4), "dead_experts": s.dead_experts} for layer, s in zip(r.report.moe_layers, r.report.stats)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128, help="tokens per held-out document (shorter ones skipped)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["tiny-lm", "tiny-moe"], choices=["tiny-lm", "tiny-moe"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from headlens.io.embedded import embedded_dir, provenance

    docs = read_documents(HERE / "heldout.txt")
    result: dict = {"tokens_per_document": args.tokens}
    for name in args.models:
        d = embedded_dir(name)
        tok = AutoTokenizer.from_pretrained(str(d))
        inputs = batches(tok, docs, args.tokens)
        trained = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        init = build_model(name, tok, provenance(name)["seq_len"], seed=provenance(name)["seed"],
                           intermediate=trained.config.intermediate_size if name == "tiny-lm" else None)
        init.set_attn_implementation("eager")
        init.eval()
        entry = {"documents": len(inputs), "heldout_loss": provenance(name)["heldout_loss"]}
        for label, m in (("trained", trained), ("init", init)):
            entry[label] = attention_structure(m, inputs)
            entry[label]["ov_rank_e90"] = summary(ov_rank90(m))
        if name == "tiny-moe":
            import tempfile

            texts = [tok.decode(ids[0, 1:]) for ids in inputs]
            entry["trained"]["router"] = router_stats(d, texts)
            with tempfile.TemporaryDirectory() as tmp:
                init.to(torch.bfloat16).save_pretrained(tmp)
                tok.save_pretrained(tmp)
                entry["init"]["router"] = router_stats(Path(tmp), texts)
        if name == "tiny-lm":
            samples = []
            for prompt in PROMPTS:
                enc = tok(prompt, return_tensors="pt")
                with torch.no_grad():
                    greedy = trained.generate(**enc, max_new_tokens=40, do_sample=False,
                                              pad_token_id=tok.pad_token_id)
                    set_seed(0)
                    sampled = trained.generate(**enc, max_new_tokens=40, do_sample=True, temperature=0.8,
                                               top_p=0.95, pad_token_id=tok.pad_token_id)
                samples.append({"prompt": prompt, "greedy": tok.decode(greedy[0, 1:], skip_special_tokens=True),
                                "sampled_t0.8_top_p0.95_seed0": tok.decode(sampled[0, 1:], skip_special_tokens=True)})
            entry["samples"] = samples
        result[name] = entry
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
