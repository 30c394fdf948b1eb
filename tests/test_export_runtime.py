"""ONNX export + onnxruntime runtime against the PyTorch pipeline, on tiny random models."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digit_core.config import SamplingConfig
from digit_core.presets import tiny
from digit_core.export import export_bundle
from digit_core.pipeline import DiGIT
from digit_core.runtime import Bundle, BundleError, load_bundle


def _model(num_classes: int = 3) -> DiGIT:
    torch.manual_seed(0)
    m = DiGIT(tiny(num_classes))
    with torch.no_grad():   # spread the centroids so tokenize uses many clusters
        m.codebook.set_centroids(torch.randn(16, 32))
    return m


@pytest.fixture(scope="module")
def model() -> DiGIT:
    return _model()


@pytest.fixture(scope="module")
def bundle_dir(model: DiGIT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(model, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir, device="cpu", threads=1)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "b"))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_bundle_layout_and_manifest(bundle_dir: Path, bundle: Bundle) -> None:
    man = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(man["files"]) == {"config.json", "tokenizer.onnx", "vq_encoder.onnx", "vq_decoder.onnx",
                                 "stage1.onnx", "stage2.onnx"}
    assert man["format_version"] == 5 and man["weights"] == "float32" and man["opset"] == 17 and man["ir_version"] <= 13
    assert man["disc_grid"] == 4 and man["vq_grid"] == 4 and man["class_names"] == ["class 0", "class 1", "class 2"]
    assert json.loads(json.dumps(bundle.config.to_dict())) == man["config"] and bundle.class_names == man["class_names"]
    assert bundle.provider == "CPUExecutionProvider"
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left


def test_every_graph_matches_pytorch(model: DiGIT, bundle: Bundle) -> None:
    imgs = _images(3)
    ids, dists, feats = bundle.tokenize(imgs)
    rids, rdists, rfeats = model.tokenize(imgs)
    assert np.array_equal(ids, rids) and _rel(dists, rdists) <= 1e-4 and _rel(feats, rfeats) <= 1e-4
    assert np.array_equal(bundle.vq_tokenize(imgs), model.vq_tokenize(imgs))
    (vids, lat), (rvids, rlat) = bundle.vq_encode(imgs), model.vq_encode(imgs)
    assert np.array_equal(vids, rvids) and lat.shape == (3, 4, 4, model.config.vqgan.embed_dim) and _rel(lat, rlat) <= 1e-4
    vq = np.random.default_rng(1).integers(0, 32, (3, 4, 4))
    assert np.abs(bundle.decode_vq(vq).astype(int) - model.decode_vq(vq)).max() <= 1
    for name, gpt in (("stage1", model.stage1), ("stage2", model.stage2)):
        tokens = np.random.default_rng(2).integers(0, gpt.cfg.vocab_size, (2, gpt.cfg.context))
        with torch.no_grad():
            full = gpt(torch.from_numpy(tokens)).numpy()
        # prefill 7 tokens, then decode one at a time: every step equals the full forward
        step = getattr(bundle, f"open_{name}")(2)
        got = [step(tokens[:, :7], 0)] + [step(tokens[:, t:t + 1], t) for t in range(7, gpt.cfg.context)]
        assert _rel(np.stack(got, 1), full[:, 6:]) <= 1e-4, name
        # and cache decoding equals a fresh full prefill in onnxruntime
        for t in (8, gpt.cfg.context - 1):
            assert _rel(got[t - 6], getattr(bundle, f"open_{name}")(2)(tokens[:, :t + 1], 0)) <= 1e-5, name


def test_same_tokens_as_pytorch(model: DiGIT, bundle: Bundle) -> None:
    for kw in (dict(top_k=8), dict(cfg_scale=2.0, top_p=0.9)):
        a, b = bundle.generate([0, 2, 1], seed=5, **kw), model.generate([0, 2, 1], seed=5, **kw)
        assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
        assert np.abs(a.images.astype(int) - b.images).max() <= 1
    img = _images(1, seed=3)[0]
    a = bundle.complete_detailed(img, keep_rows=2, n=3, class_id=1, seed=0)
    b = model.complete_detailed(img, keep_rows=2, n=3, class_id=1, seed=0)
    assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
    assert np.abs(a.images.astype(int) - b.images).max() <= 1


def test_both_backends_take_the_same_defaults(model: DiGIT, bundle: Bundle, monkeypatch) -> None:
    # the runtime reads its config.json's "sampling"; set non-trivial defaults on both configs
    tuned = SamplingConfig(temperature=0.9, top_k=6, top_p=0.95, cfg_scale=2.0, stage2_top_k=8, stage2_top_p=0.9)
    for m in (model, bundle):
        monkeypatch.setattr(m.config, "sampling", tuned)
    a, b = bundle.generate([0, 2, 1], seed=5), model.generate([0, 2, 1], seed=5)
    assert a.settings == b.settings == bundle.sampling_settings()
    assert (a.settings.top_k, a.settings.cfg_scale, a.settings.stage2_top_k) == (6, 2.0, 8)
    assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
    off = bundle.generate([0, 2, 1], seed=5, top_k=0, top_p=1, cfg_scale=1)
    assert (off.settings.top_k, off.settings.top_p, off.settings.cfg_scale) == (0, 1.0, 1.0)
    assert np.array_equal(off.disc_tokens, model.generate([0, 2, 1], seed=5, top_k=0, top_p=1, cfg_scale=1).disc_tokens)


def test_runtime_refuses_bad_numbers_before_running_a_graph(bundle: Bundle, monkeypatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(bundle, "sessions", {g: None for g in bundle.sessions})   # any graph run would fail
    for op in ("encode_disc", "open_stage1"):
        monkeypatch.setattr(bundle, op, lambda *a, op=op: ran.append(op))
    for kw, match in ((dict(cfg_scale=float("nan")), "cfg_scale must be"), (dict(seed=2 ** 64), "seed must be"),
                      (dict(top_k=float("nan")), "top_k must be"), (dict(top_p=float("nan")), "top_p must be")):
        with pytest.raises(ValueError, match=match):
            bundle.generate([0, 1], **kw)
    with pytest.raises(ValueError, match="keep_rows must be"):
        bundle.complete(_images(1)[0], keep_rows=float("nan"))
    assert ran == []


def test_seeds_reproduce(bundle: Bundle) -> None:
    a = bundle.sample(class_ids=[0, 1], seed=0)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, bundle.sample(class_ids=[0, 1], seed=0))
    assert not np.array_equal(bundle.generate([0, 1], seed=0).disc_tokens, bundle.generate([0, 1], seed=1).disc_tokens)


def test_bad_inputs_are_value_errors(bundle: Bundle) -> None:
    with pytest.raises(ValueError, match="out of range"):
        bundle.sample(class_ids=[3])
    with pytest.raises(ValueError, match="must be"):
        bundle.tokenize(_images(1)[:, :8])
    with pytest.raises(ValueError, match="uint8"):
        bundle.tokenize(_images(1).astype(np.float32))
    with pytest.raises(ValueError, match="keep_rows"):
        bundle.complete(_images(1)[0], keep_rows=4)


def test_tampered_missing_and_unsupported_bundles(bundle_dir: Path, tmp_path: Path) -> None:
    b = _copy(bundle_dir, tmp_path)
    data = bytearray((b / "stage2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "stage2.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="stage2.onnx"):
        load_bundle(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    (b / "vq_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing file vq_decoder.onnx"):
        load_bundle(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(b)


def _rewrite_config(b: Path, cfg: dict, **manifest: object) -> None:
    """Write ``cfg`` as bundle ``b``'s config.json, listed with its new hash (and ``manifest`` fields)."""
    from digit_core.export import sha256
    (b / "config.json").write_text(json.dumps(cfg))
    man = json.loads((b / "manifest.json").read_text())
    man["files"]["config.json"] = {"sha256": sha256(b / "config.json"), "size": (b / "config.json").stat().st_size}
    (b / "manifest.json").write_text(json.dumps({**man, **manifest}))


