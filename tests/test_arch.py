"""The spec table's layout records (headlens.arch.Layout) against slices written out by hand.

For every layout in the table a tiny checkpoint of a family that uses it is built (tests/tiny_models.py), and each
head's q/k/v/o block, the whole-layer split and the kv-head count inferred from the shapes are compared with explicit
slices of the HuggingFace module weights written out below (independent of the Layout code), for MHA, MQA and GQA
where the family can express them.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import _layers
from tiny_models import hidden_size, kv_heads, variants_of

from headlens.arch import GENERIC, SPECS, Layout
from headlens.circuits.heads import read_head, read_layer
from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.io.checkpoint import open_model

H, HD = 4, 16  # every tiny model: 4 query heads of dim 16

# The tiny_models families that exercise each layout of the table (each layout: every generation that uses it).
LAYOUT_FAMILIES = {
    SPECS["llama"].layout: ("llama",),
    SPECS["phi3"].layout: ("phi3",),
    SPECS["gpt2"].layout: ("gpt2",),
    SPECS["gpt_neox"].layout: ("gpt_neox",),
    SPECS["bert"].layout: ("bert",),
    SPECS["falcon"].layout: ("falcon", "falcon_mq", "falcon_rw"),
    SPECS["bloom"].layout: ("bloom",),
    SPECS["gpt_bigcode"].layout: ("gpt_bigcode",),
    SPECS["gptj"].layout: ("gptj",),
    SPECS["gpt_neo"].layout: ("gpt_neo",),
    SPECS["opt"].layout: ("opt",),
    SPECS["phi"].layout: ("phi",),
    SPECS["distilbert"].layout: ("distilbert",),
    SPECS["t5"].layout: ("t5",),
}
LAYOUT_OF = {family: layout for layout, families in LAYOUT_FAMILIES.items() for family in families}
CASES = [(family, variant) for family in LAYOUT_OF for variant in variants_of(family)]
IDS = [f"{f}-{v}" for f, v in CASES]


def explicit_blocks(model, family: str, layer: int, G: int) -> dict[str, list[torch.Tensor]]:
    """role -> per-head blocks in Linear layout: q[h], k[g], v[g] are (hd, d), o[h] is (d, hd) for G kv heads;
    written out from each family's modeling code, not from headlens."""
    blk = _layers(model)[layer]
    d = hidden_size(family)

    def rows(W, start, n, step=HD):  # n blocks of HD rows, the first at row `start`, one every `step` rows
        return [W[start + i * step: start + i * step + HD].detach() for i in range(n)]

    def per_head(W):  # rows per head [q_h; k_h; v_h]: view(..., H, 3, hd) (GPT-NeoX, Bloom, Falcon-RW, GPTBigCode)
        return (rows(W, part * HD, H, 3 * HD) for part in range(3))

    if family == "llama":
        a = blk.self_attn
        q, k, v = rows(a.q_proj.weight, 0, H), rows(a.k_proj.weight, 0, G), rows(a.v_proj.weight, 0, G)
        O = a.o_proj.weight
    elif family == "bert":
        s = blk.attention.self
        q, k, v = rows(s.query.weight, 0, H), rows(s.key.weight, 0, G), rows(s.value.weight, 0, G)
        O = blk.attention.output.dense.weight
    elif family == "phi3":  # qkv_proj rows: q (H*hd) | k (G*hd) | v (G*hd)
        W = blk.self_attn.qkv_proj.weight
        q, k, v = rows(W, 0, H), rows(W, H * HD, G), rows(W, (H + G) * HD, G)
        O = blk.self_attn.o_proj.weight
    elif family == "gpt2":  # Conv1D c_attn (d, 3d): columns q | k | v; c_proj (H*hd, d)
        W = blk.attn.c_attn.weight
        assert tuple(W.shape) == (d, 3 * d)
        q, k, v = ([W[:, part * d + h * HD: part * d + (h + 1) * HD].T.detach() for h in range(H)]
                   for part in range(3))
        return {"q": q, "k": k, "v": v,
                "o": [blk.attn.c_proj.weight[h * HD:(h + 1) * HD, :].T.detach() for h in range(H)]}
    elif family == "gpt_neox":  # query_key_value rows per head: [q_h; k_h; v_h]
        W = blk.attention.query_key_value.weight
        q, k, v = ([W[h * 3 * HD + part * HD: h * 3 * HD + (part + 1) * HD].detach() for h in range(H)]
                   for part in range(3))
        O = blk.attention.dense.weight
    elif family == "falcon":  # new decoder: view(..., G, H/G + 2, hd): per kv group its queries, then k, then v
        W, n = blk.self_attention.query_key_value.weight, H // G
        per = W.detach().view(G, n + 2, HD, d)
        q, k, v = [per[g, i] for g in range(G) for i in range(n)], list(per[:, n]), list(per[:, n + 1])
        O = blk.self_attention.dense.weight
    elif family == "falcon_mq":  # multi-query: view(..., H + 2, hd): the queries, then the one k, then the one v
        W = blk.self_attention.query_key_value.weight
        q, k, v = rows(W, 0, H), rows(W, H * HD, 1), rows(W, (H + 1) * HD, 1)
        O = blk.self_attention.dense.weight
    elif family in ("falcon_rw", "bloom"):  # view(..., H, 3, hd)
        q, k, v = per_head(blk.self_attention.query_key_value.weight)
        O = blk.self_attention.dense.weight
    elif family == "gpt_bigcode":  # nn.Linear c_attn: split (d, hd, hd) under multi_query, else view(H, 3 * hd)
        W = blk.attn.c_attn.weight
        q, k, v = (rows(W, 0, H), rows(W, d, 1), rows(W, d + HD, 1)) if G == 1 else per_head(W)
        O = blk.attn.c_proj.weight
    elif family in ("gptj", "gpt_neo", "opt", "phi", "distilbert", "t5"):
        module, (qn, kn, vn, on) = {  # the attention module (lazily: each family has its own) and its names
            "gptj": (lambda: blk.attn, ("q_proj", "k_proj", "v_proj", "out_proj")),
            "gpt_neo": (lambda: blk.attn.attention, ("q_proj", "k_proj", "v_proj", "out_proj")),
            "opt": (lambda: blk.self_attn, ("q_proj", "k_proj", "v_proj", "out_proj")),
            "phi": (lambda: blk.self_attn, ("q_proj", "k_proj", "v_proj", "dense")),
            "distilbert": (lambda: blk.attention, ("q_lin", "k_lin", "v_lin", "out_lin")),
            "t5": (lambda: blk.layer[0].SelfAttention, ("q", "k", "v", "o")),
        }[family]
        a = module()
        q, k, v = rows(getattr(a, qn).weight, 0, H), rows(getattr(a, kn).weight, 0, G), rows(getattr(a, vn).weight, 0,
                                                                                             G)
        O = getattr(a, on).weight
    else:  # pragma: no cover
        raise AssertionError(family)
    return {"q": q, "k": k, "v": v, "o": [O[:, h * HD:(h + 1) * HD].detach() for h in range(H)]}


