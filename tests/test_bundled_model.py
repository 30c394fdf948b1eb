"""The bundled Fashion-MNIST model: the bundle, the committed stage weights and the assets agree."""
import json
from pathlib import Path

import numpy as np
import pytest

from digit_core.demo import Model
from digit_core.images import load_image
from digit_core.pipeline import DiGIT
from digit_core.runtime import load_bundle
from training.assets import slug

ROOT = Path(__file__).parents[1]
BUNDLE, WEIGHTS, ASSETS = ROOT / "exported" / "fmnist", ROOT / "weights" / "fmnist", ROOT / "assets"
PARTS = {"encoder": "encoder/encoder.safetensors", "codebook": "codebook/codebook.safetensors",
         "vqgan": "vqgan/vqgan.safetensors", "stage1": "stage1/stage1.safetensors", "stage2": "stage2/stage2.safetensors"}


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE, device="cpu", threads=2)


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> DiGIT:
    """The committed float16 stage weights, assembled the documented way."""
    from training.assemble import main
    root = tmp_path_factory.mktemp("assemble")
    main(["--config", str(ROOT / "training" / "fmnist.yaml"), f"--root={root}", "--workers=0",
          *(f"--{k}={WEIGHTS / v}" for k, v in PARTS.items())])
    return DiGIT.load(root / "model")


def _examples() -> np.ndarray:
    files = sorted((ASSETS / "examples" / "fmnist").glob("*.png"))
    return np.stack([load_image(f, 32) for f in files])


def test_bundle_is_the_documented_model(bundle) -> None:
    c = bundle.config
    assert (c.name, c.image_size, c.channels, c.codebook.size, c.stage1.num_classes) == ("fmnist", 32, 1, 512, 10)
    assert "labels" in c.encoder.source   # the labelled fallback is named as such
    man = json.loads((BUNDLE / "manifest.json").read_text())
    assert man["weights"] == "float16 storage, float32 compute"
    assert (BUNDLE / "MODEL_CARD.md").is_file()


def test_bundle_and_committed_weights_fit_the_size_budget() -> None:
    size = sum(f.stat().st_size for f in BUNDLE.iterdir()) + sum(f.stat().st_size for f in WEIGHTS.rglob("*.safetensors"))
    assert size < 60e6, f"bundle + stage weights are {size / 1e6:.1f} MB"


def test_committed_weights_reproduce_the_bundle(bundle, assembled: DiGIT) -> None:
    imgs = _examples()
    ids, _, feats = bundle.tokenize(imgs)
    rids, _, rfeats = assembled.tokenize(imgs)
    assert np.abs(feats - rfeats).max() <= 1e-3 * np.abs(rfeats).max()
    # float32 summation order (onnxruntime vs torch kernels) may flip a near-tie
    assert (ids == rids).mean() >= 0.999
    assert (bundle.vq_tokenize(imgs) == assembled.vq_tokenize(imgs)).mean() >= 0.995
    a, b = bundle.generate([0, 5, 9], seed=1), assembled.generate([0, 5, 9], seed=1)
    assert np.array_equal(a.disc_tokens, b.disc_tokens) and np.array_equal(a.vq_tokens, b.vq_tokens)
    assert np.abs(a.images.astype(int) - b.images).max() <= 1


def test_assets_cover_the_classes_and_clusters(bundle) -> None:
    names = sorted(p.stem.rsplit("-", 1)[0] for p in (ASSETS / "examples" / "fmnist").glob("*.png"))
    assert set(names) == {slug(n) for n in bundle.class_names} and len(names) == 30
    sizes = json.loads((ASSETS / "clusters" / "fmnist" / "sizes.json").read_text())
    assert len(sizes["sizes"]) == 512 and sum(sizes["sizes"]) == sizes["images"] * 64
    galleries = {int(p.stem) for p in (ASSETS / "clusters" / "fmnist").glob("*.png")}
    assert galleries == {k for k, n in enumerate(sizes["sizes"]) if n > 0}
    m = Model(BUNDLE, bundle)   # the app finds them
    assert m.cluster_gallery(0) is not None and "train split" in m.cluster_sizes()[1]


def test_examples_tokenize_into_used_clusters(bundle) -> None:
    ids = bundle.tokenize(_examples())[0]
    sizes = np.asarray(json.loads((ASSETS / "clusters" / "fmnist" / "sizes.json").read_text())["sizes"])
    assert (sizes[ids.ravel()] > 0).mean() > 0.99   # test patches land in clusters the training patches use
