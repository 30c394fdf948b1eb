import math

import numpy as np
import pytest
import torch

from digit_core.codebook import Codebook, fit_kmeans, usage_stats


def _data(m: int, k: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, d)).astype(np.float32), rng.standard_normal((k, d)).astype(np.float32)


def test_assign_matches_brute_force():
    x, c = _data(600, 64, 24)
    ids, dist = Codebook(c).assign(torch.from_numpy(x))
    assert ids.dtype == torch.int64 and dist.dtype == torch.float32 and ids.shape == (600,)
    d = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    part = np.sort(d, axis=1)
    clear = part[:, 1] - part[:, 0] > 1e-4
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(ids.numpy()[clear], d.argmin(1)[clear])
    np.testing.assert_allclose(dist.numpy(), part[:, 0], rtol=1e-4, atol=1e-5)


def test_exact_match_has_zero_distance_and_ties_go_low():
    c = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0]], np.float32)
    ids, dist = Codebook(c).assign(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert ids.tolist() == [0, 2]
    assert (dist >= 0).all() and dist.max() < 1e-5


def test_chunked_equals_unchunked_and_keeps_leading_shape():
    x, c = _data(1000, 32, 16, seed=1)
    book = Codebook(c)
    xt = torch.from_numpy(x).reshape(10, 100, 16)
    ids, dist = book.assign(xt)
    ids_c, dist_c = book.assign(xt, chunk_rows=37)
    assert ids.shape == (10, 100) and dist.shape == (10, 100)
    assert torch.equal(ids, ids_c)
    torch.testing.assert_close(dist, dist_c, rtol=1e-6, atol=1e-6)
    assert torch.equal(book(xt), ids)


def test_fit_kmeans_is_seeded():
    x, _ = _data(2000, 1, 8, seed=2)
    a = fit_kmeans(x, 8, niter=5, seed=3)
    b = fit_kmeans(x, 8, niter=5, seed=3)
    c = fit_kmeans(x, 8, niter=5, seed=4)
    assert a.shape == (8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fit_kmeans_recovers_blob_centres():
    rng = np.random.default_rng(5)
    centres = rng.uniform(-20, 20, (3, 8)).astype(np.float32)
    x = (centres[:, None, :] + 0.1 * rng.standard_normal((3, 300, 8))).reshape(-1, 8).astype(np.float32)
    xt = torch.from_numpy(x)
    # Random init can seat two centroids in one blob (a local minimum), so keep the best of a
    # few seeds, as faiss's nredo would.
    fits = [fit_kmeans(x, 3, niter=20, seed=s) for s in range(20)]
    fitted = min(fits, key=lambda c: float(Codebook(c).assign(xt)[1].sum()))
    d = np.sqrt(((centres[:, None] - fitted[None]) ** 2).sum(-1))
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2]  # one centroid per blob
    assert d.min(1).max() < 0.05


def test_usage_stats_exact():
    s = usage_stats(np.array([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert s["used"] == 4 and s["usage"] == 0.5
    assert s["counts"].tolist() == [2, 2, 2, 2, 0, 0, 0, 0]
    assert s["perplexity"] == pytest.approx(4.0, rel=1e-12)
    # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2, perplexity 2 ** 1.5
    s = usage_stats(np.array([[5, 5], [1, 2]]), 6)
    assert s["used"] == 3 and s["perplexity"] == pytest.approx(2 ** 1.5, rel=1e-12)
    assert usage_stats(np.zeros(10, np.int64), 4)["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        usage_stats(np.array([0, 4]), 4)
    with pytest.raises(ValueError):
        usage_stats(np.array([], np.int64), 4)


@pytest.mark.parametrize("as_torch", [False, True])
def test_from_official_transposed_layout(as_torch):
    x, c = _data(300, 50, 12, seed=6)
    c_dk, norm = c.T.copy(), (c.astype(np.float64) ** 2).sum(1, keepdims=True).T.astype(np.float32)
    if as_torch:
        c_dk, norm = torch.from_numpy(c_dk), torch.from_numpy(norm)
    official = Codebook.from_official(c_dk, norm)
    ours = Codebook(c)
    assert official.size == 50 and official.dim == 12
    assert torch.equal(official.centroids, ours.centroids)
    xt = torch.from_numpy(x)
    assert torch.equal(official.assign(xt)[0], ours.assign(xt)[0])
    assert torch.equal(Codebook.from_official(c_dk).centroids, ours.centroids)
    with pytest.raises(ValueError, match="transposed"):
        Codebook.from_official(c_dk, norm * 2)
    with pytest.raises(ValueError):
        Codebook.from_official(c_dk, norm[:, :10])


def test_save_load_round_trip_bit_exact(tmp_path):
    _, c = _data(1, 40, 10, seed=7)
    book = Codebook(c)
    book.save(tmp_path / "codebook.safetensors")
    back = Codebook.load(tmp_path / "codebook.safetensors")
    assert torch.equal(back.centroids, book.centroids) and torch.equal(back.centroid_sq, book.centroid_sq)
    np.save(tmp_path / "km.npy", c)
    assert torch.equal(Codebook.from_npy(tmp_path / "km.npy").centroids, book.centroids)
    fresh = Codebook(torch.zeros(40, 10))
    fresh.load_state_dict(book.state_dict(), strict=True)
    assert torch.equal(fresh.centroid_sq, book.centroid_sq)


def test_bad_inputs_raise():
    x, _ = _data(100, 1, 4, seed=8)
    for bad, msg in [(x[0], "2-D"), (x[None], "2-D"), (x.astype(np.int32), "floating"),
                     (np.where(np.arange(4) == 2, np.nan, x).astype(np.float32), "NaN"),
                     (x.tolist(), "numpy")]:
        with pytest.raises(ValueError, match=msg):
            fit_kmeans(bad, 4)
    with pytest.raises(ValueError, match="at least k"):
        fit_kmeans(x[:3], 4)
    with pytest.raises(ValueError, match="positive"):
        fit_kmeans(x, 0)
    book = Codebook(x[:4])
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        book.assign(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        book.assign(torch.tensor([[0.0, math.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="floating"):
        book.assign(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        Codebook(torch.zeros(4, 4)).set_centroids(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError):
        Codebook(np.zeros(4, np.float32))