@pytest.fixture(scope="module")
def opened(ckpts):
    """(family, variant) -> (model, Checkpoint opened from an HF directory with --auto-infer)."""
    cache = {}

    def get(family, variant):
        if (family, variant) not in cache:
            model, _ = ckpts.model(family, variant)
            ck = open_model(weights=ckpts.path(family, variant, "hf_dir"), auto_infer=True)
            cache[family, variant] = model, ck
        return cache[family, variant]

    return get


def test_every_layout_of_the_table_has_a_case():
    layouts = {spec.layout for spec in SPECS.values()} | {GENERIC.layout}
    assert layouts <= set(LAYOUT_FAMILIES), [lay.name for lay in layouts - set(LAYOUT_FAMILIES)]
    assert {lay.name for lay in LAYOUT_FAMILIES} == {"separate", "fused_concat", "conv1d", "interleaved",
                                                     "interleaved_grouped"}


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_head_blocks_are_the_explicit_slices(opened, family, variant):
    model, ck = opened(family, variant)
    s, layout = ck.shape, ck.spec.layout
    assert LAYOUT_OF[family] == layout
    G = kv_heads(family, variant)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (H, G, HD, hidden_size(family))
    want_shapes = layout.shapes(H, G, HD, s.hidden_size)
    for layer in range(s.num_layers):
        want = explicit_blocks(model, family, layer, G)
        keys = ck.layer_keys(layer)
        for role, n in (("q", H), ("k", G), ("v", G), ("o", H)):
            for head in range(n):
                block = layout.head_block(role, head, H, G, HD)
                name = keys.name(block.tensor)
                assert ck.tensors.shape(name) == want_shapes[block.tensor]
                got = ck.tensors.read(name, block.index)
                got = got.T if block.transposed else got
                assert torch.equal(got, want[role][head]), (role, layer, head)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_read_head_gives_the_explicit_blocks(opened, family, variant):
    model, ck = opened(family, variant)
    G = kv_heads(family, variant)
    for layer, head in itertools.product(range(ck.shape.num_layers), range(H)):
        want = explicit_blocks(model, family, layer, G)
        f = read_head(ck, layer, head)
        g = head // (H // G)
        assert f.kv_head == g
        assert tuple(f.W_V.shape) == (HD, hidden_size(family)) and tuple(f.W_O.shape) == (hidden_size(family), HD)
        assert torch.equal(f.W_V, want["v"][g].double()) and torch.equal(f.W_O, want["o"][head].double())


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_whole_layer_split_is_the_explicit_slices(opened, family, variant):
    model, ck = opened(family, variant)
    s, layout = ck.shape, ck.spec.layout
    G, d = kv_heads(family, variant), s.hidden_size
    for layer in range(s.num_layers):
        want = explicit_blocks(model, family, layer, G)
        keys = ck.layer_keys(layer)
        stored = {role: ck.tensors.read(keys.name(role)) for role in layout.stored(with_qk=True)}
        split = layout.split(stored, H, G, HD, d)
        assert tuple(split.W_Q.shape) == (H, HD, d) and tuple(split.W_K.shape) == (G, HD, d)
        assert tuple(split.W_V.shape) == (G, HD, d) and tuple(split.W_O.shape) == (H, d, HD)
        f = read_layer(ck, layer)
        for h in range(H):
            assert torch.equal(split.W_Q[h], want["q"][h]) and torch.equal(split.W_O[h], want["o"][h])
            assert torch.equal(f.W_Q[h], want["q"][h].double()) and torch.equal(f.W_O[h], want["o"][h].double())
        for g in range(G):
            assert torch.equal(split.W_K[g], want["k"][g]) and torch.equal(split.W_V[g], want["v"][g])
            assert torch.equal(f.W_K[g], want["k"][g].double()) and torch.equal(f.W_V[g], want["v"][g].double())
        no_qk = read_layer(ck, layer, with_qk=False)
        assert no_qk.W_Q is None and no_qk.W_K is None and torch.equal(no_qk.W_V, f.W_V)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_kv_heads_inferred_from_the_shapes(ckpts, family, variant):
    """A bare safetensors file (no config): only H is given; G and head_dim come from the tensor shapes."""
    ck = open_model(weights=ckpts.path(family, variant, "safetensors"), num_heads=H)
    assert ck.spec.layout == LAYOUT_OF[family]
    assert (ck.shape.num_kv_heads, ck.shape.head_dim, ck.shape.hidden_size) == (
        kv_heads(family, variant), HD, hidden_size(family))
    layout = ck.spec.layout
    d, width, rows = layout.widths({r: ck.tensors.shape(ck.layer_keys(0).name(r)) for r in ("o", layout.anchor_role)})
    assert (d, width) == (hidden_size(family), H * HD)
    assert layout.kv_heads(rows, H, HD) == kv_heads(family, variant)


