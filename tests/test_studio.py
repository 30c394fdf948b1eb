"""The app's handlers and helpers without a browser or a server: each tab's handler called as a
function on a tiny exported bundle, the request policies of digit_core.demo, the serving rules
of studio.service, and uploads that would cost far more memory than their file size."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
import gradio as gr  # noqa: E402

from digit_core import demo, ood, viz  # noqa: E402
from digit_core.presets import tiny  # noqa: E402
from digit_core.export import export_bundle  # noqa: E402
from digit_core import images  # noqa: E402
from digit_core.images import ImageError, load_image  # noqa: E402
from digit_core.pipeline import DiGIT  # noqa: E402
from digit_core.runtime import load_bundle  # noqa: E402
from studio import about, common, complete, explore, generate, service, stability  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = DiGIT(tiny(3))
    with torch.no_grad():
        m.codebook.set_centroids(torch.randn(16, 32) * 0.3)
    return export_bundle(m, tmp_path_factory.mktemp("exported") / "tiny")


@pytest.fixture(scope="module")
def registry(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> common.Registry:
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("cache"))
    r = common.Registry(str(bundle), "cpu", 1)
    common.use(r)
    return r


def _select(index) -> gr.SelectData:
    return gr.SelectData(None, {"index": index, "value": None, "selected": True})


def _last(gen):
    out = list(gen)
    return out, out[-1]


def _final(outs: list[tuple]) -> tuple:
    """What each output shows when a stream has ended: its last value that was not a skip."""
    skip = gr.skip()
    return tuple(next((o[i] for o in reversed(outs) if o[i] != skip), None) for i in range(len(outs[0])))


# -- the request policies (digit_core.demo) ---------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.5, "3", True, None, -1, 17])
def test_integers_name_the_parameter(value) -> None:
    with pytest.raises(ValueError, match=r"num_samples must be an integer in 1\.\.16"):
        demo.integer("num_samples", value, 1, 16)


def test_integral_floats_are_integers() -> None:
    assert demo.integer("seed", 7.0, 0, 10) == 7 and demo.number("snr_db", 3, 0, 5) == 3.0
    with pytest.raises(ValueError, match=r"keep_percent must be a finite number"):
        demo.keep_rows_for(float("nan"), 8)


@pytest.mark.parametrize("index", [[-1, 3], [3, -40], [10 ** 9, 0], [0, 384], "x", [1], [1.5, 2]])
def test_crafted_click_positions_are_refused(index) -> None:
    with pytest.raises(ValueError, match=r"must be|click position"):
        demo.cell_at(index, 4, 384)


def test_clicks_hit_the_cell_under_them() -> None:
    assert demo.cell_at([0, 0], 4, 384) == (0, 0)
    assert demo.cell_at([383, 95], 4, 384) == (0, 3) and demo.cell_at([96, 288], 4, 384) == (3, 1)


def test_pad_grid_leaves_the_rest_blank() -> None:
    g = demo.pad_grid(np.array([[1, 2, 3], [4, 5, 6]]), 2)
    assert g.shape == (2, 2, 2) and g[0, 0].tolist() == [1, 2] and g[1, 1, 0] == 6 and np.isnan(g[:, 1, 1]).all()


def test_completion_speed_counts_only_generated_tokens() -> None:
    t = {"stage1": 1.0, "stage2": 1.0, "decode": 0.1}
    assert "(64 tokens/s)" in demo.timing_text(t, 1, 8, 4)
    assert "(32 tokens/s)" in demo.timing_text(t, 1, 8, 4, kept=32)   # half the rows were given, not generated


def test_sampling_args_keep_omitted_settings_none() -> None:
    assert demo.sampling_args() == dict(temperature=None, top_k=None, top_p=None)
    assert demo.sampling_args(0.5, 0.0, 1.0, 1.0) == dict(temperature=0.5, top_k=0.0, top_p=1.0, cfg_scale=1.0)


def test_the_last_choice_wins(registry: common.Registry, tmp_path: Path) -> None:
    m = registry.get(None)
    f = tmp_path / "up.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(f)
    with pytest.raises(ValueError, match="not both"):
        demo.choose_image(m, str(f), m.example_names()[0])
    # an upload clears the example, an example (thumbnail or name) clears the upload
    assert common.chose_upload() is None and common.chose_example() is None
    assert common.copies(2, "up.png", None) == ("up.png", None, "up.png", None)   # "use in the other tabs"
    name, upload = common.chose_thumbnail(None, _select(2))
    assert name == m.example_names()[2] and upload is None
    with pytest.raises(gr.Error, match="example index"):
        common.chose_thumbnail(None, _select(99))
    import app
    blocks = app.build(registry)
    tok = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "tokenize-btn")
    deps = [d for d in blocks.config["dependencies"] if d["backend_fn"]]
    by_trigger = {}
    for d in deps:
        for target, event in d["targets"]:
            by_trigger.setdefault((target, event), []).append(d)
    files = [b for b in blocks.blocks.values() if isinstance(b, gr.File)]
    examples = [b for b in blocks.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Example"]
    galleries = [b for b in blocks.blocks.values() if isinstance(b, gr.Gallery) and b.label == "…or pick an example"]
    assert len(files) == len(examples) == len(galleries) == 3 and tok is not None
    for f_, ex, th in zip(files, examples, galleries):
        assert ex._id in by_trigger[(f_._id, "upload")][0]["outputs"]
        assert f_._id in by_trigger[(th._id, "select")][0]["outputs"]
        assert f_._id in by_trigger[(ex._id, "input")][0]["outputs"]


# -- the handlers -------------------------------------------------------------------------------------
def test_generate_clears_the_last_run_then_streams(registry: common.Registry, bundle: Path) -> None:
    out, (fig, pics, timing, data, state, fig2, pics2) = _last(generate.sample("class 1", 3, 1.0, 0, 1.0, 1.0, 5, "id", None))
    assert out[0][5] is None and out[0][6] == [] and "compare" not in data   # no comparison asked for
    first = out[0]
    assert first[1] == [] and first[3] is None and "starting" in first[2]   # the previous images go first
    assert len(pics) == 3 and all(Image.open(p).size == (16, 16) for p, _ in pics)
    assert [c for _, c in pics] == [f"#{i} · class 1 · seed 5" for i in range(3)]
    ref = load_bundle(bundle, device="cpu", threads=1).generate([1, 1, 1], seed=5, temperature=1.0, top_k=0,
                                                                  top_p=1.0, cfg_scale=1.0)
    assert data["disc_tokens"] == ref.disc_tokens.tolist()
    assert [a["text"] for a in fig.layout.annotations] == [f"#{i} · class 1" for i in range(3)]


@pytest.mark.parametrize("kw, match", [(dict(num_samples=float("nan")), "num_samples"),
                                       (dict(num_samples=40), "num_samples"),
                                       (dict(color_by="rainbow"), "color_by"),
                                       (dict(class_name="no such class"), "unknown class"),
                                       (dict(model="/etc"), "unknown model")])
def test_generate_refuses_bad_arguments_by_name(registry: common.Registry, kw: dict, match: str) -> None:
    args = dict(class_name="class 0", num_samples=2, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, seed=0,
                color_by="id", model=None) | kw
    with pytest.raises(gr.Error, match=match):
        list(generate.sample(**args))


def test_tokenize_and_cell_clicks(registry: common.Registry) -> None:
    m = registry.get(None)
    name = m.example_names()[1]
    overlay, disc, vq, hist, note, data, ids = explore.tokenize(None, name, None)
    assert Image.open(overlay).size[0] == viz.overlay_side(16) and ids == data["disc_tokens"]
    side = viz.overlay_side(16)
    k, _, text = explore.pick_cell(ids, None, _select([side - 1, 0]))
    assert k == ids[0][3] and f"Cluster **{k}**" in text
    for bad in ([-1, 0], [0, 10 ** 6], ["a", 0]):
        with pytest.raises(gr.Error, match=r"must be an integer"):
            explore.pick_cell(ids, None, _select(bad))
    for bad in (float("nan"), -1, 16, 2 ** 70):
        with pytest.raises(gr.Error, match=r"cluster id must be an integer in 0\.\.15"):
            explore.show_cluster(bad, None)


def test_complete_label_and_rate(registry: common.Registry) -> None:
    m = registry.get(None)
    out, (fig, pics, info, data, *_) = _last(complete.complete(None, m.example_names()[0], 50, 2, "class 0", 1,
                                                               1.0, 0, 1.0, True, None))
    assert out[0][1] == [] and data["keep_rows"] == 2 and len(pics) == 3
    assert "re-rendered from its tokens" in info and all("re-rendered" in c for _, c in pics[1:])
    t1 = data["timings"]["stage1"]
    assert f"({2 * (16 - 8) / t1:,.0f} tokens/s)" in info      # 8 kept tokens per image are not counted


def test_stability_marks_the_current_image(registry: common.Registry) -> None:
    m = registry.get(None)
    pair, dmap, vmap, rates, curve, data, other = stability.stability(None, m.example_names()[0], 7.5, 0, None)
    assert other is None and "compare" not in data
    stars = [t for t in curve.data if t.name.endswith("this image")]
    assert [t.x[0] for t in stars] == ["7.5", "7.5"] and stars[1].y[0] == data["disc_change_rate"]
    assert "7.5 dB" in rates
    with pytest.raises(gr.Error, match="snr_db"):
        stability.stability(None, m.example_names()[0], float("nan"), 0, None)


def test_every_tab_has_something_on_load(registry: common.Registry) -> None:
    assert explore.initial(None)[5]["disc_tokens"]
    assert stability.initial(None)[5]["curve"]["snr_db"]
    first = complete.initial(None)
    assert complete.initial(None)[3] == first[3] and len(first[1]) == 1 + complete.DEFAULT_N   # computed once


def test_errors_reach_clients_without_server_paths() -> None:
    assert common.client_text(ValueError("/srv/x/exported/fmnist: file config.json is corrupt")) == \
        "fmnist: file config.json is corrupt"
    err = common._to_client(KeyError("/secret/path"), "f")
    assert "secret" not in str(err) and "Internal error" in str(err)


def test_model_card_comparisons_are_not_quotes() -> None:
    assert about.card_markdown("a\n>= 92%\n> quoted") == "a\n\\>= 92%\n> quoted"


# -- out of distribution (the bundled model, with its training-set reference) --------------------------------
FMNIST = Path(__file__).resolve().parents[1] / "exported" / "fmnist"


@pytest.fixture
def fmnist(monkeypatch: pytest.MonkeyPatch) -> demo.Model:
    """The bundled grey Fashion-MNIST model, as the handlers' registry."""
    if not (FMNIST / "manifest.json").is_file():
        pytest.skip("no bundled model in exported/fmnist")
    r = common.Registry(str(FMNIST), "cpu", 1)
    monkeypatch.setattr(common, "_REGISTRY", r)
    m = r.get(None)
    assert m.distance_reference() is not None, (
        "assets/clusters/fmnist/distances.json is missing or was measured with another tokenizer: "
        "python -m training.assets --bundle exported/fmnist --data fmnist --only distances")
    return m