def test_graph_that_does_not_fit_the_config_is_named(bundle_dir: Path, tmp_path: Path) -> None:
    b = _copy(bundle_dir, tmp_path)
    cfg = json.loads((b / "config.json").read_text())
    cfg["codebook"]["dim"] = cfg["encoder"]["width"] = 64   # features are 32 wide in tokenizer.onnx
    _rewrite_config(b, cfg)
    with pytest.raises(BundleError, match="graph tokenizer"):
        load_bundle(b)


def test_a_format_4_bundle_reads_its_guidance_scale_from_the_old_key(bundle_dir: Path, bundle: Bundle,
                                                                     tmp_path: Path) -> None:
    """Formats 3 and 4 wrote the guidance scale as ``sampling.cfg``: such a bundle loads with it as its
    ``cfg_scale`` default and samples the bytes of the new key; a config with both keys is refused."""
    b = _copy(bundle_dir, tmp_path)
    cfg = json.loads((b / "config.json").read_text())
    del cfg["sampling"]["cfg_scale"]
    cfg["sampling"]["cfg"] = 2.0
    _rewrite_config(b, cfg, format_version=4)
    old = load_bundle(b, device="cpu", threads=1)
    assert old.config.sampling.cfg_scale == 2.0 and old.manifest["format_version"] == 4
    a, e = old.generate([0, 2], seed=3), bundle.generate([0, 2], seed=3, cfg_scale=2.0)
    assert a.settings == e.settings and a.images.tobytes() == e.images.tobytes()
    cfg["sampling"]["cfg_scale"] = 2.0
    _rewrite_config(b, cfg)
    with pytest.raises(BundleError, match=r"config.json: SamplingConfig: both cfg_scale and cfg \(its old name\)"):
        load_bundle(b)


