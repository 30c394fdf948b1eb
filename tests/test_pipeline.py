"""The PyTorch pipeline end to end on a tiny random model: flows, save/load, bad inputs."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from digit_core.config import ConfigError, DiGITConfig, SamplingConfig
from digit_core.presets import tiny
from digit_core.flows import SamplingSettings, keep_rows_for
from digit_core.pipeline import DiGIT


@pytest.fixture(scope="module")
def model() -> DiGIT:
    torch.manual_seed(0)
    m = DiGIT(tiny())
    # spread the centroids over feature space so tokenize uses more than one cluster
    with torch.no_grad():
        m.codebook.set_centroids(torch.randn(16, 32))
    return m


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_sample_shapes_and_seeds(model: DiGIT) -> None:
    a = model.sample(class_ids=[0, 2, 1], seed=7, top_k=8)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, model.sample(class_ids=[0, 2, 1], seed=7, top_k=8))
    g1 = model.generate([0, 2, 1], seed=7, top_k=8)
    g2 = model.generate([0, 2, 1], seed=8, top_k=8)
    assert not np.array_equal(g1.disc_tokens, g2.disc_tokens)
    assert g1.disc_tokens.shape == (3, 4, 4) and g1.vq_tokens.shape == (3, 4, 4)
    assert g1.disc_tokens.max() < 16 and g1.vq_tokens.max() < 32
    assert ((g1.disc_probs > 0) & (g1.disc_probs <= 1)).all()
    # sample i depends only on (seed, i), not on the rest of the batch
    assert np.array_equal(model.generate([0, 2], seed=7, top_k=8).disc_tokens, g1.disc_tokens[:2])


def test_cfg_scale_one_gives_the_conditional_tokens(model: DiGIT) -> None:
    plain = model.generate([0, 1, 2, 0], seed=3)         # tiny's default: no guidance
    guided = model.generate([0, 1, 2, 0], seed=3, cfg_scale=1.0)
    assert plain.settings.cfg_scale == 1.0 and np.array_equal(plain.disc_tokens, guided.disc_tokens)
    assert not np.array_equal(plain.disc_tokens, model.generate([0, 1, 2, 0], seed=3, cfg_scale=4.0).disc_tokens)


def test_the_old_keyword_cfg_warns_and_gives_the_bytes_of_cfg_scale(model: DiGIT) -> None:
    """``cfg=`` (the guidance scale's old name) still works in every sampling call: a DeprecationWarning
    names ``cfg_scale`` at the caller's line, and the output is byte for byte ``cfg_scale=``'s."""
    img = _images(1)[0]
    calls = {"generate": lambda **kw: model.generate([0, 1, 2], seed=3, **kw),
             "sample": lambda **kw: model.sample([0, 2], seed=4, **kw),
             "complete": lambda **kw: model.complete(img, keep_rows=2, n=2, class_id=1, seed=5, **kw),
             "complete_detailed": lambda **kw: model.complete_detailed(img, keep_rows=2, n=2, class_id=2, seed=6, **kw),
             "complete_many": lambda **kw: model.complete_many(_images(2), keep_rows=1, class_ids=[0, 2], seed=7, **kw),
             "sampling_settings": lambda **kw: model.sampling_settings(**kw)}
    for name, call in calls.items():
        with pytest.warns(DeprecationWarning, match=r"cfg= is deprecated: pass cfg_scale=") as seen:
            old = call(cfg=2.5)
        assert [w.filename for w in seen] == [__file__], name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new = call(cfg_scale=2.5)
        if isinstance(new, np.ndarray):
            assert old.tobytes() == new.tobytes(), name
        elif isinstance(new, SamplingSettings):
            assert old == new and new.cfg_scale == 2.5
        else:
            assert old.settings == new.settings and new.settings.cfg_scale == 2.5, name
            assert all(getattr(old, k).tobytes() == getattr(new, k).tobytes()
                       for k in ("images", "disc_tokens", "vq_tokens", "disc_probs")), name
    with pytest.raises(TypeError, match=r"cfg_scale and cfg \(its old name\) both given: pass cfg_scale only"):
        model.generate([0], cfg=2.0, cfg_scale=2.0)


TUNED = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, cfg_scale=3.0, stage2_temperature=0.5, stage2_top_k=6,
                       stage2_top_p=0.7)
EXPLICIT = dict(temperature=0.8, top_k=5, top_p=0.9, cfg_scale=3.0, stage2_temperature=0.5, stage2_top_k=6,
                stage2_top_p=0.7)
OFF = dict(top_k=0, top_p=1.0, cfg_scale=1.0, stage2_top_k=0, stage2_top_p=1.0)


def _same(a, b) -> bool:
    return np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)


def test_omitted_settings_are_the_models_defaults_explicit_ones_are_used(model: DiGIT, monkeypatch) -> None:
    monkeypatch.setattr(model.config, "sampling", TUNED)
    d = model.generate([0, 1, 2, 0], seed=1)
    assert d.settings == SamplingSettings(**EXPLICIT) and d.seed == 1
    assert _same(d, model.generate([0, 1, 2, 0], seed=1, **EXPLICIT))
    off = model.generate([0, 1, 2, 0], seed=1, **OFF)
    assert off.settings == SamplingSettings(0.8, 0, 1.0, 1.0, 0.5, 0, 1.0)
    assert not _same(off, d)
    # "off" spelled explicitly is what a model whose defaults are all off samples
    monkeypatch.setattr(model.config, "sampling", SamplingConfig(temperature=0.8, stage2_temperature=0.5,
                                                                  stage2_top_p=None))
    assert _same(model.generate([0, 1, 2, 0], seed=1), off)
    assert model.sampling_settings() == off.settings


def test_completions_follow_the_same_rule(model: DiGIT, monkeypatch) -> None:
    monkeypatch.setattr(model.config, "sampling", TUNED)
    img = _images(1, seed=5)[0]
    with_class = model.complete_detailed(img, keep_rows=2, n=3, class_id=1, seed=0)
    assert with_class.settings == SamplingSettings(**EXPLICIT)
    assert _same(with_class, model.complete_detailed(img, keep_rows=2, n=3, class_id=1, seed=0, **EXPLICIT))
    # without a class the null class conditions it: the default guidance does not apply ...
    null = model.complete_detailed(img, keep_rows=2, n=3, seed=0)
    assert null.settings.cfg_scale == 1.0 and null.settings.top_k == 5
    # ... and guidance asked for explicitly is refused rather than dropped
    with pytest.raises(ValueError, match="null class"):
        model.complete_detailed(img, keep_rows=2, n=3, seed=0, cfg_scale=2.0)
    assert _same(null, model.complete_detailed(img, keep_rows=2, n=3, seed=0, cfg_scale=1.0))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate([0], cfg_scale=NAN), r"cfg_scale must be a finite number in \[0, 100\] \(1 = off\), got nan"),
    (lambda m: m.generate([0], cfg_scale=INF), r"cfg_scale must be a finite number in \[0, 100\]"),
    (lambda m: m.generate([0], cfg_scale=-1.0), r"cfg_scale must be a finite number in \[0, 100\]"),
    (lambda m: m.generate([0], top_p=NAN), r"top_p must be a finite number in \(0, 1\] \(1 = off\), got nan"),
    (lambda m: m.generate([0], top_k=NAN), r"top_k must be an integer >= 0 \(0 = off\), got nan"),
    (lambda m: m.generate([0], top_k=1e400), r"top_k must be an integer >= 0"),
    (lambda m: m.generate([0], temperature=NAN), r"temperature must be a finite number >= 0"),
    (lambda m: m.generate([0], stage2_top_p=NAN), r"stage2_top_p must be a finite number in \(0, 1\]"),
    (lambda m: m.generate([0], stage2_temperature=INF), r"stage2_temperature must be a finite number >= 0"),
    (lambda m: m.generate([0], seed=2 ** 64), r"seed must be an integer in \[0, 2\*\*63\), got 18446744073709551616"),
    (lambda m: m.generate([0], seed=NAN), r"seed must be an integer in \[0, 2\*\*63\)"),
    (lambda m: m.complete(_images(1)[0], keep_rows=NAN), r"keep_rows must be an integer in 1\.\.3"),
    (lambda m: m.complete(_images(1)[0], keep_rows=1.5), r"keep_rows must be an integer in 1\.\.3"),
    (lambda m: m.complete(_images(1)[0], keep_rows=2, n=NAN), r"n must be a positive integer, got nan"),
    (lambda m: m.complete(_images(1)[0], keep_rows=2, class_id=NAN), r"class_id must be an integer in 0\.\.2"),
    (lambda m: m.complete(_images(1)[0], keep_rows=2, seed=2 ** 63), r"seed must be an integer in \[0, 2\*\*63\)"),
    (lambda m: m.complete(_images(1)[0], keep_rows=2, cfg_scale=NAN), r"cfg_scale must be a finite number"),
    (lambda m: m.complete_many(_images(2), keep_rows=2, top_p=NAN), r"top_p must be a finite number"),
])
def test_bad_numbers_are_refused_before_any_network_runs(model: DiGIT, call, match: str, monkeypatch) -> None:
    ran: list[str] = []
    for op in ("encode_disc", "open_stage1", "open_stage2", "decode_vq"):
        monkeypatch.setattr(model, op, lambda *a, op=op: ran.append(op))
    with pytest.raises(ValueError, match=match):
        call(model)
    assert ran == []


def test_unconditional_n_and_keep_percent_are_checked() -> None:
    m = DiGIT(tiny(num_classes=0))
    with pytest.raises(ValueError, match=r"n must be a positive integer, got nan"):
        m.sample(n=NAN)
    with pytest.raises(ValueError, match=r"cfg_scale=2 asked for, but an unconditional model"):
        m.sample(n=1, cfg_scale=2.0)
    for bad in (NAN, INF, -5.0, 101.0):
        with pytest.raises(ValueError, match=r"keep_percent must be a finite number in \[0, 100\]"):
            keep_rows_for(bad, 8)
    assert [keep_rows_for(p, 8) for p in (0, 12.5, 50, 87.5, 100)] == [1, 1, 4, 7, 7]


def test_on_token_streams_every_stage1_token(model: DiGIT) -> None:
    seen: list[tuple[int, tuple[int, ...]]] = []
    g = model.generate([1, 2], seed=0, on_token=lambda t, ids: seen.append((t, ids.shape)))
    assert [t for t, _ in seen] == list(range(16))
    assert seen[-1][1] == (2, 16)
    assert g.disc_tokens.shape == (2, 4, 4)


def test_tokenize(model: DiGIT) -> None:
    imgs = _images(2)
    ids, dist, feats = model.tokenize(imgs)
    assert ids.shape == (2, 4, 4) and dist.shape == (2, 4, 4) and feats.shape == (2, 4, 4, 32)
    ref = ((feats[..., None, :] - model.codebook.centroids.numpy()) ** 2).sum(-1)
    assert np.array_equal(ids, ref.argmin(-1))
    # grey images are accepted and equal their 3-channel version
    grey = imgs[..., 0]
    assert np.array_equal(model.tokenize(grey)[0], model.tokenize(np.repeat(grey[..., None], 3, -1))[0])


def test_complete_keeps_the_top_rows(model: DiGIT) -> None:
    img = _images(1, seed=5)[0]
    ids = model.tokenize(img[None])[0][0]
    g = model.complete_detailed(img, keep_rows=2, n=3, class_id=1, seed=0)
    assert g.images.shape == (3, 16, 16, 3)
    assert (g.disc_tokens[:, :2] == ids[:2]).all()
    assert np.array_equal(g.images, model.complete(img, keep_rows=2, n=3, class_id=1, seed=0))
    # without a class id the null class conditions the continuation
    assert model.complete(img, keep_rows=3, n=2).shape == (2, 16, 16, 3)


def test_unconditional_model() -> None:
    m = DiGIT(tiny(num_classes=0))
    assert m.sample(n=2, seed=0).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(class_ids=[0])
    assert m.complete(_images(1)[0], keep_rows=1, n=2).shape == (2, 16, 16, 3)


def test_save_load_round_trip_is_bit_exact(model: DiGIT, tmp_path: Path) -> None:
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DiGIT.load(tmp_path / "m")
    a, b = model.own_state_dict(), loaded.own_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == model.config
    assert np.array_equal(loaded.sample(class_ids=[1], seed=2), model.sample(class_ids=[1], seed=2))
    # saving over an existing model replaces it whole
    model.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("call, match", [
    (lambda m: m.sample(class_ids=[3]), r"class ids \[3\] out of range"),
    (lambda m: m.sample(class_ids=[-1]), "out of range"),
    (lambda m: m.sample(class_ids=[]), "non-empty"),
    (lambda m: m.sample(class_ids=[0.5]), "integers"),
    (lambda m: m.sample(n=2), "class-conditional"),
    (lambda m: m.sample(class_ids=[0], top_p=2.0), "top_p"),
    (lambda m: m.sample(class_ids=[0], seed=-3), "seed"),
    (lambda m: m.tokenize(np.zeros((1, 8, 8, 3), np.uint8)), r"\[N, 16, 16, 3\]"),
    (lambda m: m.tokenize(np.zeros((1, 16, 16, 3), np.float32)), "uint8"),
    (lambda m: m.tokenize(np.zeros((0, 16, 16, 3), np.uint8)), "empty batch"),
    (lambda m: m.tokenize(np.zeros((1, 16, 16, 4), np.uint8)), "images must be"),
    (lambda m: m.complete(np.zeros((16, 16, 3), np.uint8), keep_rows=4), "keep_rows"),
    (lambda m: m.complete(np.zeros((16, 16, 3), np.uint8), keep_rows=0), "keep_rows"),
    (lambda m: m.complete(np.zeros((2, 16, 16, 3), np.uint8), keep_rows=1), "one image"),
    (lambda m: m.complete(np.zeros((16, 16, 3), np.uint8), keep_rows=1, class_id=9), r"class_id must be an integer in 0\.\.2"),
])
def test_bad_inputs_raise_clear_errors(model: DiGIT, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(model)


def test_cfg_needs_a_null_class() -> None:
    cfg = tiny()
    cfg.stage1.null_class_id = None
    with pytest.raises(ValueError, match="label dropout"):
        DiGIT(cfg).sample(class_ids=[0], cfg_scale=2.0)


def test_mismatched_or_broken_model_files(model: DiGIT, tmp_path: Path) -> None:
    model.save(tmp_path / "m")
    # weights from another config
    other = tiny()
    other.stage1.gpt.d_model = 64
    other.stage1.gpt.d_ff = 128
    with pytest.raises(ConfigError, match="shape mismatches"):
        DiGIT(other).load_weights(dict(model.own_state_dict()))
    # a config with an unknown key
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    d["stage1"]["gpt"]["n_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="n_layers"):
        DiGIT.load(tmp_path / "m")
    # an inconsistent config
    d["stage1"]["gpt"].pop("n_layers")
    d["codebook"]["size"] = 17
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="codebook.size"):
        DiGIT.load(tmp_path / "m")
    model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        DiGIT.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DiGIT.load(tmp_path / "m")


def test_a_config_with_the_old_sampling_key_cfg_reads_as_cfg_scale() -> None:
    """Bundle formats 3 and 4 (and model folders of their time) wrote the guidance scale as
    ``sampling.cfg``: it is read as ``cfg_scale``, written back as ``cfg_scale``; both keys at once are an error."""
    d = tiny().to_dict()
    assert "cfg" not in d["sampling"] and d["sampling"]["cfg_scale"] is None
    del d["sampling"]["cfg_scale"]
    d["sampling"]["cfg"] = 2.5
    c = DiGITConfig.from_dict(d)
    assert c.sampling.cfg_scale == 2.5 and "cfg" in d["sampling"]   # the caller's dict is left as it was
    assert c.to_dict()["sampling"] == {**tiny().to_dict()["sampling"], "cfg_scale": 2.5}
    d["sampling"]["cfg_scale"] = 2.5
    with pytest.raises(ConfigError, match=r"both cfg_scale and cfg \(its old name\) are set; keep cfg_scale only"):
        DiGITConfig.from_dict(d)


def test_config_round_trip_and_unknown_preset() -> None:
    c = tiny()
    assert DiGITConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    from digit_core.presets import preset
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
