"""Peak memory of worst-case uploads: small files that decode to many bytes, four at once.

    python -m bench.bench_uploads [--size 32]

Writes each case to a temp folder, then, in a fresh process per case, decodes four copies at
once with ``digit_core.images.load_image`` (as four concurrent app requests would) and prints
one markdown table: file size, decoded size, the added peak resident memory of the process
(ru_maxrss after minus before) and its ratio to one file's decoded size, and the wall time.
Cases over ``MAX_DECODED_BYTES`` are refused before decoding; the table shows what that costs.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from digit_core.images import MAX_DECODED_BYTES, MAX_PIXELS, decoded_bytes

CHILD = r"""
import json, resource, sys, threading, time
from digit_core.images import ImageError, load_image
path, size = sys.argv[1], int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
def one():
    try:
        load_image(path, size)
    except ImageError as err:
        errors.append(str(err))
t0 = time.perf_counter()
threads = [threading.Thread(target=one) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base,
                  "seconds": time.perf_counter() - t0, "refused": errors[0] if errors else None}))
"""


def cases(folder: Path) -> list[tuple[str, Path]]:
    side16 = 6300
    # the largest float32 square allowed: 4 bytes a pixel, so the pixel limit binds before the byte limit
    float_side = math.isqrt(min(MAX_PIXELS, MAX_DECODED_BYTES // 4)) - 16
    out = []
    p = folder / "deep16.png"                                       # 16-bit grey, nearly constant: tiny file
    Image.fromarray(np.full((side16, side16), 40000, np.uint16)).save(p)
    out.append((f"16-bit PNG {side16}x{side16}", p))
    p = folder / "float32.tiff"
    Image.new("F", (float_side, float_side), 0.5).save(p, compression="tiff_deflate")
    out.append((f"float32 TIFF {float_side}x{float_side} (at the limit)", p))
    p = folder / "float32-over.tiff"
    Image.new("F", (float_side + 64, float_side + 64), 0.5).save(p, compression="tiff_deflate")
    out.append((f"float32 TIFF {float_side + 64}x{float_side + 64} (over the pixel limit)", p))
    p = folder / "rgb40mp.png"
    Image.new("RGB", (6320, 6320), (200, 30, 30)).save(p)
    out.append(("8-bit RGB PNG 6320x6320 (40 MP)", p))
    p = folder / "nan.tiff"
    Image.fromarray(np.full((4000, 4000), np.nan, np.float32)).save(p, compression="tiff_deflate")
    out.append(("float32 TIFF 4000x4000, all NaN", p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32, help="the model's image size (default %(default)s)")
    a = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    print(f"4 concurrent decodes per case; MAX_PIXELS = {MAX_PIXELS / 1e6:g} M, "
          f"MAX_DECODED_BYTES = {MAX_DECODED_BYTES / 2**20:.0f} MiB\n")
    print("| case | file KiB | decoded MiB | +peak RSS MiB | peak / decoded | seconds | result |")
    print("|---|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in cases(Path(tmp)):
            with Image.open(path) as im:
                dec = decoded_bytes(im)
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(a.size)], cwd=root, capture_output=True,
                               text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            peak = m["peak_kib"] / 1024
            result = "refused: " + m["refused"].split(":", 1)[-1].strip()[:60] if m["refused"] else "decoded"
            print(f"| {name} | {path.stat().st_size / 1024:,.0f} | {dec / 2**20:,.0f} | {peak:,.0f} | "
                  f"{peak / (dec / 2**20):.2f} | {m['seconds']:.2f} | {result} |")


if __name__ == "__main__":
    main()
