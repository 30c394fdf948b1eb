"""The bundled Fashion-MNIST models: the self-supervised bundle, the committed stage weights of
the label-trained one, the assets, and the size budget of the tracked tree."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from digit_core.demo import Model
from digit_core.images import load_image
from digit_core.pipeline import DiGIT
from digit_core.runtime import load_bundle
from training.assets import slug

ROOT = Path(__file__).parents[1]
BUNDLE, ASSETS = ROOT / "exported" / "fmnist", ROOT / "assets"
SUPERVISED = ROOT / "weights" / "fmnist-supervised"
PARTS = {"encoder": SUPERVISED / "encoder/encoder.safetensors", "codebook": SUPERVISED / "codebook/codebook.safetensors",
         "vqgan": BUNDLE / "vqgan.safetensors", "stage1": SUPERVISED / "stage1/stage1.safetensors",
         "stage2": SUPERVISED / "stage2/stage2.safetensors"}


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE, device="cpu", threads=2)


def _examples() -> np.ndarray:
    files = sorted((ASSETS / "examples" / "fmnist").glob("*.png"))
    return np.stack([load_image(f, 32) for f in files])


def test_bundle_is_the_self_supervised_model(bundle) -> None:
    c = bundle.config
    assert (c.name, c.image_size, c.channels, c.codebook.size, c.stage1.num_classes) == ("fmnist", 32, 1, 512, 10)
    e = c.encoder
    assert (e.kind, e.objective, e.labels) == ("cnn", "vicreg_dense", False)   # no label reached the tokenizer
    man = json.loads((BUNDLE / "manifest.json").read_text())
    assert man["weights"] == "float16 storage, float32 compute"
    card = (BUNDLE / "MODEL_CARD.md").read_text()
    assert "no label anywhere in its tokenizer" in card and "fmnist:val" in card


def test_the_committed_format_4_bundles_read_their_old_guidance_key() -> None:
    """Both committed bundles predate format 5: their config.json (sha256-pinned) names the guidance
    scale ``cfg``, which is read as ``cfg_scale``."""
    for name, scale in (("fmnist", 3.5), ("fmnist-vq", 2.5)):
        raw = json.loads((ROOT / "exported" / name / "config.json").read_text())["sampling"]
        b = load_bundle(ROOT / "exported" / name, device="cpu", threads=1)
        assert b.manifest["format_version"] == 4 and raw["cfg"] == scale and "cfg_scale" not in raw
        assert b.config.sampling.cfg_scale == scale and b.sampling_settings().cfg_scale == scale


def test_tracked_tree_fits_the_device_budget() -> None:
    """A GPU machine takes a working tree of at most 64 MiB: the tracked files stay under 60."""
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    size = sum((ROOT / p).stat().st_size for p in r.stdout.decode().split("\0") if p and (ROOT / p).is_file())
    assert size < 60 * 2 ** 20, f"the tracked tree is {size / 2 ** 20:.1f} MiB"


def test_supervised_weights_assemble_the_documented_model(tmp_path: Path) -> None:
    """The label-trained model is kept as its float16 stage weights (no second copy as a bundle):
    they assemble, the documented way, into the model that training/rebuild_bundle.sh exports."""
    from training.assemble import main
    main(["--config", str(ROOT / "training" / "fmnist_supervised.yaml"), f"--root={tmp_path}", "--workers=0",
          *(f"--{k}={v}" for k, v in PARTS.items())])
    model = DiGIT.load(tmp_path / "model")
    e = model.config.encoder
    assert (model.config.name, e.kind, e.objective, e.labels) == ("fmnist-supervised", "vit", "supervised", True)
    imgs = model.sample([0, 9], seed=0)
    assert imgs.shape == (2, 32, 32, 3)
    # one VQGAN for both models: the self-supervised bundle decodes a code grid to the same pixels
    codes = np.random.default_rng(0).integers(0, 512, (2, 8, 8))
    ours = load_bundle(BUNDLE, device="cpu", threads=1).decode_vq(codes)
    assert np.abs(model.decode_vq(codes).astype(int) - ours).max() <= 1


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


# sha256 prefixes of the bundled model's outputs for fixed seeds. A refactor must leave them as
# they are (byte-identical samples); new weights change them, and the commit that brings the
# weights updates them.
PINS = {"generate": "47d83585413d1860", "complete": "a1758ead4ffc7e88", "unguided": "6c7458fef87d03a8",
        "tokenize": "adee19e2c57fb784"}


def test_fixed_seeds_give_the_pinned_bytes(bundle) -> None:
    import hashlib

    def digest(*arrays: np.ndarray) -> str:
        return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]

    img = np.asarray(load_image(sorted((ASSETS / "examples" / "fmnist").glob("*.png"))[0], 32))
    g = bundle.generate([0, 3, 6, 9], seed=0)
    c = bundle.complete_detailed(img, keep_rows=4, n=2, seed=1)
    u = bundle.generate([1, 2], seed=5, cfg_scale=1, top_k=0)
    got = {"generate": digest(g.images, g.disc_tokens, g.vq_tokens), "complete": digest(c.images, c.disc_tokens, c.vq_tokens),
           "unguided": digest(u.images, u.disc_tokens, u.vq_tokens), "tokenize": digest(*bundle.tokenize(img[None])[:2])}
    assert got == PINS


def test_the_vq_ar_baseline_bundle_shares_the_default_bundles_vqgan(bundle) -> None:
    """exported/fmnist-vq: the same stage-1 GPT over VQ codes, its VQ graphs the default bundle's own files."""
    vq = load_bundle(ROOT / "exported" / "fmnist-vq", device="cpu", threads=2)
    c = vq.config
    assert c.is_vq and c.name == "fmnist-vq" and c.class_names == bundle.config.class_names
    assert c.stage1.gpt == bundle.config.stage1.gpt   # K = 512 codes in both: the very same GPT
    assert vq.manifest["graphs"]["vq_decoder"] == "../fmnist/vq_decoder.onnx"
    assert sorted(p.name for p in (ROOT / "exported" / "fmnist-vq").iterdir()) == [
        "MODEL_CARD.md", "config.json", "manifest.json", "stage1.onnx"]
    g = vq.generate([0, 9], seed=0)
    assert g.images.shape == (2, 32, 32, 3) and np.array_equal(g.vq_tokens, g.disc_tokens)