def test_cuda_without_a_gpu_is_an_error(bundle_dir: Path) -> None:
    from digit_core.runtime import cuda_available
    if cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cuda"):
        load_bundle(bundle_dir, device="cuda")


def test_unconditional_model_exports_and_samples(tmp_path: Path) -> None:
    m = _model(num_classes=0)
    b = load_bundle(export_bundle(m, tmp_path / "uncond"), device="cpu")
    a = b.generate(n=2, seed=4)
    assert a.images.shape == (2, 16, 16, 3)
    assert np.array_equal(a.disc_tokens, m.generate(n=2, seed=4).disc_tokens)
    with pytest.raises(ValueError, match="unconditional"):
        b.sample(class_ids=[0])


def test_caches_hold_the_positions_a_generation_fills_not_the_position_table(tmp_path: Path) -> None:
    """Like the official ImageNet models (position tables of 1024, 256 + 256 tokens used): the KV
    caches of both backends have as many positions as a generation fills, and they still agree."""
    import dataclasses
    c = tiny(3)
    c = dataclasses.replace(c, stage1=dataclasses.replace(c.stage1, gpt=dataclasses.replace(c.stage1.gpt, max_len=40)),
                            stage2=dataclasses.replace(c.stage2, gpt=dataclasses.replace(c.stage2.gpt, max_len=40)))
    torch.manual_seed(0)
    m = DiGIT(c.validate())
    assert (c.stage1.gpt.context, c.stage1_positions, c.stage2.gpt.context, c.stage2_positions) == (40, 16, 56, 32)
    b = load_bundle(export_bundle(m, tmp_path / "long"), device="cpu", threads=1)
    for stage, T in ((1, 16), (2, 32)):
        past = [i for i in b.sessions[f"stage{stage}"].get_inputs() if i.name.startswith("past_")]
        assert len(past) == 2 * (c.stage1 if stage == 1 else c.stage2).gpt.n_layer and {i.shape[2] for i in past} == {T}
    want, got = m.generate([0, 2], seed=3, cfg_scale=2.0), b.generate([0, 2], seed=3, cfg_scale=2.0)
    assert np.array_equal(got.disc_tokens, want.disc_tokens) and np.array_equal(got.vq_tokens, want.vq_tokens)
    with pytest.raises(ValueError, match="KV cache length of 16"):
        m.stage1(torch.zeros(1, 17, dtype=torch.long), 0, m.stage1.new_cache(1, 16))


def test_runtime_imports_no_torch() -> None:
    code = "import sys, digit_core.runtime; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_concurrent_calls_equal_serial_ones(bundle: Bundle) -> None:
    from concurrent.futures import ThreadPoolExecutor
    jobs = [([0, 1], s) for s in range(4)]
    serial = [bundle.generate(c, seed=s).vq_tokens for c, s in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda j: bundle.generate(j[0], seed=j[1]).vq_tokens, jobs))
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))


def test_cli_exports_a_saved_model(model: DiGIT, bundle: Bundle, tmp_path: Path) -> None:
    from digit_core.export import main
    model.save(tmp_path / "model")
    main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "exported" / "tiny"), "--no-check"])
    again = load_bundle(tmp_path / "exported" / "tiny", device="cpu")
    assert np.array_equal(again.sample([1, 2], seed=2), bundle.sample([1, 2], seed=2))


