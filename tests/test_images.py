"""digit_core.images: every kind of upload -> uint8 [S, S, 3], or a clear ImageError."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from digit_core.images import MAX_FILE_BYTES, ImageError, load_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _check(a: np.ndarray, size: int = 16) -> np.ndarray:
    assert a.dtype == np.uint8 and a.shape == (size, size, 3)
    return a


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_format(fmt: str) -> None:
    img = Image.new("RGB", (40, 40), (200, 100, 50))
    a = _check(load_image(_bytes(img, fmt), 16))
    assert np.abs(a.astype(int) - (200, 100, 50)).max() <= 12    # lossy formats and GIF palettes round a little


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (255, 0, 0, 255)        # opaque red on top, fully transparent below
    a = _check(load_image(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), 16))
    assert (a[:8] == (255, 0, 0)).all() and (a[8:] == 255).all()
    half = np.zeros((16, 16, 4), np.uint8)
    half[..., 3] = 128                 # half-transparent black -> mid grey
    assert abs(int(load_image(Image.fromarray(half, "RGBA"), 16)[0, 0, 0]) - 127) <= 1


def test_palette_with_transparency_and_greyscale_and_1bit() -> None:
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    assert (load_image(_bytes(p, "PNG"), 16) == 255).all()          # the transparent index becomes white
    grey = _check(load_image(_bytes(Image.new("L", (16, 16), 77), "PNG"), 16))
    assert (grey == 77).all()
    one = _check(load_image(_bytes(Image.new("1", (16, 16), 1), "PNG"), 16))
    assert (one == 255).all()


def test_16bit_greyscale_is_scaled_not_clipped() -> None:
    a16 = np.full((16, 16), 32768, np.uint16)                        # half of 65535
    a = load_image(_bytes(Image.fromarray(a16), "PNG"), 16)
    assert abs(int(a[0, 0, 0]) - 128) <= 1 and (a[..., 0] == a[..., 1]).all()


def test_cmyk_jpeg() -> None:
    rgb = Image.new("RGB", (16, 16), (30, 160, 220))
    a = _check(load_image(_bytes(rgb.convert("CMYK"), "JPEG", quality=95), 16))
    assert np.abs(a.astype(int) - (30, 160, 220)).max() <= 12


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 16))        # white left half, black right half
    exif = img.getexif()
    exif[0x0112] = 6                                  # "rotate 90 CW to display": left half goes to the top
    a = load_image(_bytes(img, "JPEG", exif=exif, quality=95), 16)
    plain = load_image(_bytes(img, "JPEG", quality=95), 16)
    assert a[0].mean() > 200 and a[-1].mean() < 50   # white on top, black at the bottom
    assert plain[:, 0].mean() > 200 and plain[:, -1].mean() < 50   # without EXIF: white left, black right


def test_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    raw = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    a = load_image(raw, 16)
    assert a[..., 0].mean() > 200 and a[..., 1].mean() < 50


@pytest.mark.parametrize("w,h", [(1, 1), (3, 40), (4000, 3000), (16, 16)])
def test_any_size_is_centre_cropped_and_resized(w: int, h: int) -> None:
    img = Image.new("RGB", (w, h), (10, 20, 30))
    if w > 100:
        img.paste((250, 250, 250), (w // 2 - 10, h // 2 - 10, w // 2 + 10, h // 2 + 10))
    a = _check(load_image(img, 16))
    assert (a[0, 0] == (10, 20, 30)).all()


def test_centre_crop_keeps_the_middle() -> None:
    a = np.zeros((16, 48, 3), np.uint8)
    a[:, 16:32] = 255                                   # white middle third of a wide image
    assert (load_image(a, 16) == 255).all()


@pytest.mark.parametrize("raw,message", [
    (b"not an image at all", "not an image"),
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "truncated or corrupt|not an image"),
])
def test_bad_bytes(raw: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(raw, 16)


def test_truncated_files() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        raw = _bytes(img, fmt)
        with pytest.raises(ImageError, match="truncated or corrupt"):
            load_image(raw[: len(raw) // 2], 16)


def test_decompression_bombs_are_refused(tmp_path) -> None:
    for side in (7000, 12000):                         # over MAX_PIXELS (warning) and over 2x (error)
        p = tmp_path / f"bomb{side}.png"
        Image.new("1", (side, side)).save(p)
        with pytest.raises(ImageError, match="too large to decode safely"):
            load_image(p, 16)


def test_files_over_the_limit_and_missing_files(tmp_path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ImageError, match="limit"):
        load_image(big, 16)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png", 16)
    with pytest.raises(ImageError, match="uint8 or float"):
        load_image(np.zeros((4, 4), np.int32), 16)


def test_svg_and_other_formats_are_named(tmp_path) -> None:
    ico = _bytes(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(ImageError, match="ICO image; upload one of"):
        load_image(ico, 16)
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", 16)


def test_helper_modules_import_no_torch() -> None:
    code = ("import sys, digit_core.images, digit_core.metrics, digit_core.viz, digit_core.demo; "
            "sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
