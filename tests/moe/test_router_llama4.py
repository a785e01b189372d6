"""Llama 4's router (``feed_forward.router``: top-k of the logits, each weighted by its sigmoid) in ``router``,
checked against a recomputation from the router's own weights applied to its hooked inputs."""

import torch

from tiny_models import PROMPT, build_model, save_checkpoint, tokenizer_for

from headlens.io.source import ModelSource
from headlens.moe.router import RouterConfig, route


def test_llama4_routing_matches_its_router_weights(tmp_path):
    model = build_model("llama4", "gqa")
    with torch.no_grad():  # a router with a spread, so the top-k choice is not a tie
        model.model.layers[1].feed_forward.router.weight.normal_(0, 0.5)
    out = save_checkpoint(model, tokenizer_for("llama4"), tmp_path / "llama4", "hf_dir")
    res = route(ModelSource(weights=out), [PROMPT], RouterConfig(progress=False))
    assert res.report.rule == "sigmoid_topk"
    assert res.report.moe_layers == [1] and res.report.dense_layers == [0]

    router = model.model.layers[1].feed_forward.router
    seen = []
    handle = router.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([res.token_ids[0]]))
    finally:
        handle.remove()
    x = seen[0].reshape(-1, router.in_features)  # (T, d)
    logits = x @ router.weight.T  # (T, E)
    top = torch.topk(logits, router.top_k, dim=-1)
    layer = res.layers[0]
    assert torch.equal(layer.indices, top.indices)
    torch.testing.assert_close(layer.weights, torch.sigmoid(top.values), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.logits, logits, rtol=1e-5, atol=1e-6)
    counts = torch.bincount(top.indices.flatten(), minlength=router.num_experts).double()
    stats = res.report.stats[0]
    torch.testing.assert_close(torch.tensor(stats.load_share, dtype=torch.float64), counts / counts.sum())