def _cli_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = main(["ov", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    return err.strip()


@pytest.mark.parametrize("family,variant,argv,line", [
    ("llama", "gqa", ["--num-heads", "3"], "the output projection has 64 head inputs, not divisible by 3 heads "
                                           "(--num-heads / num_attention_heads)"),
    ("gpt2", "mha", ["--num-heads", "3"], "the output projection has 64 head inputs, not divisible by 3 heads "
                                          "(--num-heads / num_attention_heads)"),
    ("llama", "gqa", ["--num-heads", "1"], "value projection has 32 rows, not a multiple of head_dim 64: "
                                           "check --num-heads"),
    ("bert", "mha", ["--num-heads", "5"], "the output projection has 64 head inputs, not divisible by 5 heads "
                                          "(--num-heads / num_attention_heads)"),
    ("phi3", "gqa", ["--num-heads", "1"], "fused qkv projection has 128 rows, which is not (H + 2G) * head_dim for "
                                          "H=1, head_dim=64: check --num-heads"),
    ("phi3", "mqa", ["--num-heads", "4", "--num-kv-heads", "2"],
     "--num-kv-heads 2 contradicts the weights: the value projection holds 1 kv heads of dim 16"),
    ("llama", "gqa", ["--num-heads", "4", "--num-kv-heads", "3"],
     "--num-kv-heads 3 contradicts the weights: the value projection holds 2 kv heads of dim 16"),
])
def test_wrong_num_heads_gives_the_existing_error(ckpts, capsys, family, variant, argv, line):
    path = ckpts.path(family, variant, "safetensors")
    assert _cli_error(capsys, "--weights", str(path), *argv) == f"headlens ov: error: {line}"
    with pytest.raises(HeadlensError) as info:  # the library names its parameters instead
        open_model(weights=path, num_heads=int(argv[1]), num_kv_heads=int(argv[3]) if len(argv) > 2 else None)
    message = str(info.value)
    assert "--" not in message and ("`num_heads`" in message or "`num_kv_heads`" in message), message


@pytest.mark.parametrize("layout", [SPECS["gpt2"].layout, SPECS["gpt_neox"].layout], ids=["conv1d", "interleaved"])
def test_fused_per_head_layouts_hold_one_kv_head_per_query_head(layout):
    assert layout.kv_heads(3 * H * HD, H, HD) == H
    with pytest.raises(HeadlensError) as info:
        layout.kv_heads(3 * H * HD + HD, H, HD)
    assert str(info.value) == "fused qkv has 208 outputs, expected 3 * 4 * 16: check `num_heads`"


# ------------------------------------------------------------------------- the record itself, synthetic


SYNTHETIC = [
    Layout("separate", q="q", k="k", v="v", o="o"),
    Layout("separate, transposed", q="q", k="k", v="v", o="o", transposed=True),
    Layout("concat", qkv="qkv", o="o"),
    Layout("concat, transposed, grouped", qkv="qkv", o="o", transposed=True),
    Layout("concat, transposed", qkv="qkv", o="o", transposed=True, grouped=False),
    Layout("interleaved", qkv="qkv", o="o", interleaved=True, grouped=False),
    Layout("interleaved, grouped", qkv="qkv", o="o", interleaved=True),
    Layout("interleaved, grouped, transposed", qkv="qkv", o="o", interleaved=True, transposed=True),
    Layout("interleaved, transposed", qkv="qkv", o="o", interleaved=True, transposed=True, grouped=False),
]


SYNTHETIC_CASES = [(lay, G) for lay in SYNTHETIC for G in ((1, 2, H) if lay.grouped or not lay.fused else (H,))]


@pytest.mark.parametrize("layout,G", SYNTHETIC_CASES, ids=[f"{lay.name}-G{G}" for lay, G in SYNTHETIC_CASES])
def test_head_blocks_and_split_agree(layout, G):
    """Every combination the record can express: the whole-layer split holds exactly the per-head blocks, and
    G comes back from the stored shapes."""
    d = 24
    g = torch.Generator().manual_seed(G)
    stored = {role: torch.randn(shape, generator=g) for role, shape in layout.shapes(H, G, HD, d).items()}
    split = layout.split(stored, H, G, HD, d)
    for role, n, whole in (("q", H, split.W_Q), ("k", G, split.W_K), ("v", G, split.W_V), ("o", H, split.W_O)):
        for head in range(n):
            b = layout.head_block(role, head, H, G, HD)
            block = stored[b.tensor][b.index]
            assert torch.equal(block.T if b.transposed else block, whole[head]), (role, head)
    d_got, width, rows = layout.widths({r: tuple(stored[r].shape) for r in ("o", layout.anchor_role)})
    assert (d_got, width) == (d, H * HD) and layout.kv_heads(rows, H, HD) == G


def test_a_layout_is_either_separate_or_fused():
    with pytest.raises(ValueError, match="give q, k and v, or one fused qkv"):
        Layout("none", o="o")
    with pytest.raises(ValueError, match="give q, k and v, or one fused qkv"):
        Layout("both", q="q", k="k", v="v", qkv="qkv", o="o")
    with pytest.raises(ValueError, match="give q, k and v, or one fused qkv"):
        Layout("separate, interleaved", q="q", k="k", v="v", o="o", interleaved=True)


def test_a_layer_whose_shapes_differ_from_layer_0_is_refused_where_it_is_read(ckpts, tmp_path, capsys):
    """Shape inference reads layer 0; every later read checks its own tensors' shapes against the record."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpts.path("llama", "gqa", "safetensors")))
    name = "model.layers.1.self_attn.v_proj.weight"
    sd[name] = sd[name][:HD].clone()  # one kv head instead of two
    path = tmp_path / "odd.safetensors"
    save_file(sd, str(path))
    ck = open_model(weights=path, num_heads=H)
    read_head(ck, 0, 0)
    with pytest.raises(HeadlensError, match=r"^unexpected shapes in layer 1: W_V \(16, 48\)$"):
        read_head(ck, 1, 0)
    with pytest.raises(HeadlensError, match=r"^unexpected shapes in layer 1: W_V \(16, 48\), W_O \(48, 64\)$"):
        read_layer(ck, 1)
    assert _cli_error(capsys, "--weights", str(path), "--num-heads", "4", "--layer", "1") == (
        "headlens ov: error: unexpected shapes in layer 1: W_V (16, 48)")


@pytest.mark.parametrize("transposed", [False, True])
def test_the_per_kv_group_interleave_is_the_per_head_one_for_G_H_and_the_concat_for_G_1(transposed):
    """Falcon's and GPTBigCode's record in closed form: with one kv head per query head it reads exactly what the
    per-head interleave (GPT-NeoX, Bloom) reads, with one kv head for all of them what q | k | v (Phi-3) reads."""
    grouped = Layout("g", qkv="qkv", o="o", interleaved=True, transposed=transposed)
    per_head = Layout("h", qkv="qkv", o="o", interleaved=True, grouped=False, transposed=transposed)
    concat = Layout("c", qkv="qkv", o="o", transposed=transposed)
    d, gen = 24, torch.Generator().manual_seed(0)
    for G, other in ((H, per_head), (1, concat)):
        stored = {role: torch.randn(shape, generator=gen) for role, shape in grouped.shapes(H, G, HD, d).items()}
        assert grouped.shapes(H, G, HD, d) == other.shapes(H, G, HD, d)
        a, b = grouped.split(stored, H, G, HD, d), other.split(stored, H, G, HD, d)
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (G, name)
        for role, n in (("q", H), ("k", G), ("v", G), ("o", H)):
            assert all(grouped.head_block(role, i, H, G, HD) == other.head_block(role, i, H, G, HD) for i in range(n))
    rows = (H + 2 * 2) * HD  # G = 2: rows (H + 2G) * hd
    assert grouped.kv_heads(rows, H, HD) == 2
