"""The Gradio demo end to end: app.py in a subprocess on a tiny exported bundle, driven through
gradio_client (every endpoint, a bad-upload battery, 40 concurrent clients, a flooding client,
Host/Origin checks, the expiring cache) and a headless Chromium (every tab, one action each, a
screenshot each; the live grid from the first run in a fresh profile). The handlers themselves
are tested without a server in test_studio.py.

The browser part is marked ``browser``; ``pytest -m 'not browser'`` skips it.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_core.presets import tiny
from digit_core.export import export_bundle
from digit_core.images import load_image
from digit_core.pipeline import DiGIT
from digit_core.runtime import load_bundle

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from chromium_cdp import Browser, find_chromium  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]
ENDPOINTS = {"/sample", "/tokenize", "/complete", "/stability"}
TTL = 10   # seconds the strict app keeps files


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiGIT bundle, and beside it (the app's --bundles folder) its VQ-AR twin on the same VQGAN."""
    from digit_core.presets import tiny_vq
    torch.manual_seed(0)
    m = DiGIT(tiny(3))
    with torch.no_grad():   # spread the centroids so tokenize uses many clusters
        m.codebook.set_centroids(torch.randn(16, 32) * 0.3)
    root = tmp_path_factory.mktemp("exported")
    vq = DiGIT(tiny_vq(3))
    vq.vqgan.load_state_dict(m.vqgan.state_dict())
    out = export_bundle(m, root / "tiny")
    export_bundle(vq, root / "tiny-vq", share_with=out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, cache: Path, *flags: str, cwd: Path = ROOT):
    """app.py on a free port, run from ``cwd``; returns (process, url, output lines)."""
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), PYTHONUNBUFFERED="1")
    env.pop("GRADIO_ANALYTICS_ENABLED", None)        # the app turns analytics off itself
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(bundle), "--port", str(port),
                             "--threads", "1", "--bundles", str(bundle.parent), *flags],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "ready on" in line:
                ready.set()
    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(600):
        _stop(proc)
        pytest.fail("app.py did not start in 600 s:\n" + "".join(lines))
    return proc, f"http://127.0.0.1:{port}/", lines


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """app.py on a free port, started from another directory; yields (url, its output lines)."""
    proc, url, lines = _start(bundle, tmp_path_factory.mktemp("gradio"), cwd=tmp_path_factory.mktemp("elsewhere"))
    try:
        yield url, lines
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def strict(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """A second app with one job at a time, 3 per client and files kept 10 s (swept every 2 s);
    yields (url, cache folder)."""
    cache = tmp_path_factory.mktemp("strict-cache")
    proc, url, _ = _start(bundle, cache, "--concurrency", "1", "--queue-per-client", "3", "--cache-ttl", str(TTL))
    try:
        yield url, cache
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server[0], verbose=False)


@pytest.fixture(scope="module")
def local(bundle: Path):
    return load_bundle(bundle, device="cpu", threads=1)


def _png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _sample(client: Client, bundle: Path, seed: int, cls: str = "class 1", n: int = 3, **kw):
    args = dict(class_name=cls, num_samples=n, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, seed=seed,
                color_by="id", model=str(bundle)) | kw
    return client.predict(**args, api_name="/sample")


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# -- startup, torch-free -----------------------------------------------------------------------------
def test_app_names_its_endpoints(server, client: Client) -> None:
    # how fast it starts is a benchmark's business (timed asserts fail on a loaded machine)
    assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == ENDPOINTS


