"""digit_core.metrics: the paper's SNR noise, token change rate, feature cosine similarity."""
from __future__ import annotations

import numpy as np
import pytest

from digit_core.metrics import (PAPER_TABLE1, SNR_LEVELS_DB, add_noise, cosine_similarity, noise_std, snr_db,
                                token_change_rate)


@pytest.mark.parametrize("snr", [30.0, 20.0, 10.0, 5.0, 1.0, 0.01])
def test_noise_power_matches_the_snr(snr: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.9, (4, 64, 64, 3))
    x[1] *= 0.3                                        # images of different power get different noise
    y = add_noise(x, snr, np.random.default_rng(1), clip=False)
    p_signal = (x.reshape(4, -1) ** 2).mean(1)
    p_noise = ((y - x).reshape(4, -1) ** 2).mean(1)
    assert np.allclose(p_noise, p_signal / 10 ** (snr / 10), rtol=0.05)
    assert np.allclose(snr_db(x, y), snr, atol=0.2)
    assert noise_std(x, snr)[1] < noise_std(x, snr)[0]


def test_uint8_images_are_scaled_clipped_and_seeded() -> None:
    img = np.full((2, 32, 32, 3), 128, np.uint8)
    a = add_noise(img, 10.0, np.random.default_rng(5))
    b = add_noise(img, 10.0, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    d = a.astype(float) / 255 - img / 255              # no clipping at mid grey and 10 dB: sigma ~ 0.16
    assert abs(d.std() - np.sqrt((128 / 255) ** 2 / 10)) < 0.01
    assert add_noise(np.ones((1, 8, 8)), 0.01, np.random.default_rng(0)).max() <= 1.0   # clipped floats


def test_bad_noise_inputs() -> None:
    with pytest.raises(ValueError, match="batch"):
        add_noise(np.zeros(0), 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite"):
        add_noise(np.zeros((1, 4, 4)), float("nan"), np.random.default_rng(0))


def test_token_change_rate() -> None:
    a = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    b = a.copy()
    b[0, 0, 0] = 9
    b[1] = 0
    assert token_change_rate(a, a) == 0.0
    assert token_change_rate(a, b) == pytest.approx(5 / 8)
    assert np.allclose(token_change_rate(a, b, per_image=True), [0.25, 1.0])
    with pytest.raises(ValueError, match="shape"):
        token_change_rate(a, a[:1])


def test_cosine_similarity() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    y = np.array([[2.0, 0.0], [0.0, -1.0], [4.0, 3.0]])
    assert np.allclose(cosine_similarity(x, y, per_position=True), [1.0, -1.0, 24 / 25])
    assert cosine_similarity(x, y) == pytest.approx((1 - 1 + 24 / 25) / 3)
    assert cosine_similarity(x, x) == pytest.approx(1.0)
    assert cosine_similarity(np.zeros((2, 3)), np.ones((2, 3))) == 0.0     # zero vectors do not divide by zero


def test_paper_table() -> None:
    assert SNR_LEVELS_DB == (30, 25, 20, 15, 10, 5, 1, 0.01)
    assert all(len(v) == 8 for v in PAPER_TABLE1.values())
    assert all(d < v for d, v in zip(PAPER_TABLE1["disc_change"], PAPER_TABLE1["vq_change"]))


def test_stability_table() -> None:
    import torch

    from digit_core.presets import tiny
    from digit_core.metrics import stability
    from digit_core.pipeline import DiGIT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DiGIT(tiny(3))
    with torch.no_grad():   # spread the centroids so tokenize uses many clusters
        model.codebook.set_centroids(torch.randn(16, 32))
    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    t = stability(model, imgs, snr_levels=(200.0, 10.0, 0.01), seed=3, batch=256)
    assert t["snr_db"] == [200.0, 10.0, 0.01] and t["num_images"] == 5
    # 200 dB is below uint8 rounding: nothing changes
    assert (t["disc_change"][0], t["vq_change"][0]) == (0.0, 0.0)
    assert t["disc_cos_sim"][0] == pytest.approx(1.0) and t["vq_cos_sim"][0] == pytest.approx(1.0)
    assert t["disc_change"][2] > t["disc_change"][1] > 0 and t["vq_change"][2] > 0
    assert all(-1 <= v <= 1 for k in ("disc_cos_sim", "vq_cos_sim") for v in t[k])
    assert t["disc_cos_sim"][2] < t["disc_cos_sim"][1] < 1
    # batches only bound memory: each level's noise is the same (sums differ by round-off only)
    small = stability(model, imgs, snr_levels=(200.0, 10.0, 0.01), seed=3, batch=2)
    assert small.keys() == t.keys() and all(np.allclose(small[k], t[k], rtol=1e-6) for k in t)
    assert stability(model, imgs, snr_levels=(10.0,), seed=4)["disc_cos_sim"][0] != pytest.approx(t["disc_cos_sim"][1])
    with pytest.raises(ValueError, match="uint8"):
        stability(model, imgs.astype(np.float32))


def test_stability_noises_the_one_channel_a_grey_model_sees() -> None:
    from types import SimpleNamespace

    from digit_core.metrics import stability

    class Recorder:
        """Features are the pixels the model would see (the channel mean), recorded per call."""

        config = SimpleNamespace(channels=1, is_vq=False)
        seen: list[np.ndarray] = []

        def tokenize(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            self.seen.append(images)
            grey = images.astype(np.float64).mean(-1, keepdims=True) / 255
            return (grey[..., 0] > 0.5).astype(np.int64), grey[..., 0], grey

        def vq_encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            grey = images.astype(np.float64).mean(-1, keepdims=True) / 255
            return (grey[..., 0] > 0.5).astype(np.int64), grey

    imgs = np.repeat(np.random.default_rng(0).integers(60, 200, (4, 32, 32, 1), dtype=np.uint8), 3, axis=3)
    flows = Recorder()
    stability(flows, imgs, snr_levels=(10.0,))
    clean, noisy = flows.seen[0], flows.seen[1]
    assert clean.shape == (4, 32, 32, 1) and np.array_equal(clean[..., 0], imgs[..., 0])
    assert np.allclose(snr_db(clean / 255, noisy / 255), 10.0, atol=1.0)   # clipping aside; not 14.8 dB


def test_bootstrap_interval_covers_a_known_mean_and_shrinks_with_n() -> None:
    from digit_core.metrics import bootstrap_ci
    rng = np.random.default_rng(1)
    small, large = rng.random(100) < 0.7, rng.random(10000) < 0.7
    est, lo, hi = bootstrap_ci(lambda i: small[i].mean(), len(small), n_boot=500)
    assert lo < est < hi and lo < 0.7 < hi and 0.1 < hi - lo < 0.25   # ~ 4 * sqrt(0.21 / 100) = 0.18
    e2, lo2, hi2 = bootstrap_ci(lambda i: large[i].mean(), len(large), n_boot=500)
    assert hi2 - lo2 < (hi - lo) / 5 and lo2 < 0.7 < hi2
    assert bootstrap_ci(lambda i: large[i].mean(), len(large), n_boot=200, seed=3) == \
        bootstrap_ci(lambda i: large[i].mean(), len(large), n_boot=200, seed=3)   # seeded
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci(lambda i: 0.0, 1)


def test_basic_bootstrap_brackets_a_statistic_that_resampling_inflates() -> None:
    from digit_core.metrics import bootstrap_ci
    x = np.random.default_rng(0).normal(size=300)
    distinct = lambda i: len(np.unique(x[i])) / len(x)   # a resample always has fewer distinct values
    est, lo, hi = bootstrap_ci(distinct, len(x), n_boot=200, method="percentile")
    assert est == 1.0 and hi < est                         # the percentile interval misses the estimate
    est, lo, hi = bootstrap_ci(distinct, len(x), n_boot=200, method="normal")
    assert lo < est < hi and hi - est == pytest.approx(est - lo) and 0.01 < hi - lo < 0.2
    with pytest.raises(ValueError, match="percentile"):
        bootstrap_ci(distinct, len(x), method="bca")
