"""headlens.compress.plan on explicit matrices: k = head_dim keeps W_V, the ridge, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headlens.compress.plan import plan_layer, whitening_factor
from headlens.errors import HeadlensError

H, G, hd, d = 4, 2, 8, 24


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(H, d, hd, generator=gen, dtype=torch.float64),
            torch.randn(G, hd, d, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["plain", "data-aware"])
@pytest.mark.parametrize("n_tokens", [100, 10])  # 10 < d: X X^T is singular, a ridge is added
def test_full_latent_keeps_W_V_and_factors_multiply_to_W_V_Q(kind, n_tokens):
    W_O, W_V = _weights()
    X = torch.randn(d, n_tokens, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = plan_layer(0, W_O, W_V, hd, kind, X)
    np.testing.assert_allclose(full.value_weights(W_V).numpy(), W_V.numpy(), rtol=0, atol=1e-9)
    assert all(g.predicted_error < 1e-7 and g.calib_error < 1e-7 for g in full.groups)
    small = plan_layer(0, W_O, W_V, [3, 5], kind, X)
    assert small.ks == [3, 5]
    for g in small.groups:
        Wg = W_V[g.kv_head].numpy()
        Q = g.Q.numpy()
        assert np.linalg.matrix_rank(Q) == g.k
        np.testing.assert_allclose(g.up.numpy() @ g.down.numpy(), Wg @ Q, rtol=0, atol=1e-9 * np.abs(Wg).max())
        np.testing.assert_allclose(Q @ Q, Q, rtol=0, atol=1e-7 * max(1.0, np.abs(Q).max()))  # a projection
        assert (g.ridge > 0) == (kind == "data-aware" and n_tokens < d)
        assert 0.05 < g.predicted_error < 1
    if kind == "data-aware":  # P_g = Sigma_k^{-1} U_k^T M_g: held-out tokens are not blown up through S^{-1}
        Xh = torch.randn(d, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        _, err = small.cache_errors(W_V, Xh)
        assert err < 1
        plain = plan_layer(0, W_O, W_V, [3, 5], "plain")
        assert plain.cache_errors(W_V, Xh)[1] < 1


def test_whitening_factor():
    X = torch.randn(d, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    S, lam = whitening_factor(X)
    assert lam == 0.0
    torch.testing.assert_close(S @ S.T, X @ X.T)
    S, lam = whitening_factor(X[:, :5])
    assert lam > 0
    torch.testing.assert_close(S @ S.T, X[:, :5] @ X[:, :5].T + lam * torch.eye(d))


def test_bad_input():
    W_O, W_V = _weights()
    X = torch.randn(d, 40, dtype=torch.float64)
    with pytest.raises(HeadlensError, match="`k` 9 out of range"):
        plan_layer(0, W_O, W_V, 9)
    with pytest.raises(HeadlensError, match="`k` gives 3 latent sizes"):
        plan_layer(0, W_O, W_V, [1, 2, 3])
    with pytest.raises(HeadlensError, match="needs `calibration`"):
        plan_layer(0, W_O, W_V, 2, "data-aware")
    with pytest.raises(HeadlensError, match="`calibration` tokens have shape"):
        plan_layer(0, W_O, W_V, 2, "data-aware", X.T)
    with pytest.raises(HeadlensError, match="`latent`"):
        plan_layer(0, W_O, W_V, 2, "whitened", X)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(HeadlensError, match="NaN"):
        plan_layer(0, W_O, W_V, 2, "data-aware", bad)