def test_gpt_step_equals_the_in_place_cached_forward(model: DiGIT) -> None:
    gpt = model.stage2
    tokens = torch.randint(0, gpt.cfg.vocab_size, (2, gpt.cfg.context))
    with torch.no_grad():
        cache, functional = gpt.new_cache(2), gpt.new_cache(2)
        for a, b in ((0, 17), (17, 18), (18, gpt.cfg.context)):
            want = gpt(tokens[:, a:b], a, cache)[:, -1]
            got, kv = gpt.step(tokens[:, a:b], torch.tensor(a), [functional[i, j] for i in range(gpt.cfg.n_layer) for j in (0, 1)])
            assert kv.shape == (gpt.cfg.n_layer, 2, 2, gpt.cfg.n_head, b - a, gpt.cfg.head_dim)
            functional[:, :, :, :, a:b] = kv   # what the runtime does with the step's keys and values
            assert (got - want).abs().max() <= 1e-5 and (functional - cache).abs().max() <= 1e-6


def test_float16_weights_halve_the_bundle_and_match_the_rounded_model(model: DiGIT, bundle_dir: Path,
                                                                     tmp_path: Path) -> None:
    from digit_core.weights import round_weights_to_half
    half_dir = export_bundle(model, tmp_path / "half", weights="float16")   # its own check vs the rounded model passed
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.onnx"))
    assert size(half_dir) < 0.6 * size(bundle_dir)
    man = json.loads((half_dir / "manifest.json").read_text())
    assert man["weights"] == "float16 storage, float32 compute"
    half, rounded = load_bundle(half_dir, device="cpu", threads=1), round_weights_to_half(model)
    a, b = half.generate([0, 1], seed=3), rounded.generate([0, 1], seed=3)
    assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
    imgs = _images(2)
    assert _rel(half.tokenize(imgs)[2], model.tokenize(imgs)[2]) <= 1e-2   # rounding moves features a little
    with pytest.raises(ValueError, match="weights"):
        export_bundle(model, tmp_path / "bad", weights="int4")   # int8 is a format since 3a6b312


def test_complete_many_is_a_batch_of_single_completions(model: DiGIT, bundle: Bundle) -> None:
    imgs = _images(3, seed=7)
    a = bundle.complete_many(imgs, keep_rows=2, seed=4, top_k=8)
    assert np.array_equal(a.disc_tokens, model.complete_many(imgs, keep_rows=2, seed=4, top_k=8).disc_tokens)
    # each row keeps its own image's top rows; row 0 is complete() of image 0 (both seeded (4, 0))
    assert np.array_equal(a.disc_tokens[:, :2], bundle.tokenize(imgs)[0][:, :2])
    one = bundle.complete_detailed(imgs[0], keep_rows=2, n=1, seed=4, top_k=8)
    assert np.array_equal(one.disc_tokens[0], a.disc_tokens[0]) and np.array_equal(one.images[0], a.images[0])
    with pytest.raises(ValueError, match="2 class_ids for 3 images"):
        bundle.complete_many(imgs, keep_rows=2, class_ids=[0, 1])


def test_render_turns_real_tokens_into_images_as_pytorch_does(model: DiGIT, bundle: Bundle) -> None:
    """Flows.render: stage 2 + the VQ decoder on given stage-1 grids (the thesis report's stage-2 ceiling)."""
    codes = bundle.tokenize(_images(3, seed=2))[0]
    a, b = bundle.render(codes, seed=1, stage2_top_k=8), model.render(codes, seed=1, stage2_top_k=8)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8 and np.abs(a.astype(int) - b).max() <= 1
    # row i is seeded (seed, i): the first row alone equals the first row of the batch
    assert np.array_equal(bundle.render(codes[:1], seed=1, stage2_top_k=8)[0], a[0])
    with pytest.raises(ValueError, match="codes must be"):
        bundle.render(codes[:, :2])
    with pytest.raises(ValueError, match="codes must be"):
        bundle.render(np.full_like(codes, 10_000))
    with pytest.raises(TypeError, match="only the stage2_"):
        bundle.render(codes, top_k=3)


def test_conv_stem_encoder_exports_and_tokenizes_like_pytorch(tmp_path: Path) -> None:
    cfg = tiny(3)
    cfg.encoder.stem = "conv"
    torch.manual_seed(1)
    m = DiGIT(cfg.validate())
    assert isinstance(m.encoder.vit.patch_embed.proj, torch.nn.Sequential)
    with torch.no_grad():
        m.codebook.set_centroids(torch.randn(16, 32))
    b = load_bundle(export_bundle(m, tmp_path / "conv"), device="cpu", threads=1)
    assert b.config.encoder.stem == "conv"
    imgs = _images(4, seed=7)
    (ids, _, feats), (rids, _, rfeats) = b.tokenize(imgs), m.tokenize(imgs)
    assert _rel(feats, rfeats) < 1e-4 and np.array_equal(ids, rids)
