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


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_k=2.5), dict(top_p=0), dict(top_p=1.5)])
def test_bad_settings_are_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_bad_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        row_generators(-1, 2)