def _notices(m: demo.Model, upload: str | None, example: str | None) -> tuple[str, str, str, dict]:
    """The Tokenize note, the Complete info and the Stability rates for one image, and the check."""
    note, data = explore.tokenize(upload, example, None)[4:6]
    info = _last(complete.complete(upload, example, 50, 1, None, 0, live=False))[1][2]
    rates = stability.stability(upload, example, 10.0, 0, None)[3]
    return note, info, rates, data["distance_check"]


def test_out_of_distribution_notice(fmnist: demo.Model, tmp_path: Path) -> None:
    ref = fmnist.distance_reference()
    names = fmnist.example_names()
    # the example each tab shows on load: in distribution, no notice in any tab
    *texts, check = _notices(fmnist, None, names[0])
    assert not check["beyond_p99"] and check["p99"] == ref.p99
    assert not any("Out of distribution" in t for t in texts), texts
    # held-out test images: about 1% lie beyond a 99th percentile, so few of the examples may
    flagged = [n for n in names if ood.distance_check(fmnist, fmnist.example(n))["beyond_p99"]]
    assert len(flagged) <= 3, flagged
    # a checkerboard is far from every Fashion-MNIST patch: each tab says so, naming the percentile
    odd = tmp_path / "checkerboard.png"
    Image.fromarray(((np.indices((32, 32)) // 4).sum(0) % 2 * 255).astype(np.uint8)).save(odd)
    *texts, check = _notices(fmnist, str(odd), None)
    assert check["beyond_p99"] and check["mean_sq_distance"] > ref.p99
    for t in texts:
        assert "Out of distribution" in t and "99th percentile" in t and f"({ref.p99:.4g})" in t, t
        assert f"{ref.images:,} train images" in t


def test_a_colour_upload_shows_the_grey_image_the_model_sees(fmnist: demo.Model, tmp_path: Path) -> None:
    f = tmp_path / "colour.png"
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (220, 30, 30)
    rgb[:, 16:] = (20, 60, 230)
    Image.fromarray(rgb).save(f)
    grey = lambda a: np.asarray(a)[..., 0] == np.asarray(a)[..., 2]  # noqa: E731
    overlay, *_, note, _, _ = explore.tokenize(str(f), None, None)
    assert grey(Image.open(overlay).convert("RGB")).mean() > 0.7 and demo.GREY_NOTE in note   # grid lines are red
    fig, pics, info, data, *_ = _last(complete.complete(str(f), None, 50, 1, None, 0, live=False))[1]
    original = np.asarray(Image.open(pics[0][0]).convert("RGB"))
    assert grey(original[: original.shape[0] // 2 - 2]).all() and "grey" in pics[0][1] and demo.GREY_NOTE in info
    pair, *_, rates, _, _, _ = stability.stability(str(f), None, 10.0, 0, None)
    clean = np.asarray(Image.open(pair).convert("RGB"))[:, :256]
    assert grey(clean).all() and demo.GREY_NOTE in rates
    assert not grey(rgb).all()                                   # what was uploaded was not grey


def test_no_reference_no_notice(registry: common.Registry, bundle: Path, tmp_path: Path) -> None:
    """Without distances.json (or with a broken one, or one of another tokenizer) there is no
    notice and nothing fails."""
    m = registry.get(None)
    assert m.distance_reference() is None
    note, data = explore.tokenize(None, m.example_names()[0], None)[4:6]
    assert data["distance_check"] is None and "Out of distribution" not in note
    copy = tmp_path / "tiny"
    import shutil
    shutil.copytree(bundle, copy)
    (copy / "clusters").mkdir()
    good = {"percentiles": {"50": 1.0, "99": 2.0}, "max": 3.0, "images": 100,
            "tokenizer_sha256": m.flows.manifest["files"]["tokenizer.onnx"]["sha256"]}
    for text in ["{", "[]", '{"percentiles": {"50": 1}}', json.dumps(good | {"percentiles": {"99": 1, "50": 2}}),
                 json.dumps(good | {"tokenizer_sha256": "0" * 64}), "x" * 70000]:
        (copy / "clusters" / "distances.json").write_text(text)
        assert demo.Model(copy, m.flows).distance_reference() is None, text[:40]
    (copy / "clusters" / "distances.json").write_text(json.dumps(good))
    other = demo.Model(copy, m.flows)
    assert other.distance_reference().p99 == 2.0
    check = ood.distance_check(other, m.example(m.example_names()[0]), np.full((4, 4), 2.5))
    assert check["beyond_p99"] and check["above_percentile"] == "99" and not check["beyond_max"]
    assert "beyond the **99th percentile** of 100 train images (2)" in ood.distance_notice(check)
    assert ood.distance_notice(ood.distance_check(other, None, np.full((4, 4), 1.5))) == ""


# -- serving rules (studio.service) -----------------------------------------------------------------------
@pytest.mark.parametrize("host, ok", [("localhost:7860", True), ("127.0.0.1:7860", True), ("[::1]:80", True),
                                      ("127.0.0.5", True), ("evil.example:7860", False), ("", False),
                                      ("localhost.evil.example", False), ("127.0.0.1.nip.io", False)])
def test_local_host_names(host: str, ok: bool) -> None:
    assert service.local_host_header(host) is ok


def test_local_only_refuses_foreign_hosts_and_origins() -> None:
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])

    sent = []

    async def send(msg):
        sent.append(msg)

    def call(headers):
        sent.clear()
        scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload",
                 "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
        asyncio.run(service.LocalOnly(inner)(scope, None, send))
        return sent[0]["status"] if sent else 200

    assert call({"host": "127.0.0.1:7860"}) == 200
    assert call({"host": "127.0.0.1:7860", "origin": "http://localhost:7860"}) == 200
    assert call({"host": "attacker.example"}) == 403
    assert call({"host": "127.0.0.1:7860", "origin": "https://attacker.example"}) == 403
    assert call({"host": "127.0.0.1:7860", "origin": "null"}) == 403
    assert seen == ["/gradio_api/upload"] * 2


def test_queue_counts_a_clients_waiting_and_running_jobs() -> None:
    ev = lambda s, ip: SimpleNamespace(session_hash=s, request=SimpleNamespace(client=SimpleNamespace(host=ip)))  # noqa: E731
    q = SimpleNamespace(event_queue_per_concurrency_id={"x": SimpleNamespace(queue=[ev("a", "1"), ev("b", "1")])},
                        active_jobs=[[ev("a", "2")], None])
    assert service.jobs_of(q, "a", "1") == (2, 2) and service.jobs_of(q, "c", "3") == (0, 0)


def test_prune_removes_only_old_empty_folders(tmp_path: Path) -> None:
    old, new, full = tmp_path / "old", tmp_path / "new", tmp_path / "full"
    for d in (old, new, full):
        d.mkdir()
    (full / "f.png").write_bytes(b"x")
    past = time.time() - 100
    for d in (old, full):
        os.utime(d, (past, past))
    assert service.prune_empty_dirs(tmp_path, age=50) == 1
    assert not old.exists() and new.exists() and full.exists()


def test_expire_deletes_old_files_but_the_pages_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file older than the expiry goes, whether Gradio registered it or not (files of
    per-session component copies), except the pinned thumbnails and the components' initial
    values; Gradio's lists forget what went; an output's folder goes with its file."""
    monkeypatch.setattr(service, "_PINNED", set())
    files = {}
    for rel in ("out-a/image.png", "out-b/image.png", "0123abcd/upload.png", "pinned/t.png", "kept/initial.png"):
        files[rel] = tmp_path / rel
        files[rel].parent.mkdir()
        files[rel].write_bytes(b"x")
    service.pin([str(files["pinned/t.png"])])
    registered = {str(files["out-a/image.png"]), str(files["pinned/t.png"])}
    blocks = SimpleNamespace(blocks={1: SimpleNamespace(keep_in_cache={str(files["kept/initial.png"])})},
                             temp_file_sets=[registered])
    now = time.time()
    assert service.expire(tmp_path, age=50, blocks=blocks, now=now) == 0          # all young: all stay
    assert service.expire(tmp_path, age=50, blocks=blocks, now=now + 100) == 3    # 100 s later
    left = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file())
    assert left == ["kept/initial.png", "pinned/t.png"]
    assert registered == {str(files["pinned/t.png"])}                            # Gradio's list forgets the other
    # the emptied folders go too (an upload's once it is older than the expiry: on this clock, now)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["kept", "pinned"]


# -- uploads that cost more than they weigh (digit_core.images) ---------------------------------------------
def test_deep_uploads_are_bounded_by_decoded_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # counted from the header, before decoding: 4 bytes per float32 pixel, 1 per 8-bit grey one
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 2 * 2**20)
    big, grey = tmp_path / "big.tiff", tmp_path / "grey.png"
    Image.new("F", (800, 800)).save(big, compression="tiff_deflate")      # 2.4 MB decoded, 1 KB on disk
    Image.new("L", (800, 800)).save(grey)                                  # 0.6 MB decoded
    with pytest.raises(ImageError, match=r"too large to decode safely: 800x800 F pixels take 2.4 MB \(the limit is 2 MB\)"):
        load_image(big, 16)
    assert load_image(grey, 16).shape == (16, 16, 3)


def test_nan_float_images_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "nan.tiff"
    Image.fromarray(np.full((64, 64), np.nan, np.float32)).save(f)
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_image(f, 16)


def test_sixteen_bit_conversion_rounds_like_floats(tmp_path: Path) -> None:
    a = np.arange(0, 65536, 7, dtype=np.uint16)[: 96 * 96].reshape(96, 96)
    f = tmp_path / "deep.png"
    Image.fromarray(a).save(f)
    got = load_image(f, 96)[..., 0]
    assert np.array_equal(got, np.round(a / 65535 * 255).astype(np.uint8))


def test_header_says_how_the_encoder_was_trained() -> None:
    from digit_core.presets import preset
    from digit_core.demo import encoder_line
    e = preset("fmnist-cnn").encoder
    e.objective, e.labels = "vicreg_dense", False
    assert "self-supervised (vicreg_dense), **no labels**" in encoder_line(e)
    e.objective, e.labels = "supervised", True
    assert "**with the labels**" in encoder_line(e) and "not self-supervised" in encoder_line(e)
    e.objective, e.labels = "", None
    assert "not recorded" in encoder_line(e)


# -- DiGIT and the VQ-AR baseline side by side ----------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> common.Registry:
    """A bundles folder with a tiny DiGIT and its VQ-AR twin (same VQGAN, graphs shared)."""
    from digit_core.presets import tiny_vq
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(1)
    digit = DiGIT(tiny(3))
    with torch.no_grad():
        digit.codebook.set_centroids(torch.randn(16, 32) * 0.3)
    vq = DiGIT(tiny_vq(3))
    vq.vqgan.load_state_dict(digit.vqgan.state_dict())
    export_bundle(digit, root / "tiny", weights="float16")
    export_bundle(vq, root / "tiny-vq", weights="float16", share_with=root / "tiny")
    export_bundle(DiGIT(tiny(4)), root / "four-classes")
    r = common.Registry(str(root / "tiny"), "cpu", 1, root)
    common.use(r)
    yield r
    common.use(None)


def test_generate_compares_digit_with_vq_ar_live(pair: common.Registry) -> None:
    out = list(generate.sample("class 2", 2, None, None, None, None, 4, "id", "exported/tiny", "exported/tiny-vq"))
    fig, pics, timing, data, state, fig2, pics2 = _final(out)
    assert data["tokens"] == "disc" and data["compare"]["tokens"] == "vq" and data["compare"]["class_ids"] == [2, 2]
    assert data["compare"]["seed"] == data["seed"] == 4
    assert len(pics2) == 2 and "tiny-vq" in timing and "no stage 2" in timing
    assert out[0][5] is not None                                   # the second grid is drawn from the start
    skip = gr.skip()
    assert any(o[0] == skip and o[5] != skip and o[6] == skip for o in out[1:]), "the compared grid fills in live"
    ref = pair.get("exported/tiny-vq").flows.generate([2, 2], seed=4)
    assert data["compare"]["disc_tokens"] == ref.disc_tokens.tolist()   # the same request, run on the twin


def test_complete_and_stability_compare(pair: common.Registry) -> None:
    m = pair.get("exported/tiny")
    name = m.example_names()[0]
    fig, pics, info, data, fig2, pics2 = _final(list(complete.complete(None, name, 25, 2, "class 0", 3, None, None, None,
                                                                       False, "exported/tiny", "exported/tiny-vq")))
    vq = pair.get("exported/tiny-vq").flows
    kept = vq.vq_tokenize(m.example(name)[None])[0][:1]
    assert data["compare"]["tokens"] == "vq" and np.array_equal(np.asarray(data["compare"]["disc_tokens"])[:, :1],
                                                                 np.repeat(kept[None], 2, 0))
    assert len(pics2) == 3 and fig2 is not None
    *_, rates, curve, numbers, other = stability.stability(None, name, 5.0, 0, "exported/tiny", "exported/tiny-vq")
    assert numbers["compare"]["disc_change_rate"] is None and 0 <= numbers["compare"]["vq_change_rate"] <= 1
    assert numbers["compare"]["vq_changed"] == numbers["vq_changed"]   # one VQGAN: the same noise, the same codes
    assert "tiny-vq" in rates and other is not None
    column, caption = common.compare_caption("exported/tiny", "exported/tiny-vq")
    assert column["visible"] and "VQ-AR baseline" in caption["value"] and "drifts" in caption["value"]
    assert common.compare_caption("exported/tiny", common.NO_COMPARE)[0]["visible"] is False


def test_vq_ar_bundle_as_the_model(pair: common.Registry) -> None:
    m = pair.get("exported/tiny-vq")
    name = m.example_names()[0]
    pair_, dmap, vmap, rates, curve, data, _ = stability.stability(None, name, 5.0, 0, "exported/tiny-vq")
    assert dmap is None and data["disc_change_rate"] is None and "no discriminative tokens" in rates
    assert [t.name for t in curve.data if "this model" in t.name] == ["VQ tokens (this model)"]
    assert explore.initial("exported/tiny-vq") == tuple(gr.skip() for _ in range(7))
    with pytest.raises(gr.Error, match="VQ-token model"):
        explore.tokenize(None, name, "exported/tiny-vq")
    from app import summary
    assert "VQ-AR baseline" in summary(m) and "no discriminative encoder" in summary(m)


def test_compare_needs_the_same_classes(pair: common.Registry) -> None:
    with pytest.raises(gr.Error, match="cannot compare tiny with tiny"):
        list(generate.sample("class 0", 1, None, None, None, None, 0, "id", "exported/tiny", "exported/four-classes"))
    with pytest.raises(gr.Error, match="unknown model"):
        list(generate.sample("class 0", 1, None, None, None, None, 0, "id", "exported/tiny", "/etc"))
