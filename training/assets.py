"""Write what the demo shows beside a bundle: example images, cluster galleries, cluster sizes.

    python -m training.assets --bundle exported/fmnist --data fmnist --out assets \
        [--test_data fmnist:test] [--examples_per_class 3] [--gallery 16] [--fraction 0.1] [--seed 0]
        [--reference_images 5000] [--only distances]

Writes, for the bundle folder named NAME:

- ``<out>/examples/NAME/<class>-<i>.png``: ``examples_per_class`` held-out images of each class
  (``--test_data``; Fashion-MNIST's test split by default), at the bundle's image size, grey PNGs
  for a grey bundle. The app lists them by file name. At most ``digit_core.demo.MAX_EXAMPLES``:
  with more classes than fit, a seeded choice of classes.
- ``<out>/clusters/NAME/<k>.png``: the ``gallery`` training patches nearest cluster k's centroid
  (smallest squared distance among the patches assigned to k), each in its 3x3-patch
  neighbourhood with the patch outlined; no file for a cluster that no sampled patch falls in.
- ``<out>/clusters/NAME/sizes.json``: ``{"sizes": [K ints], "images": N, "fraction": f,
  "split": "train", ...}``, patches per cluster over the sampled training images.
- ``<out>/clusters/NAME/distances.json``: how far training images lie from the codebook, for the
  app's out-of-distribution notice: percentiles (50, 90, 95, 99, 99.9) and the maximum of an
  image's mean squared distance from its patches to their nearest centroids (the tokenizer's
  distances), over ``--reference_images`` training images outside the cluster sample (with the
  ``--data`` of the features stage, as ``training/fmnist.sh`` passes, that is the sample K-Means
  was fitted on, whose distances would be too small), with the sha256 of the tokenizer they were
  measured with (the app ignores them for any other tokenizer).
  ``--only distances`` computes just this file, into an existing clusters folder.

The training sample is the one ``training.features`` fits K-Means on (same seed and fraction).
The bundle runs on onnxruntime, as in the app; torch only reads the data, without augmentation.
Each output folder is written to a temp folder beside it and renamed into place, so an
interrupted run leaves the previous folder (or none), never a half-written one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from digit_core import demo
from digit_core.ood import DISTANCES_FILE, image_distances, tokenizer_sha256
from digit_core.runtime import Bundle, load_bundle
from training.config import RunConfig
from training.data import as_uint8, load_data, test_split
from training.files import atomic_write_text

BACKGROUND = (72, 88, 112)   # gaps between tiles and outside the image: a slate blue no grey pixel has
OUTLINE = (255, 96, 0)       # around the patch itself
TARGET_WIDTH = 320           # px: about the width the app's cluster-gallery image gets (a third of the page)


@dataclass
class Patch:
    """One gallery patch: dataset index, cell (row, col) and squared distance to its centroid."""

    index: int
    row: int
    col: int
    dist: float


@dataclass
class Report:
    """What a run wrote (``main`` returns it)."""

    examples: list[Path]
    galleries: dict[int, list[Patch]]   # cluster -> its patches, nearest first
    sizes: np.ndarray                   # [K] patches per cluster
    images: int                         # training images sampled
    bytes: int                          # size of everything written
    message: str


def slug(name: str) -> str:
    """``"T-shirt/top"`` -> ``"t-shirt-top"``: a file name that reads as the class name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


def sample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The training images to scan: as ``training.features`` picks its fit sample, sorted."""
    return np.sort(np.random.default_rng(seed).permutation(n)[: max(1, math.ceil(fraction * n))])


def open_data(spec: str, bundle: Bundle) -> Dataset:
    """The dataset ``spec`` at the bundle's image size and channels, unaugmented."""
    c = bundle.config
    try:
        return load_data(RunConfig(model=str(bundle.path / "config.json")), spec, train=False)[0]
    except ValueError as err:
        raise ValueError(f"data {spec!r} cannot be used with bundle {bundle.path} ({c.image_size}x{c.image_size} "
                         f"images, {c.channels} channel(s)): {err}") from None


