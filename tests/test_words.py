"""`headlens.words.count`: numbers and nouns agree ("1 token", "0 tokens", "2 kv heads")."""

import pytest

from headlens.words import count


@pytest.mark.parametrize("n,noun,plural,want", [
    (1, "token", None, "1 token"), (0, "token", None, "0 tokens"), (2, "kv head", None, "2 kv heads"),
    (1, "MoE layer", None, "1 MoE layer"), (3, "matrix", "matrices", "3 matrices"), (1, "matrix", "matrices", "1 matrix"),
])
def test_count(n, noun, plural, want):
    assert count(n, noun, plural) == want


def test_toy_create_says_one_layer_and_one_head(capsys, tmp_path):
    from headlens.cli import main

    assert main(["toy", "create", "--layers", "1", "--heads", "1", "--out", str(tmp_path / "t.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "toy: 1 layer, " in out and "1 query head, 1 kv head" in out and "1 layers" not in out
