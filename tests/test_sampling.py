"""Sampling filters keep exactly the right sets; seeds reproduce; guidance at scale 1 is conditional."""
import numpy as np
import pytest

from digit_core.sampling import Sampler, filter_logits, guide, row_generators, softmax


def test_top_k_keeps_exactly_the_k_largest() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50))
    out = filter_logits(logits, top_k=7)
    for row, kept in zip(logits, np.isfinite(out)):
        assert kept.sum() == 7
        assert set(np.flatnonzero(kept)) == set(np.argsort(-row)[:7])
    assert np.array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])  # kept logits untouched


def test_top_k_ties_break_towards_lower_ids() -> None:
    out = filter_logits(np.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), top_k=2)
    assert np.isfinite(out[0]).tolist() == [False, True, True, False, False]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    p = np.array([[0.5, 0.05, 0.3, 0.1, 0.05]])
    logits = np.log(p)
    # sorted: 0.5, 0.3, 0.1, ... ; 0.5 < 0.75 so 0.3 is needed; 0.8 >= 0.75 so stop
    assert np.isfinite(filter_logits(logits, top_p=0.75))[0].tolist() == [True, False, True, False, False]
    assert np.isfinite(filter_logits(logits, top_p=0.79))[0].tolist() == [True, False, True, False, False]
    assert np.isfinite(filter_logits(logits, top_p=0.81))[0].tolist() == [True, False, True, True, False]
    # the most likely token always survives
    assert np.isfinite(filter_logits(logits, top_p=0.01))[0].tolist() == [True, False, False, False, False]


def test_top_p_brute_force() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 30)) * 2
    for p in (0.3, 0.6, 0.9):
        kept = np.isfinite(filter_logits(logits, top_p=p))
        for row, k in zip(softmax(logits), kept):
            order = np.argsort(-row)
            n = int(np.searchsorted(np.cumsum(row[order]), p) + 1)   # smallest prefix with mass >= p
            assert set(np.flatnonzero(k)) == set(order[:n])


def test_same_seed_same_tokens_other_seed_different() -> None:
    logits = np.zeros((8, 1000))
    s = Sampler(temperature=1.0)
    a = s(logits, row_generators(3, 8))
    assert np.array_equal(a, s(logits, row_generators(3, 8)))
    assert not np.array_equal(a, s(logits, row_generators(4, 8)))
    # a row does not depend on the batch around it
    assert np.array_equal(a[:3], s(logits[:3], row_generators(3, 3)))


def test_samples_follow_the_distribution_and_respect_filters() -> None:
    p = np.array([0.6, 0.3, 0.1])
    logits = np.tile(np.log(p), (20000, 1))
    ids = Sampler()(logits, row_generators(0, 20000))
    assert np.allclose(np.bincount(ids, minlength=3) / 20000, p, atol=0.015)
    ids = Sampler(top_k=2)(logits, row_generators(0, 20000))
    assert ids.max() == 1
    assert Sampler(temperature=0)(logits[:2], row_generators(0, 2)).tolist() == [0, 0]


def test_guidance_at_scale_one_is_conditional() -> None:
    rng = np.random.default_rng(2)
    c, u = rng.normal(size=(16, 64)), rng.normal(size=(16, 64))
    s = Sampler(top_k=10)
    assert np.array_equal(s(guide(c, u, 1.0), row_generators(5, 16)), s(c, row_generators(5, 16)))
    assert np.allclose(guide(c, u, 0.0), u) and np.allclose(guide(c, u, 2.0), 2 * c - u)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_k=2.5), dict(top_p=0), dict(top_p=1.5)])
def test_bad_settings_are_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_bad_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        row_generators(-1, 2)


def test_zero_top_k_and_unit_top_p_are_off() -> None:
    logits = np.random.default_rng(3).normal(size=(8, 40))
    rngs = lambda: row_generators(9, 8)   # noqa: E731 - a fresh set of generators per draw
    plain = Sampler(temperature=0.7)(logits, rngs())
    assert np.array_equal(Sampler(temperature=0.7, top_k=0, top_p=1.0)(logits, rngs()), plain)
    assert np.array_equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


def test_tiny_temperatures_are_greedy_not_nan() -> None:
    # scaled logits are taken relative to the row maximum, so even a subnormal temperature cannot
    # overflow to inf - inf = NaN (which made the inverse-CDF draw return token 0)
    logits = np.array([[0.0, 5.0, 1.0], [3.0, -1.0, 2.0]])
    assert Sampler(temperature=1e-320)(logits, row_generators(0, 2)).tolist() == [1, 0]


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0"),
    (dict(top_k=float("nan")), r"top_k must be an integer >= 0 \(0 = off\)"),
    (dict(top_k=True), r"top_k must be an integer"),
    (dict(top_p=float("nan")), r"top_p must be a finite number in \(0, 1\]"),
    (dict(top_p="0.5"), r"top_p must be a finite number"),
])
def test_non_finite_settings_name_the_parameter(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Sampler(**kw)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_guidance_rejects_non_finite_scales(scale: float) -> None:
    c = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"cfg_scale must be a finite number"):
        guide(c, c, scale)


@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64, float("nan"), float("inf"), 1.5, "3"])
def test_seed_must_be_an_integer_below_2_63(seed: object) -> None:
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        row_generators(seed, 2)


def test_largest_seed_and_integral_floats_are_accepted() -> None:
    a = Sampler()(np.zeros((2, 50)), row_generators(2 ** 63 - 1, 2))
    assert np.array_equal(Sampler()(np.zeros((2, 50)), row_generators(7.0, 2)),
                          Sampler()(np.zeros((2, 50)), row_generators(7, 2)))
    assert a.shape == (2,)
