"""`spectrum.batched`: a batch of small eigenproblems split over the cores gives each matrix's own answer, in order."""

from __future__ import annotations

import pytest
import torch

from headlens.circuits import spectrum
from headlens.circuits.spectrum import batched, gram_spectrum


def _psd(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, 3 * r, generator=g, dtype=torch.float64)
    scale = torch.logspace(-3, 3, n, dtype=torch.float64)[:, None, None]  # every matrix's spectrum differs
    return scale * (A @ A.mT)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 32])
def test_split_batches_match_one_matrix_at_a_time(n, monkeypatch):
    G = _psd(n, 16, n)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # split even on a one-core runner
    got = batched(torch.linalg.eigvalsh, G)
    ref = torch.stack([torch.linalg.eigvalsh(G[i]) for i in range(n)])  # one matrix at a time, unsplit
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    vals, vecs = batched(torch.linalg.eigh, G)  # tuple results: each column concatenated in order
    torch.testing.assert_close(vecs @ torch.diag_embed(vals) @ vecs.mT, G, rtol=1e-10, atol=1e-12 * float(G.abs().max()))


def test_gram_spectrum_split_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(9, 40, 8, generator=g, dtype=torch.float64)  # (n, d, r)
    B = torch.randn(9, 8, 40, generator=g, dtype=torch.float64)
    S, R = gram_spectrum(A.mT @ A, B @ B.mT)
    ref = torch.linalg.svdvals(A @ B)[:, :8]  # the dense products, independently
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(R.mT @ R, A.mT @ A, rtol=1e-10, atol=1e-10)


def test_threads_restored_after_an_error():
    before = torch.get_num_threads()

    def boom(x):
        raise RuntimeError("inside a chunk")

    if before < 2:
        pytest.skip("one intra-op thread: batched() does not split here")
    with pytest.raises(RuntimeError, match="inside a chunk"):
        batched(boom, torch.zeros(8, 2, 2))
    assert torch.get_num_threads() == before
    assert spectrum._SPLIT_MIN >= 2