@contextlib.contextmanager
def staged(dest: Path) -> Iterator[Path]:
    """A temp folder beside ``dest`` that replaces ``dest`` when the block ends without error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)   # left by a killed run
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)   # mkdtemp makes it private; the app may run as another user
    try:
        yield tmp
        if dest.exists():   # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- examples -------------------------------------------------------------------------------------------
def pick_examples(targets: np.ndarray, num_classes: int, per_class: int, seed: int) -> list[tuple[int, int]]:
    """``(class, dataset index)`` pairs: ``per_class`` of each class, or of a seeded choice of
    classes when all of them would pass ``demo.MAX_EXAMPLES``."""
    rng = np.random.default_rng(seed)
    classes = np.arange(num_classes)
    if num_classes * per_class > demo.MAX_EXAMPLES:
        classes = np.sort(rng.choice(num_classes, demo.MAX_EXAMPLES // per_class, replace=False))
    picks = []
    for c in classes:
        idx = np.flatnonzero(targets == c)
        picks += [(int(c), int(i)) for i in np.sort(rng.choice(idx, min(per_class, len(idx)), replace=False))]
    return picks


def write_examples(data: Dataset, names: list[str], picks: list[tuple[int, int]], grey: bool, out: Path) -> list[str]:
    """Each pick as ``<class>-<i>.png`` in ``out``: 'L' PNGs when ``grey`` (``load_image`` makes
    them RGB again); returns the file names."""
    width = len(str(max(Counter(c for c, _ in picks).values())))   # zero-padded, so the app's sort keeps 2 before 10
    files, count = [], Counter()
    for c, i in picks:
        count[c] += 1
        img = as_uint8(data[i][0][None])[0]
        files.append(f"{slug(names[c])}-{count[c]:0{width}d}.png")
        Image.fromarray(img[..., 0] if grey else img).save(out / files[-1], optimize=True)
    return files


# -- clusters -------------------------------------------------------------------------------------------
def keep_nearest(cl: np.ndarray, d: np.ndarray, ref: np.ndarray, count: int) -> tuple[np.ndarray, ...]:
    """Of patches (cluster ``cl``, squared distance ``d``, patch number ``ref``), the ``count``
    nearest of each cluster, sorted by cluster then distance (ties: the earlier patch)."""
    order = np.lexsort((ref, d, cl))
    cl, d, ref = cl[order], d[order], ref[order]
    first = np.searchsorted(cl, cl)               # where each patch's cluster starts in the sorted list
    keep = np.arange(len(cl)) - first < count
    return cl[keep], d[keep], ref[keep]


def scan(bundle: Bundle, data: Dataset, idx: np.ndarray, count: int, batch_size: int,
         workers: int) -> tuple[np.ndarray, dict[int, list[Patch]]]:
    """Tokenize images ``idx`` of ``data``: patches per cluster, and each cluster's ``count``
    nearest patches. Only the running nearest are kept, so memory does not grow with the sample."""
    K, n = bundle.config.codebook.size, bundle.config.disc_grid
    sizes = np.zeros(K, np.int64)
    cl, d, ref = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    loader = DataLoader(Subset(data, idx.tolist()), batch_size, num_workers=workers)
    start = 0   # patch number of the batch's first patch: (position in idx) * n * n + row * n + col
    for x, _ in tqdm(loader, desc="tokenize", dynamic_ncols=True):
        ids, dists, _ = bundle.tokenize(as_uint8(x))
        sizes += np.bincount(ids.ravel(), minlength=K)
        cl, d, ref = keep_nearest(np.concatenate([cl, ids.ravel()]), np.concatenate([d, dists.ravel()]),
                                  np.concatenate([ref, start + np.arange(ids.size)]), count)
        start += ids.size
    galleries: dict[int, list[Patch]] = {}
    for k, dist, r in zip(cl.tolist(), d.tolist(), ref.tolist()):
        pos, cell = divmod(r, n * n)
        galleries.setdefault(k, []).append(Patch(int(idx[pos]), cell // n, cell % n, dist))
    return sizes, galleries


def render_gallery(images: np.ndarray, cells: list[tuple[int, int]], n: int, columns: int) -> Image.Image:
    """Tiles of ``images[i]`` (uint8 ``[S, S, 3]``) around cell ``cells[i]`` = (row, col) of its
    n x n grid: the cell's 3x3-cell neighbourhood (outside the image: BACKGROUND), the cell
    outlined, ``columns`` tiles a row, upscaled (nearest) to about TARGET_WIDTH; a palette image."""
    S = images.shape[1]
    c = -(-S // n)                                 # cell side in pixels
    if c * n != S:   # a grid that does not divide the image: stretch it so every cell has c pixels
        images = np.stack([np.asarray(Image.fromarray(im).resize((c * n, c * n), Image.Resampling.NEAREST))
                           for im in images])
    s = max(1, TARGET_WIDTH // (columns * 3 * c))   # upscale factor
    t, w, gap = 3 * c * s, max(1, s // 3), max(2, s // 2)
    ring = np.zeros((t, t), bool)                  # the outline, just outside the cell: none of its pixels covered
    ring[c * s - w: 2 * c * s + w, c * s - w: 2 * c * s + w] = True
    ring[c * s: 2 * c * s, c * s: 2 * c * s] = False
    rows = -(-len(cells) // columns)
    canvas = np.empty((gap + rows * (t + gap), gap + columns * (t + gap), 3), np.uint8)
    canvas[:] = BACKGROUND
    padded = np.empty((c * (n + 2), c * (n + 2), 3), np.uint8)
    for i, (img, (r, col)) in enumerate(zip(images, cells)):
        padded[:] = BACKGROUND
        padded[c:-c, c:-c] = img
        tile = padded[r * c:(r + 3) * c, col * c:(col + 3) * c].repeat(s, 0).repeat(s, 1)
        tile[ring] = OUTLINE
        y, x = gap + (i // columns) * (t + gap), gap + (i % columns) * (t + gap)
        canvas[y:y + t, x:x + t] = tile
    # Median cut keeps every colour exactly while there are at most 256 (grey data: 256 greys + 2,
    # so two neighbouring greys may merge); photos lose a little colour, fine for a gallery.
    return Image.fromarray(canvas).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def write_galleries(data: Dataset, galleries: dict[int, list[Patch]], n: int, columns: int, out: Path) -> None:
    """``<k>.png`` in ``out`` for each cluster in ``galleries``; each image is read once."""
    wanted = sorted({p.index for ps in galleries.values() for p in ps})
    images = dict(zip(wanted, (as_uint8(data[i][0][None])[0] for i in wanted)))
    for k, ps in galleries.items():
        pic = render_gallery(np.stack([images[p.index] for p in ps]), [(p.row, p.col) for p in ps], n, columns)
        pic.save(out / f"{k}.png", optimize=True)


# -- how far training images lie from the codebook ----------------------------------------------------------
REFERENCE_PERCENTILES = (50, 90, 95, 99, 99.9)
REFERENCE_IMAGES_MIN = 100


def reference_indices(n: int, cluster_sample: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, bool]:
    """Up to ``count`` of the ``n`` training images outside ``cluster_sample`` (seeded, sorted), and
    True; when the cluster sample is all of them, the cluster sample itself, and False."""
    rest = np.setdiff1d(np.arange(n), cluster_sample)
    if len(rest) == 0:
        return np.sort(cluster_sample[:count]), False
    pick = np.random.default_rng([seed, 1]).permutation(len(rest))[:count]
    return np.sort(rest[pick]), True


def distance_reference(bundle: Bundle, data: Dataset, idx: np.ndarray, batch_size: int, workers: int) -> dict:
    """Percentiles of ``image_distances`` over images ``idx`` of ``data`` (``distances.json``)."""
    per_image = []
    loader = DataLoader(Subset(data, idx.tolist()), batch_size, num_workers=workers)
    for x, _ in tqdm(loader, desc="distances", dynamic_ncols=True):
        per_image.append(image_distances(bundle.tokenize(as_uint8(x))[1]))
    d = np.concatenate(per_image)
    c = bundle.config
    return {"statistic": "an image's mean squared distance from its patches' features to their nearest centroids",
            "percentiles": {f"{q:g}": float(v) for q, v in zip(REFERENCE_PERCENTILES, np.percentile(d, REFERENCE_PERCENTILES))},
            "max": float(d.max()), "mean": float(d.mean()), "images": int(len(d)),
            "tokenizer_sha256": tokenizer_sha256(bundle), "codebook_size": c.codebook.size, "grid": c.disc_grid}


def write_distances(bundle: Bundle, data: Dataset, spec: str, cluster_sample: np.ndarray, a: argparse.Namespace,
                    folder: Path) -> dict:
    """``distances.json`` in ``folder`` over training images outside the cluster sample."""
    idx, disjoint = reference_indices(len(data), cluster_sample, a.reference_images, a.seed)
    ref = distance_reference(bundle, data, idx, a.batch_size, a.workers)
    ref |= {"data": spec, "split": "test" if spec.partition("@")[0].endswith(":test") else "train", "seed": a.seed,
            "outside_cluster_sample": disjoint}
    atomic_write_text(folder / DISTANCES_FILE, json.dumps(ref, indent=1))
    return ref


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="exported bundle folder, e.g. exported/fmnist")
    p.add_argument("--data", required=True, help="training data: 'fmnist' or an image folder (<class>/<image>)")
    p.add_argument("--test_data", default=None,
                   help="held-out data for the examples (default: fmnist's test split; an image folder: --data)")
    p.add_argument("--out", default=str(demo.ASSETS), help="assets folder (default: %(default)s, where the app looks)")
    p.add_argument("--examples_per_class", type=int, default=3)
    p.add_argument("--gallery", type=int, default=16, help="patches per cluster gallery")
    p.add_argument("--fraction", type=float, default=0.1, help="of the training images, tokenized for the clusters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference_images", type=int, default=5000,
                   help="training images outside the cluster sample whose distances to the codebook make the "
                        "reference of the app's out-of-distribution notice")
    p.add_argument("--only", choices=["distances"], default=None,
                   help="compute only distances.json, into the existing clusters folder (the rest stays as it is)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data-loader processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    a = p.parse_args(argv)
    if not 1 <= a.examples_per_class <= demo.MAX_EXAMPLES:
        p.error(f"--examples_per_class must be 1..{demo.MAX_EXAMPLES} (the app shows at most {demo.MAX_EXAMPLES})")
    if a.gallery < 1 or not 0 < a.fraction <= 1:
        p.error("--gallery must be at least 1 and --fraction in (0, 1]")
    if a.reference_images < REFERENCE_IMAGES_MIN:
        p.error(f"--reference_images must be at least {REFERENCE_IMAGES_MIN} (a 99th percentile needs them)")
    return a


def main(argv: list[str] | None = None) -> Report:
    a = parse_args(argv)
    if not (Path(a.bundle) / "manifest.json").is_file():
        raise demo.ModelMissing(demo.missing_message(a.bundle))
    bundle = load_bundle(a.bundle, device=a.device, threads=a.threads)
    c, name, out = bundle.config, Path(a.bundle).resolve().name, Path(a.out)
    cl_dir = out / "clusters" / name
    if a.only == "distances":
        if not cl_dir.is_dir():
            raise ValueError(f"no clusters folder {cl_dir} to add {DISTANCES_FILE} to: run without --only first")
        train = open_data(a.data, bundle)
        ref = write_distances(bundle, train, a.data, sample_indices(len(train), a.fraction, a.seed), a, cl_dir)
        message = distances_message(ref, cl_dir)
        print(message)
        return Report([], {}, np.zeros(0, np.int64), 0, (cl_dir / DISTANCES_FILE).stat().st_size, message)
    test_spec = a.test_data or test_split(a.data) or a.data   # an image folder has no test split: its own images
    train, test = open_data(a.data, bundle), open_data(test_spec, bundle)

    # Example names are the bundle's class names when the data's classes line up with them.
    names = c.class_names if len(c.class_names) == len(test.classes) else test.classes
    picks = pick_examples(np.asarray(test.targets), len(test.classes), a.examples_per_class, a.seed)
    ex_dir = out / "examples" / name
    with staged(ex_dir) as tmp:
        examples = [ex_dir / f for f in write_examples(test, names, picks, c.channels == 1, tmp)]

    idx = sample_indices(len(train), a.fraction, a.seed)
    sizes, galleries = scan(bundle, train, idx, a.gallery, a.batch_size, a.workers)
    split = "test" if a.data.partition("@")[0].endswith(":test") else "train"
    with staged(cl_dir) as tmp:
        write_galleries(train, galleries, c.disc_grid, math.ceil(math.sqrt(a.gallery)), tmp)
        (tmp / "sizes.json").write_text(json.dumps({
            "sizes": sizes.tolist(), "images": len(idx), "fraction": a.fraction, "split": split,
            "data": a.data, "seed": a.seed}))
        ref = write_distances(bundle, train, a.data, idx, a, tmp)

    total = folder_bytes(ex_dir) + folder_bytes(cl_dir)
    note = "" if test_spec != a.data else " (from the training data: pass --test_data for held-out images)"
    message = (f"examples: {len(examples)} images of {test_spec}{note} -> {ex_dir}\n"
               f"clusters: {len(idx):,} {split} images of {a.data} (fraction {a.fraction:g}, seed {a.seed}), "
               f"{int(sizes.sum()):,} patches; {len(galleries)} of {c.codebook.size} clusters have patches "
               f"-> {cl_dir} ({len(galleries)} galleries + sizes.json)\n"
               f"{distances_message(ref, cl_dir)}\n"
               f"total {total / 2**20:.2f} MB")
    print(message)
    return Report(examples, galleries, sizes, len(idx), total, message)


def distances_message(ref: dict, folder: Path) -> str:
    p = ref["percentiles"]
    where = "outside the cluster sample" if ref["outside_cluster_sample"] else "the cluster sample (no others left)"
    return (f"distances: {ref['images']:,} {ref['split']} images of {ref['data']} ({where}); mean squared distance "
            f"to the nearest centroids: median {p['50']:.4g}, 99th percentile {p['99']:.4g}, max {ref['max']:.4g} "
            f"-> {folder / DISTANCES_FILE}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:   # bad bundle or data: the message, not a traceback
        raise SystemExit(f"error: {err}") from None