def test_app_imports_no_torch(bundle: Path) -> None:
    code = ("import sys, app; from studio.common import Registry; app.build(Registry(sys.argv[1], 'cpu', 1)); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print('TORCH', bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(bundle)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_model_gives_a_clear_message(tmp_path: Path) -> None:
    import app
    from studio.common import Registry
    missing = tmp_path / "no-such-bundle"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as err:
        Registry(str(missing), "cpu", 1).get(None)
    assert "training/fmnist.sh" in str(err.value) and "digit_core.export" in str(err.value)
    blocks = app.build(Registry(str(missing), "cpu", 1))          # the UI still comes up, saying so
    texts = [getattr(b, "value", None) for b in blocks.blocks.values()]
    assert any(isinstance(t, str) and "no-such-bundle" in t and "training/fmnist.sh" in t for t in texts)
    assert not any(isinstance(t, str) and str(tmp_path) in t for t in texts)   # no server directories


# -- endpoints ---------------------------------------------------------------------------------------
def test_sample_shapes_seeds_and_streaming(client: Client, bundle: Path, local) -> None:
    plot, gallery, timings, data, *_ = _sample(client, bundle, seed=3)
    assert plot["type"] == "plotly" and "stage 1" in timings and "tokens/s" in timings
    imgs = [_png(g["image"]) for g in gallery]
    assert len(imgs) == 3 and all(i.shape == (16, 16, 3) for i in imgs)
    assert np.asarray(data["disc_tokens"]).shape == (3, 4, 4) and np.asarray(data["vq_tokens"]).shape == (3, 4, 4)
    assert data["class_ids"] == [1, 1, 1] and set(data["timings"]) == {"stage1", "stage2", "decode"}
    # same seed, same images; and they are what the runtime gives for these arguments
    again = [_png(g["image"]) for g in _sample(client, bundle, seed=3)[1]]
    assert all(np.array_equal(a, b) for a, b in zip(imgs, again))
    ref = local.generate([1, 1, 1], seed=3, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0)
    assert np.array_equal(np.stack(imgs), ref.images) and data["disc_tokens"] == ref.disc_tokens.tolist()
    assert data["settings"] == ref.settings.to_dict()
    # settings left out take the bundle's defaults, as the library does for None
    omitted = client.predict(class_name="class 1", num_samples=2, seed=3, model=str(bundle), api_name="/sample")[3]
    lib = local.generate([1, 1], seed=3)
    assert omitted["settings"] == lib.settings.to_dict() and omitted["disc_tokens"] == lib.disc_tokens.tolist()
    other = _sample(client, bundle, seed=4)[3]
    assert other["disc_tokens"] != data["disc_tokens"]
    # "random" draws the classes from the seed; the stream shows stage 1 before the result
    job = client.submit("random", 4, 1.0, 5, 0.9, 2.0, 11, "probability", str(bundle), api_name="/sample")
    final = job.result()
    assert len(job.outputs()) >= 2 and len(final[1]) == 4 and all(0 <= c < 3 for c in final[3]["class_ids"])


def test_tokenize(client: Client, bundle: Path, local, tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    f = _save(Image.fromarray(rgb), tmp_path / "photo.png")
    overlay, disc, vq, hist, note, data, *rest = client.predict(handle_file(f), None, str(bundle), api_name="/tokenize")
    img = load_image(f, 16)
    ids, dists, _ = local.tokenize(img[None])
    assert data["disc_tokens"] == ids[0].tolist() and data["vq_tokens"] == local.vq_tokenize(img[None])[0].tolist()
    assert np.allclose(data["distances"], dists[0], atol=1e-3)
    assert len(data["cluster_sizes"]) == 4 and "example images" in data["cluster_sizes_source"] and "example" in note
    assert _png(overlay).shape[0] >= 256 and all(p["type"] == "plotly" for p in (disc, vq, hist))
    # an example instead of an upload; neither is a clear error
    ex = client.predict(None, "sample 2: class 2", str(bundle), api_name="/tokenize")[5]
    assert np.asarray(ex["disc_tokens"]).shape == (4, 4)
    with pytest.raises(Exception, match="Upload an image or pick an example"):
        client.predict(None, None, str(bundle), api_name="/tokenize")


def test_complete_keeps_the_top_rows(client: Client, bundle: Path, local, tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    f = _save(Image.fromarray(rgb), tmp_path / "half.png")
    plot, gallery, info, data, *_ = client.predict(handle_file(f), None, 50, 3, "class 0", 7, 1.0, 0, 1.0, True,
                                                   str(bundle), api_name="/complete")
    assert data["keep_rows"] == 2 and len(gallery) == 4 and "top 2 of 4 token rows" in info
    toks = np.asarray(data["disc_tokens"])
    assert toks.shape == (3, 4, 4) and (toks[:, :2] == local.tokenize(rgb[None])[0][:, :2]).all()
    ref = local.complete_detailed(rgb, 2, 3, class_id=0, seed=7, temperature=1.0, top_k=0, top_p=1.0)
    assert np.array_equal(toks, ref.disc_tokens)
    # 12.5% of a 4-row grid rounds to the one-row minimum; 87.5% to the three-row maximum
    assert client.predict(handle_file(f), None, 12.5, 1, "(no class: null token)", 0, 1.0, 0, 1.0, False, str(bundle),
                          api_name="/complete")[3]["keep_rows"] == 1
    assert client.predict(None, "sample 0: class 0", 87.5, 1, "class 2", 0, 1.0, 0, 1.0, False, str(bundle),
                          api_name="/complete")[3]["keep_rows"] == 3


def test_compare_model_runs_the_same_request_on_the_vq_ar_twin(client: Client, bundle: Path) -> None:
    twin = load_bundle(bundle.parent / "tiny-vq", device="cpu", threads=1)
    data = _sample(client, bundle, 6, compare_model="exported/tiny-vq")[3]
    assert data["compare"]["tokens"] == "vq" and data["compare"]["model"] == "tiny-vq"
    ref = twin.generate([1, 1, 1], seed=6, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0)
    assert data["compare"]["disc_tokens"] == ref.disc_tokens.tolist()    # same class, seed and settings
    out = client.predict(None, "sample 0: class 0", 50, 2, "class 0", 3, 1.0, 0, 1.0, False, str(bundle),
                         "exported/tiny-vq", api_name="/complete")
    assert out[3]["compare"]["keep_rows"] == out[3]["keep_rows"] == 2 and len(out[5]) == 3   # original + 2
    *_, numbers, other = client.predict(None, "sample 1: class 1", 5.0, 0, str(bundle), "exported/tiny-vq",
                                        api_name="/stability")
    assert numbers["compare"]["disc_change_rate"] is None and numbers["compare"]["vq_changed"] == numbers["vq_changed"]
    assert other is not None
    with pytest.raises(Exception, match="unknown model"):
        _sample(client, bundle, 0, compare_model="/etc")


def test_stability(client: Client, bundle: Path) -> None:
    pair, dmap, vmap, rates, curve, data, _ = client.predict(None, "sample 1: class 1", 5.0, 0, str(bundle),
                                                            api_name="/stability")
    assert 0 <= data["disc_change_rate"] <= 1 and 0 <= data["vq_change_rate"] <= 1 and -1 <= data["disc_cos_sim"] <= 1
    assert np.asarray(data["disc_changed"]).shape == (4, 4) and np.asarray(data["vq_changed"]).shape == (4, 4)
    assert np.mean(data["disc_changed"]) == pytest.approx(data["disc_change_rate"])
    c = data["curve"]
    assert c["snr_db"] == [30, 25, 20, 15, 10, 5, 1, 0.01] and len(c["vq_change"]) == len(c["disc_change"]) == 8
    assert "paper" in curve["plot"] and "5 dB" in rates
    quiet = client.predict(None, "sample 1: class 1", 40.0, 0, str(bundle), api_name="/stability")[5]
    assert quiet["disc_change_rate"] <= data["disc_change_rate"] + 1e-9 and quiet["disc_cos_sim"] > 0.99


# -- bad uploads ------------------------------------------------------------------------------------------
def _bad_files(d: Path) -> list[tuple[Path, str]]:
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    cases = {
        "text.png": (b"this is not an image\n", "not an image"),
        "empty.jpg": (b"", "empty"),
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated or corrupt"),
        "truncated.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 2], "truncated or corrupt"),
        "random.bin": (os.urandom(5000), "Invalid file type"),        # gradio's own check of file_types
        "noise.webp": (os.urandom(5000), "not an image"),
    }
    out = []
    for name, (raw, msg) in cases.items():
        (d / name).write_bytes(raw)
        out.append((d / name, msg))
    bomb = d / "bomb.png"                                   # 49 megapixels in a few kB
    Image.new("1", (7000, 7000)).save(bomb)
    out.append((bomb, "too large to decode safely"))
    return out


def test_bad_uploads_get_clear_errors_and_the_app_keeps_answering(client: Client, bundle: Path, tmp_path: Path) -> None:
    for path, message in _bad_files(tmp_path):
        for api, args in [("/tokenize", (handle_file(path), None, str(bundle))),
                          ("/stability", (handle_file(path), None, 10.0, 0, str(bundle)))]:
            with pytest.raises(Exception, match=re.escape(message)):
                client.predict(*args, api_name=api)
    huge = tmp_path / "huge.png"                            # over the upload limit: refused before upload
    huge.write_bytes(os.urandom(21 * 2**20))
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(huge), None, str(bundle), api_name="/tokenize")
    with pytest.raises(Exception, match="unknown model|not in the list of choices"):
        client.predict(None, "sample 0: class 0", "/etc", api_name="/tokenize")
    with pytest.raises(Exception, match="unknown class|not in the list of choices"):
        _sample(client, bundle, seed=0, cls="no such class")
    assert len(_sample(client, bundle, seed=1)[1]) == 3     # still answering


def test_odd_but_valid_uploads_work_through_the_api(client: Client, bundle: Path, local, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    rot = rgb.copy()
    exif = rot.getexif()
    exif[0x0112] = 6
    files = [
        _save(Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA"), tmp_path / "rgba.png"),
        _save(Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)), tmp_path / "deep.png"),
        _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        _save(rgb.convert("P"), tmp_path / "palette.webp", lossless=True),
        _save(rgb, tmp_path / "anim.gif", save_all=True, append_images=[rgb.rotate(90)], duration=100),
        _save(rot, tmp_path / "rotated.jpg", exif=exif),
        _save(Image.new("L", (1, 1), 128), tmp_path / "tiny.bmp"),
        _save(Image.new("RGB", (3000, 2000), (200, 30, 30)), tmp_path / "big.tiff"),
    ]
    for f in files:
        data = client.predict(handle_file(f), None, str(bundle), api_name="/tokenize")[5]
        assert data["disc_tokens"] == local.tokenize(load_image(f, 16)[None])[0][0].tolist(), f.name


# -- many users at once ---------------------------------------------------------------------------------
def test_forty_concurrent_clients_get_complete_files(server, bundle: Path) -> None:
    """Identical and different requests mixed, three rounds: no request fails, every file is whole.
    (Identical results once shared one cache file that was rewritten while it was being served.)"""
    url = server[0]
    clients = [Client(url, verbose=False) for _ in range(40)]
    seeds = [7 if i % 2 else 100 + i for i in range(40)]          # half the same request, half each its own

    def one(i: int):
        _, gallery, _, data, *_ = _sample(clients[i], bundle, seed=seeds[i], cls="random", n=2)
        return data, [_png(g["image"]) for g in gallery]

    results = []
    for _ in range(3):
        with cf.ThreadPoolExecutor(40) as pool:
            results.append(list(pool.map(one, range(40))))
    alone = Client(url, verbose=False)
    expect = {seed: _sample(alone, bundle, seed=seed, cls="random", n=2)[3] for seed in set(seeds)}
    for round_ in results:
        for seed, (data, imgs) in zip(seeds, round_):
            assert len(imgs) == 2 and all(i.shape == (16, 16, 3) for i in imgs)
            assert data["seed"] == seed and data["disc_tokens"] == expect[seed]["disc_tokens"], seed
    same = [imgs for seed, (_, imgs) in zip(seeds, results[0]) if seed == 7]
    assert all(np.array_equal(a, b) for imgs in same for a, b in zip(imgs, same[0]))


def test_one_client_cannot_fill_the_queue(strict, bundle: Path) -> None:
    """A client that sends 30 jobs at once has at most 3 queued or running; the rest are refused
    in our words. Another client's job, sent while the flood is queued, then waits behind at most
    those 3 (one job runs at a time here), not behind all 30."""
    url, _ = strict
    # the files stay on the server: this app expires them after 10 s, and a loaded machine can
    # answer a job later than that after writing its images
    flood, normal = (Client(url, verbose=False, download_files=False) for _ in range(2))
    jobs = [flood.submit("class 0", 16, 1.0, 0, 1.0, 1.0, i, "id", str(bundle), api_name="/sample")
            for i in range(30)]
    time.sleep(1.0)                                   # the flood's joins land first
    done_before = [j.done() for j in jobs]
    assert normal.predict("class 1", 3, 1.0, 0, 1.0, 1.0, 1, "id", str(bundle), api_name="/sample")[3]["seed"] == 1
    done_after = [j.done() for j in jobs]
    served, refused = [], []
    for j in jobs:
        try:
            j.result(timeout=300)
            served.append(True)
        except Exception as err:   # noqa: BLE001 - the refusal is the point
            served.append(False)
            refused.append(str(err))
    ahead = sum(1 for ok, a, b in zip(served, done_before, done_after) if ok and b and not a)
    assert ahead <= 3, f"{ahead} flood jobs ran before the normal client's"
    assert len(refused) >= 20 and sum(served) >= 3
    assert all("you have 3 queued or running (the limit is 3)" in r for r in refused), refused[:2]


def _thumbnails(client: Client) -> set[str]:
    """The example thumbnails of the page's config: the files every page shows for the app's life."""
    return {str(Path(v["image"]["path"]).resolve()) for comp in client.config["components"]
            if comp.get("props", {}).get("label") == "…or pick an example" for v in comp["props"].get("value") or []}


def test_the_file_cache_stays_bounded(strict, bundle: Path, tmp_path: Path) -> None:
    """Every request leaves files (outputs, uploads). Gradio's delete_cache missed the galleries of
    the streaming endpoints (/sample, /complete): they are registered with a per-session copy of
    the component it never sweeps. Files kept 10 s: over 30 s of mixed requests no file but the
    page's thumbnails outlives the expiry by more than a sweep (plus slack for a loaded machine),
    and soon after the last request only the thumbnails are left, still served."""
    url, cache = strict
    c = Client(url, verbose=False, download_files=False)   # as above: files are counted where they are made
    thumbs = _thumbnails(c)
    assert len(thumbs) >= 3 and all(Path(t).is_file() for t in thumbs)

    def files() -> dict[str, float]:   # os.walk: the app removes folders while this lists them
        now, ages = time.time(), {}
        for d, _, names in os.walk(cache):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    f = Path(d, name)
                    ages[str(f.resolve())] = now - f.lstat().st_ctime
        return ages

    rng, seen, oldest, n = np.random.default_rng(5), set(), 0.0, 0
    end = time.monotonic() + 3 * TTL
    while time.monotonic() < end or n < 8:
        up = _save(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), tmp_path / f"up{n}.png")
        if n % 4 == 0:
            assert len(_sample(c, bundle, seed=n, n=4)[1]) == 4
        elif n % 4 == 1:
            c.predict(handle_file(up), None, str(bundle), api_name="/tokenize")
        elif n % 4 == 2:
            c.predict(None, "sample 0: class 0", 50, 3, "class 0", n, 1.0, 0, 1.0, True, str(bundle),
                      api_name="/complete")
        else:
            c.predict(handle_file(up), None, 10.0, n, str(bundle), api_name="/stability")
        n += 1
        now = files()
        seen |= set(now) - thumbs
        oldest = max([oldest, *(age for f, age in now.items() if f not in thumbs)])
    assert len(seen) >= 2 * n                       # outputs and uploads were written ...
    assert oldest < TTL + 2 + 10, f"a file lived {oldest:.0f} s"   # ... and none outlived ttl + sweep (+ slack)
    def empty() -> list[Path]:   # Gradio makes vibe_edit_history once, at start
        return [Path(d) for d, dirs, names in os.walk(cache) if not dirs and not names and Path(d).name != "vibe_edit_history"]

    deadline = time.monotonic() + 4 * TTL           # an upload's folder goes one expiry after its file
    while time.monotonic() < deadline and (set(files()) != thumbs or empty()):
        time.sleep(0.5)
    assert set(files()) == thumbs, sorted(set(files()) - thumbs)[:5]
    assert not empty(), empty()[:5]                 # no empty folders pile up
    import httpx
    for t in sorted(thumbs)[:2]:                    # the page's thumbnails are still served
        assert httpx.get(f"{url}gradio_api/file={t}", timeout=30).status_code == 200


# -- what a hostile page or client can do ---------------------------------------------------------------------
def test_only_local_hosts_and_same_origin_uploads(server) -> None:
    import httpx
    url = server[0]
    assert httpx.get(url, timeout=30).status_code == 200
    assert httpx.get(url, headers={"Host": "attacker.example"}, timeout=30).status_code == 403      # DNS rebinding
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    up = url + "gradio_api/upload"
    files = {"files": ("x.png", png.getvalue(), "image/png")}
    assert httpx.post(up, files=files, headers={"Origin": "https://attacker.example"}, timeout=30).status_code == 403
    assert httpx.post(up, files=files, headers={"Origin": url.rstrip("/")}, timeout=30).status_code == 200


def test_clients_see_our_messages_not_server_paths(client: Client, bundle: Path, server) -> None:
    config = bundle / "config.json"                  # a server file named as an "upload"
    with pytest.raises(Exception) as err:
        client.predict({"path": str(config), "meta": {"_type": "gradio.FileData"}}, None, str(bundle),
                       api_name="/tokenize")
    assert str(bundle) not in str(err.value) and str(config) not in str(err.value)
    # JSON clients cannot send NaN (the library's own checks refuse it: tests/test_studio.py);
    # an out-of-range number is refused by the slider's own check first, in plain words
    with pytest.raises(Exception, match=r"num_samples must be an integer in 1\.\.16|greater than maximum value 16"):
        _sample(client, bundle, seed=0, n=17)
    with pytest.raises(Exception, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        _sample(client, bundle, seed=2 ** 64)
    with pytest.raises(Exception, match=r"cfg|greater than maximum value"):
        _sample(client, bundle, seed=0, cfg_scale=1e9)


# -- the README's client example, as written -------------------------------------------------------------
def test_readme_client_example_runs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's gradio_client snippet, against the app on the bundled model (only the port differs)."""
    bundled = ROOT / "exported" / "fmnist"
    if not (bundled / "manifest.json").is_file():
        pytest.skip("no bundled model in exported/fmnist")
    text = (ROOT / "README.md").read_text()
    snippet = text.split("with the app running on the bundled model:")[1].split("```python")[1].split("```")[0]
    cache = tmp_path_factory.mktemp("readme-cache")
    proc, url, _ = _start(Path("exported/fmnist"), cache)
    try:
        monkeypatch.chdir(ROOT)
        scope: dict = {}
        exec(compile(snippet.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), scope)   # noqa: S102
        assert len(scope["gallery"]) == 4 and np.asarray(scope["tokens"]["disc_tokens"]).ndim == 2
        assert 0 <= scope["numbers"]["disc_change_rate"] <= 1 and set(scope["data"]["settings"]) >= {"top_k", "cfg_scale"}
        assert len(list(cache.glob("digit-studio-*"))) == 1
    finally:
        _stop(proc)
    assert proc.returncode == 0 and not list(cache.glob("digit-studio-*"))   # `kill` (SIGTERM): a clean exit, cache removed
    assert not (cache / "vibe_edit_history").exists()   # the empty folder Gradio made for itself goes too


# -- the page in a browser ------------------------------------------------------------------------------
TABS = [("Generate", "generate-btn", 1), ("Tokenize", "tokenize-btn", 3), ("Complete", "complete-btn", 1),
        ("Stability", "stability-btn", 3), ("About", None, 0)]
VISIBLE = "[...document.querySelectorAll({sel!r})].filter(e => e.offsetParent !== null)"


@pytest.mark.browser
def test_every_tab_renders_in_a_browser(server, tmp_path: Path) -> None:
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    shots = Path(os.environ.get("DIGIT_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    b = Browser(exe, tmp_path / "profile")
    try:
        b.goto(server[0])
        b.wait("document.querySelectorAll('button[role=tab]').length >= 5", 60, "the tabs")
        assert b.js("[...document.querySelectorAll('button[role=tab]')].map(t => t.textContent.trim())") == [t for t, *_ in TABS]
        assert "DiGIT Studio" in b.js("document.body.innerText") and "tiny" in b.js("document.body.innerText")
        # a fresh profile: the grid is drawn on load, so the first run streams into a ready plot
        b.wait(f"{VISIBLE.format(sel='#generate-plot .main-svg')}.length", 60, "the empty grid on load")
        b.js("""(() => { window.__seen = []; const t = document.getElementById('generate-timing');
            new MutationObserver(() => window.__seen.push([t.innerText,
                [...document.querySelectorAll('#generate-plot .main-svg')].some(e => e.offsetParent !== null)]))
              .observe(t, {subtree: true, childList: true, characterData: true}); })()""")
        first = True
        for tab, button, plots in TABS:
            b.js(f"[...document.querySelectorAll('button[role=tab]')].find(t => t.textContent.trim() === {tab!r}).click()")
            b.wait(f"document.querySelector('button[role=tab].selected')?.textContent.trim() === {tab!r}", 10, tab)
            if button:
                assert b.js(f"(() => {{ const x = document.getElementById({button!r}); x.click(); return x.offsetParent !== null; }})()")
                b.wait(f"{VISIBLE.format(sel='.js-plotly-plot')}.length >= {plots} && "
                       f"{VISIBLE.format(sel='.js-plotly-plot .main-svg')}.length >= {plots}", 60, f"{tab}'s plots")
                b.wait("!document.querySelector('.progress-text, .eta-bar')", 30, f"{tab} to finish")
            if tab == "Generate" and first:
                seen = b.wait("window.__seen.some(([t]) => t.includes('tokens/s')) && window.__seen", 60, "the run")
                before = [ok for text, ok in seen if "tokens/s" not in text and "stage 1" in text]
                assert before and all(before), seen     # the grid was on screen before the last token
                first = False
            assert not b.js("[...document.querySelectorAll('.toast-body')].map(t => t.innerText).join(' ')"), tab
            if tab in ("Generate", "Complete"):
                sel = f"#{tab.lower()}-gallery img"
                n = b.wait(f"{VISIBLE.format(sel=sel)}.length", 30, f"{tab}'s gallery")
                assert n >= 4, f"{tab}: {n} gallery images"
            if tab in ("Tokenize", "Complete", "Stability"):      # the examples as thumbnails
                assert b.js(f"{VISIBLE.format(sel='.thumbnails img, .grid-wrap img')}.length") >= 3, tab
            if tab == "About":
                text = b.js("document.body.innerText")
                assert "arXiv:2410.12490" in text and "python -m digit_core.export" in text
            path = b.screenshot(shots / f"{tab.lower()}.png")
            px = np.asarray(Image.open(path).convert("L"))
            assert px.shape[1] >= 1000 and px.std() > 5, f"{tab}: blank screenshot"
    finally:
        b.close()
