"""training.assets on a tiny grey bundle and a tiny labelled image folder: the examples, the
cluster galleries and sizes it writes, and that the demo finds them where it looks."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_core import demo
from digit_core.presets import tiny
from digit_core.data import ImageFolder
from digit_core.export import export_bundle
from digit_core.images import load_image
from digit_core.pipeline import DiGIT
from digit_core.runtime import Bundle, load_bundle
from training import assets
from test_training import make_folder   # tests/ is on sys.path under pytest

FAR = 15   # a centroid no patch is near: its cluster gets no gallery


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = tiny(3)
    cfg.channels = 1   # grey, like the Fashion-MNIST bundle: examples are written as 'L' PNGs
    m = DiGIT(cfg.validate())
    with torch.no_grad():   # spread the centroids so tokenize uses many clusters
        c = torch.randn(16, 32)
        c[FAR] = 1e3
        m.codebook.set_centroids(c)
    return export_bundle(m, tmp_path_factory.mktemp("exported") / "tiny", check=False)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir, device="cpu", threads=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def _run(bundle_dir: Path, folder: Path, out: Path, gallery: int = 4) -> assets.Report:
    return assets.main(["--bundle", str(bundle_dir), "--data", str(folder), "--out", str(out),
                        "--examples_per_class", "2", "--gallery", str(gallery), "--fraction", "0.5",
                        "--batch_size", "8", "--device", "cpu", "--threads", "1"])


def _hidden(out: Path) -> list[Path]:
    return list(out.rglob(".*"))


def test_assets_end_to_end(bundle_dir: Path, bundle: Bundle, folder: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "ASSETS", tmp_path / "assets")   # the demo looks in the project's assets/
    r = _run(bundle_dir, folder, Path("assets"))
    data = ImageFolder(folder, 16, channels=1, train=False)
    uint8 = lambda i: assets.as_uint8(data[i][0][None])[0]  # noqa: E731

    # examples: 2 per class, named after the bundle's classes, grey PNGs that load back exactly
    ex_dir = Path("assets/examples/tiny")
    names = [f"class-{c}-{i}.png" for c in range(3) for i in (1, 2)]
    assert sorted(p.name for p in ex_dir.iterdir()) == names and [p.name for p in r.examples] == names
    picks = assets.pick_examples(np.asarray(data.targets), 3, 2, 0)
    assert len({i for _, i in picks}) == 6
    for path, (c, i) in zip(r.examples, picks):
        assert path.name.startswith(f"class-{c}-") and data.targets[i] == c
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (16, 16)
        assert np.array_equal(load_image(path, 16), uint8(i))

    # sizes: every patch of the sampled images counted, as the bundle tokenizes them
    idx = assets.sample_indices(len(data), 0.5, 0)
    imgs = np.stack([uint8(i) for i in idx])
    batches = [bundle.tokenize(imgs[i:i + 8]) for i in range(0, len(imgs), 8)]   # as the CLI batches them
    ids, dists = (np.concatenate([b[j] for b in batches]) for j in (0, 1))
    cl_dir = Path("assets/clusters/tiny")
    d = json.loads((cl_dir / "sizes.json").read_text())
    assert d["images"] == len(idx) == 20 and d["fraction"] == 0.5 and d["split"] == "train"
    assert sum(d["sizes"]) == ids.size == 20 * 16
    assert d["sizes"] == np.bincount(ids.ravel(), minlength=16).tolist() == r.sizes.tolist()

    # a gallery exactly for the clusters that have patches; the far one has none
    used = set(np.unique(ids).tolist())
    assert FAR not in used and len(used) >= 4
    assert {p.name for p in cl_dir.iterdir()} == {f"{k}.png" for k in used} | {"sizes.json", "distances.json"}

    # each gallery holds the nearest patches: recomputed by brute force over the sample
    for k in used:
        pos, rows, cols = np.nonzero(ids == k)
        near = np.argsort(dists[pos, rows, cols], kind="stable")[:4]
        got = r.galleries[k]
        assert len(got) == min(4, len(pos))
        assert np.array_equal([p.dist for p in got], dists[pos, rows, cols][near])
        assert [(p.index, p.row, p.col) for p in got] == [(int(idx[pos[j]]), rows[j], cols[j]) for j in near]
        want = assets.render_gallery(imgs[pos[near]], list(zip(rows[near], cols[near])), 4, 2)
        with Image.open(cl_dir / f"{k}.png") as im:
            assert im.mode == "P" and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want.convert("RGB")))
    # the picture: each tile's centre cell is its patch, outlined in orange
    k = max(used, key=lambda j: (ids == j).sum())
    p0 = r.galleries[k][0]
    pic = np.asarray(Image.open(cl_dir / f"{k}.png").convert("RGB"))
    s = assets.TARGET_WIDTH // (2 * 3 * 4)
    gap = max(2, s // 2)
    cell = pic[gap + 4 * s: gap + 8 * s: s, gap + 4 * s: gap + 8 * s: s]
    assert np.abs(cell.astype(int) - uint8(p0.index)[4 * p0.row: 4 * p0.row + 4, 4 * p0.col: 4 * p0.col + 4]).max() <= 1
    assert tuple(pic[gap + 4 * s - 1, gap + 6 * s]) == assets.OUTLINE

    # the demo, opened as the app opens it, finds all of it
    m = demo.Model(bundle_dir, load_bundle(bundle_dir, device="cpu", threads=1))
    assert m.example_names() == [n[:-4] for n in names] and "examples/tiny" in m.examples()[1]   # shown without the server's directories
    sizes, source = m.cluster_sizes()
    assert np.array_equal(sizes, r.sizes) and "20 images of the train split" in source and "sizes.json" in source
    full = tmp_path / cl_dir
    assert m.cluster_dir() == full and m.cluster_gallery(k) == full / f"{k}.png" and m.cluster_gallery(FAR) is None
    assert not _hidden(Path("assets"))   # no temp folders left


def test_distance_percentiles_of_training_images(bundle_dir: Path, bundle: Bundle, folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """distances.json: percentiles of each training image's mean squared distance to its nearest
    centroids, over the training images outside the cluster sample (K-Means saw those), recomputed
    here by hand; ``--only distances`` rewrites just that file; the demo reads it, for this
    tokenizer only."""
    monkeypatch.setattr(assets, "REFERENCE_IMAGES_MIN", 1)
    out = tmp_path / "assets"
    _run(bundle_dir, folder, out)
    f = out / "clusters/tiny/distances.json"
    ref = json.loads(f.read_text())
    data = ImageFolder(folder, 16, channels=1, train=False)
    cluster = assets.sample_indices(len(data), 0.5, 0)
    rest = sorted(set(range(len(data))) - set(cluster.tolist()))
    assert ref["images"] == len(rest) == 20 and ref["outside_cluster_sample"] and ref["split"] == "train"
    imgs = np.stack([assets.as_uint8(data[i][0][None])[0] for i in rest])
    per_image = bundle.tokenize(imgs)[1].reshape(20, -1).astype(np.float64).mean(1)
    want = np.percentile(per_image, [50, 90, 95, 99, 99.9])
    assert list(ref["percentiles"]) == ["50", "90", "95", "99", "99.9"]
    assert np.allclose(list(ref["percentiles"].values()), want, rtol=1e-5) and ref["max"] == pytest.approx(per_image.max())
    assert ref["tokenizer_sha256"] == bundle.manifest["files"]["tokenizer.onnx"]["sha256"] and ref["grid"] == 4

    # alone: only distances.json changes (here: fewer images), the galleries and sizes stay
    others = {p.name: p.read_bytes() for p in f.parent.iterdir() if p.name != "distances.json"}
    r = assets.main(["--bundle", str(bundle_dir), "--data", str(folder), "--out", str(out), "--fraction", "0.5",
                     "--reference_images", "5", "--only", "distances", "--device", "cpu", "--threads", "1"])
    assert json.loads(f.read_text())["images"] == 5 and "99th percentile" in r.message
    assert {p.name: p.read_bytes() for p in f.parent.iterdir() if p.name != "distances.json"} == others
    assert not _hidden(out)
    with pytest.raises(ValueError, match="run without --only first"):
        assets.main(["--bundle", str(bundle_dir), "--data", str(folder), "--out", str(tmp_path / "none"),
                     "--only", "distances", "--device", "cpu"])

    # the demo reads it for this tokenizer; for another one (a retrained bundle) it has none
    monkeypatch.setattr(demo, "ASSETS", out)
    m = demo.Model(bundle_dir, load_bundle(bundle_dir, device="cpu", threads=1))
    assert m.distance_reference().p99 == pytest.approx(json.loads(f.read_text())["percentiles"]["99"])
    f.write_text(json.dumps(ref | {"tokenizer_sha256": "0" * 64}))
    assert demo.Model(bundle_dir, m.flows).distance_reference() is None


def test_rerun_replaces_and_interrupted_run_keeps_old(bundle_dir: Path, folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "assets"
    _run(bundle_dir, folder, out, gallery=4)
    r = _run(bundle_dir, folder, out, gallery=1)
    assert all(len(ps) == 1 for ps in r.galleries.values()) and not _hidden(out)
    before = {p.name: p.read_bytes() for p in (out / "clusters/tiny").iterdir()}

    def crash(*args, **kwargs):
        (args[-1] / "0.png").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(assets, "write_galleries", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(bundle_dir, folder, out, gallery=4)
    assert {p.name: p.read_bytes() for p in (out / "clusters/tiny").iterdir()} == before and not _hidden(out)


def _fake_fmnist(root: Path) -> Path:
    """Four 28x28 images in the idx format, for both splits."""
    root.mkdir()
    for split in ("train", "t10k"):
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB3I", 0, 8, 3, 4, 28, 28) + bytes(4 * 28 * 28))
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, 4) + bytes(range(4)))
    return root


def test_bad_inputs_are_clear_errors(bundle_dir: Path, folder: Path, tmp_path: Path) -> None:
    with pytest.raises(demo.ModelMissing, match="No model bundle at .*training/fmnist.sh"):
        assets.main(["--bundle", str(tmp_path / "nope"), "--data", str(folder), "--out", str(tmp_path / "a")])
    fm = _fake_fmnist(tmp_path / "fm")
    with pytest.raises(ValueError, match=r"cannot be used with bundle .*16x16 .*at least 28"):
        assets.main(["--bundle", str(bundle_dir), "--data", f"fmnist@{fm}", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        assets.main(["--bundle", str(bundle_dir), "--data", str(folder), "--fraction", "0"])
    with pytest.raises(SystemExit):
        assets.main(["--bundle", str(bundle_dir), "--data", str(folder), "--reference_images", "10"])
    assert not (tmp_path / "a").exists()
