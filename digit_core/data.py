"""Datasets and transforms: a folder of class subfolders, or the Fashion-MNIST idx files.

Every dataset yields ``(image, label)`` with ``image`` float ``[channels, S, S]`` in [0, 1],
quantised to 1/255 steps like the uint8 images the pipeline takes, so training sees exactly
what ``DiGIT.tokenize`` will see. Grey is the mean of R, G and B (as ``images_to_input``).

Augmentation follows the paper (A.3): a random crop whose side is the short edge, resized to
``S``, and a horizontal flip. Its randomness comes from a per-sample seed that the sampler hands
in with the index (``dataset[(index, seed)]``), not from the global RNG, so an epoch's images
are the same with any number of loader workers and after a resume.
"""
from __future__ import annotations

import gzip
import multiprocessing as mp
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")

Key = int | tuple[int, int]
"""A dataset key: an index, or ``(index, seed)`` to augment with that seed."""


def _split_key(key: Key) -> tuple[int, int | None]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


def _to_tensor(img: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` -> float ``[channels, H, W]`` in [0, 1]."""
    x = torch.from_numpy(np.array(img, dtype=np.float32)).div_(255.0)   # a copy: PIL/flipped arrays are read-only views
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] == channels:
        return x
    return x.mean(0, keepdim=True) if channels == 1 else x.expand(channels, -1, -1).contiguous()


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (the ImageNet train/val layout); classes sorted by folder name.

    An unreadable or corrupt file does not stop a run: it is skipped for the next index, and
    ``skipped`` counts such reads across loader workers (a shared counter).
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, train: bool = True,
                 flip: bool = True) -> None:
        self.root, self.image_size, self.channels, self.train, self.flip = Path(root), image_size, channels, train, flip
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"image folder {self.root} has no class subfolders (expected {self.root}/<class>/<image>)")
        self.samples: list[tuple[str, int]] = [
            (str(p), c) for c, name in enumerate(self.classes) for p in sorted((self.root / name).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not self.samples:
            raise ValueError(f"image folder {self.root} has class folders {self.classes[:5]} but no images "
                             f"with extensions {IMAGE_EXTENSIONS}")
        self.targets = [c for _, c in self.samples]
        self._skipped = mp.Value("i", 0)

    @property
    def skipped(self) -> int:
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Image.Image:
        with Image.open(path) as im:
            im.verify()                      # catches truncated/garbled files cheaply ...
        with Image.open(path) as im:
            return im.convert("RGB")         # ... and decoding catches the rest

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        index, seed = _split_key(key)
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                im = self._load(path)
                break
            except Exception as err:        # PIL raises many types for bad files
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping unreadable image {path}: {err}")
        else:
            raise RuntimeError(f"no readable image in {self.root}")
        rng = random.Random(seed) if seed is not None else None
        return _to_tensor(self._transform(im, rng), self.channels), label

    def _transform(self, im: Image.Image, rng: random.Random | None) -> np.ndarray:
        """Square crop of the short edge (random when training, centred otherwise), resized, maybe flipped."""
        w, h = im.size
        s = min(w, h)
        train = self.train and rng is not None
        x0 = rng.randint(0, w - s) if train else (w - s) // 2
        y0 = rng.randint(0, h - s) if train else (h - s) // 2
        im = im.crop((x0, y0, x0 + s, y0 + s))
        if s != self.image_size:
            im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
        if train and self.flip and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(im)


def _read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST-format) file, gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FMNIST_VAL = 5000
"""The validation split: the last 5,000 images of the published train split (``fit`` is the rest)."""
FMNIST_SPLITS = ("train", "fit", "val", "test")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its idx ``.gz`` files, padded 28 -> ``image_size`` with black (its background).

    Splits: ``train`` (the published 60,000), ``fit`` (its first 55,000) + ``val`` (its last
    ``FMNIST_VAL``), ``test`` (the published 10,000). Choices are made on ``val``; ``test`` is
    for the final evaluation.

    Training augmentation is a horizontal flip only: clothes are left-right symmetric enough,
    while a random crop would shift the centred objects the generator should learn to draw.
    """

    def __init__(self, root: str | Path = FMNIST_DIR, split: str = "train", image_size: int = 32,
                 channels: int = 1, train: bool | None = None, flip: bool = True) -> None:
        if split not in FMNIST_SPLITS:
            raise ValueError(f"split must be one of {', '.join(FMNIST_SPLITS)}, got {split!r}")
        root, prefix = Path(root), "t10k" if split == "test" else "train"
        files = [root / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST files missing: {missing} (apt-get install dataset-fashion-mnist)")
        self.images, self.targets = _read_idx(files[0]), _read_idx(files[1]).astype(np.int64)
        if split in ("fit", "val"):
            part = slice(None, -FMNIST_VAL) if split == "fit" else slice(-FMNIST_VAL, None)
            self.images, self.targets = self.images[part], self.targets[part]
        if image_size < 28:
            raise ValueError(f"image_size must be at least 28 for Fashion-MNIST, got {image_size}")
        self.pad = ((image_size - 28) // 2, image_size - 28 - (image_size - 28) // 2)
        self.channels, self.train, self.flip = channels, split in ("train", "fit") if train is None else train, flip
        self.classes = list(FMNIST_CLASSES)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        index, seed = _split_key(key)
        img = np.pad(self.images[index], (self.pad, self.pad))
        if self.train and self.flip and seed is not None and random.Random(seed).random() < 0.5:
            img = img[:, ::-1]
        return _to_tensor(img, self.channels), int(self.targets[index])


def build_dataset(spec: str, image_size: int, channels: int, train: bool = True, flip: bool = True) -> Dataset:
    """``"fmnist"`` (= ``fmnist:train``) / ``"fmnist:fit"`` / ``"fmnist:val"`` / ``"fmnist:test"`` /
    ``"fmnist:train@/dir"``, or the path of an image folder."""
    if spec.startswith("fmnist"):
        name, _, root = spec.partition("@")
        split = name.partition(":")[2] or "train"
        return FashionMNIST(root or FMNIST_DIR, split, image_size, channels, train=train, flip=flip)
    return ImageFolder(spec, image_size, channels, train=train, flip=flip)
