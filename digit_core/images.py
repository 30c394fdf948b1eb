"""Uploaded images -> the uint8 ``[S, S, 3]`` arrays the flows take. Pillow + numpy, no torch.

    img = load_image("photo.jpg", size=32)      # any PNG/JPEG/WebP/GIF/BMP/TIFF upload

Every readable image is normalised the same way: EXIF orientation applied, the first frame of
an animation, every mode (palette, greyscale, 16-bit, CMYK, transparency over white) to 8-bit
RGB, then the centre square cropped and resized to ``size``. Anything else -- not an image, a
truncated file, a decompression bomb, a file that is too large -- raises ``ImageError`` (a
``ValueError``) with a message a user can act on.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 20 * 1024 * 1024      # the app's upload limit too
MAX_PIXELS = 40_000_000                # larger images are refused, not decoded (decompression bombs)
MAX_DECODED_BYTES = 160 * 2**20        # and so are images whose decoded pixels would take more memory
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

Image.MAX_IMAGE_PIXELS = MAX_PIXELS    # Pillow then refuses bombs at open() time, before decoding
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An upload that is not a usable image; the message says why."""


def load_image(src: str | Path | bytes | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Decode ``src`` (a path, raw bytes, a PIL image or an array) to uint8 ``[size, size, 3]``."""
    if isinstance(src, np.ndarray):
        im = array_to_pil(src)
    elif isinstance(src, Image.Image):
        im = src
    else:
        im = decode(src)
    return fit(to_rgb(shrink_deep(im, size)), size)


def decode(src: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image file (first frame, EXIF orientation applied)."""
    name = "the upload"
    if isinstance(src, (str, Path)):
        path = Path(src)
        name = path.name
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        nbytes = path.stat().st_size
        opener = lambda: Image.open(path)  # noqa: E731
    elif isinstance(src, (bytes, bytearray)):
        nbytes = len(src)
        opener = lambda: Image.open(io.BytesIO(src))  # noqa: E731
    else:
        raise ImageError(f"expected an image file, got {type(src).__name__}")
    if nbytes == 0:
        raise ImageError(f"{name} is empty (0 bytes)")
    if nbytes > MAX_FILE_BYTES:
        raise ImageError(f"{name} is {nbytes / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = opener()
            if im.format not in FORMATS:
                raise ImageError(f"{name} is a {im.format} image; upload one of {', '.join(FORMATS)}")
            if getattr(im, "is_animated", False):
                im.seek(0)
            need = decoded_bytes(im)
            if need > MAX_DECODED_BYTES:   # counted before decoding: a 77 KB 16-bit PNG can hold 80 MB of pixels
                raise ImageError(f"{name} is too large to decode safely: {im.width}x{im.height} {im.mode} pixels "
                                 f"take {need / 2**20:.1f} MB (the limit is {MAX_DECODED_BYTES / 2**20:.0f} MB)")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a corrupt EXIF block: keep the pixels as stored
                pass
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} is too large to decode safely (over {MAX_PIXELS / 1e6:.0f} megapixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image (or not a format Pillow reads: {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:   # truncated / corrupt streams
        raise ImageError(f"{name} is truncated or corrupt ({err})") from None
    if im.width < 1 or im.height < 1:
        raise ImageError(f"{name} has no pixels ({im.width}x{im.height})")
    return im


def decoded_bytes(im: Image.Image) -> int:
    """Bytes Pillow holds for ``im``'s pixels once decoded (it stores RGB and 2-band modes in 4 bytes)."""
    per_pixel = 1 if im.mode in ("1", "L", "P") else 2 if im.mode.startswith("I;16") else 4
    return im.width * im.height * per_pixel


def shrink_deep(im: Image.Image, size: int) -> Image.Image:
    """32-bit integer and float images ("I", "F"): the centre square resized to ``size`` in their
    own mode, so converting them to 8 bits works on ``size`` x ``size`` values, not on a float64
    copy of every pixel. Other modes are returned as they are (``fit`` resizes them)."""
    if im.mode not in ("I", "F"):
        return im
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return im.resize((size, size), Image.Resampling.LANCZOS if s > size else Image.Resampling.BICUBIC, box=box,
                     reducing_gap=3.0 if s > 4 * size else None)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited over white. Float images with
    NaN or infinite values are refused."""
    if im.mode.startswith("I;16"):     # 16-bit greyscale: to 8 bits in integers (no float copy)
        a = np.asarray(im)
        if a.max(initial=0) > 255:     # round(a * 255 / 65535) == round(a / 257)
            q, r = np.divmod(a, 257)
            a = q + (r >= 129)
        im = Image.fromarray(a.astype(np.uint8), "L")
    elif im.mode in ("I", "F"):        # 32-bit integer / float greyscale (shrink_deep makes them small first)
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageError("the image has NaN or infinite pixel values (a float image with missing data); "
                             "upload one with finite values")
        top = a.max(initial=0)
        hi = 1.0 if im.mode == "F" and top <= 1.0 else (255.0 if top <= 255 else 65535.0)
        im = Image.fromarray(np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")   # L, 1, P, CMYK, YCbCr, ...


def fit(im: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to ``size`` x ``size``; uint8 ``[size, size, 3]``."""
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        im = im.resize((size, size), Image.Resampling.LANCZOS if s > size else Image.Resampling.BICUBIC,
                       reducing_gap=3.0 if s > 4 * size else None)
    return np.asarray(im, dtype=np.uint8).copy()


def array_to_pil(a: np.ndarray) -> Image.Image:
    """uint8 ``[H, W]``, ``[H, W, 1|3|4]`` (or floats in [0, 1]) -> a PIL image."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ImageError(f"image arrays must be uint8 or float in [0, 1], got {a.dtype}")
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ImageError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got {a.shape}")
    return Image.fromarray(a)
