"""Malformed and hostile bundles: every one is refused with a BundleError naming the file, and
what onnxruntime loads is exactly the bytes whose sha256 was checked (issue #19, items 9-10)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from digit_core.presets import tiny
from digit_core.export import export_bundle
from digit_core.pipeline import DiGIT
from digit_core import runtime
from digit_core.contract import MAX_JSON_BYTES, BundleError
from digit_core.runtime import load_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_bundle(DiGIT(tiny(2)), tmp_path_factory.mktemp("bundles") / "tiny", check=False)


@pytest.fixture
def b(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "b"))


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, man: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(man))


def _entry(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _replace(b: Path, name: str, data: bytes) -> None:
    """Write ``name`` and list its new sha256, as someone editing bundle and manifest together would."""
    (b / name).write_bytes(data)
    man = _manifest(b)
    man["files"][name] = _entry(data)
    _write_manifest(b, man)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(files=["config.json"]), "no 'files'/'graphs' tables"),
    (lambda m: m["files"].update({"config.json": "abc"}), "entry for 'config.json'"),
    (lambda m: m["files"]["config.json"].update(size="2379"), "entry for 'config.json'"),
    (lambda m: m["files"]["config.json"].update(sha256=5), "entry for 'config.json'"),
    (lambda m: m["graphs"].update(stage1=5), r"lists no file for \['stage1'\]"),
    (lambda m: m["graphs"].update(stage1=["stage1.onnx"]), r"lists no file for \['stage1'\]"),
    (lambda m: m.update(opset="17"), "opset '17'"),
    (lambda m: m.update(ir_version=None), "IR version None"),
    (lambda m: m.update(format_version=[2]), r"format_version \[2\]"),
])
def test_manifest_entries_of_the_wrong_type(b: Path, edit, match: str) -> None:
    man = _manifest(b)
    edit(man)
    _write_manifest(b, man)
    with pytest.raises(BundleError, match=match):
        load_bundle(b, device="cpu")


@pytest.mark.parametrize("content, match", [
    (b'{"format": "digit-bundle", "name": "\xff\xfe"}', "manifest.json: not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "manifest.json: nested too deeply"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "manifest.json: nested too deeply"),
    (b"{}" + b" " * MAX_JSON_BYTES, "manifest.json: larger than 4 MiB"),
    (b"not json", "manifest.json: not valid JSON"),
    (b"[1, 2]", "manifest.json: not a DiGIT bundle manifest"),
])
def test_malformed_manifest_files(b: Path, content: bytes, match: str) -> None:
    (b / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=match):
        load_bundle(b, device="cpu")


def test_malformed_config_json_listed_with_its_hash(b: Path) -> None:
    """config.json edited together with its manifest entry: its sha256 holds, its content does not."""
    good = json.loads((b / "config.json").read_text())
    cases = [
        (b'{"name": "\xff"}', "config.json: not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json: nested too deeply"),
        (json.dumps({**good, "image_size": "16"}).encode(), "config.json: image_size: expected an integer, got '16'"),
        (json.dumps({**good, "class_names": 5}).encode(), "config.json: class_names: expected a list"),
        (json.dumps({**good, "encoder": {**good["encoder"], "width": [32]}}).encode(), "config.json: encoder.width"),
        (json.dumps({**good, "stage1": "x"}).encode(), "config.json: Stage1Config: expected an object"),
        (json.dumps({**good, "vqgan": {**good["vqgan"], "bogus": 1}}).encode(), r"config.json: VQGANConfig: unknown keys \['bogus'\]"),
        (json.dumps([good]).encode(), "config.json: DiGITConfig: expected an object"),
        (json.dumps(good).encode() + b" " * MAX_JSON_BYTES, "config.json: larger than 4 MiB"),
    ]
    for content, match in cases:
        _replace(b, "config.json", content)
        with pytest.raises(BundleError, match=match):
            load_bundle(b, device="cpu")


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.onnx", "sub/../../outside.onnx", "..\\outside.onnx"])
def test_manifest_names_that_leave_the_bundle(b: Path, name: str) -> None:
    """An entry naming a file outside the bundle is refused even when its size and sha256 fit."""
    target = Path(name) if name.startswith("/") else b.parent / "outside.onnx"
    if not name.startswith("/"):
        shutil.copy(b / "stage1.onnx", target)
    man = _manifest(b)
    man["files"][name] = _entry(target.read_bytes())
    man["graphs"]["stage1"] = name
    _write_manifest(b, man)
    with pytest.raises(BundleError, match="leaves the bundle"):
        load_bundle(b, device="cpu")


def test_symlink_out_of_the_bundle_is_refused_one_inside_loads(b: Path) -> None:
    outside = b.parent / "elsewhere.onnx"
    shutil.move(b / "stage1.onnx", outside)
    os.symlink(outside, b / "stage1.onnx")           # same bytes, same sha256: only the place is wrong
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b, device="cpu")
    (b / "stage1.onnx").unlink()
    (b / "graphs").mkdir()
    shutil.move(outside, b / "graphs" / "stage1.onnx")
    os.symlink("graphs/stage1.onnx", b / "stage1.onnx")
    assert load_bundle(b, device="cpu", threads=1).sample(class_ids=[0], seed=0).shape == (1, 16, 16, 3)


def test_onnxruntime_gets_the_hashed_bytes(b: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No path reaches onnxruntime: each session is built from the bytes whose sha256 was checked."""
    seen = []
    real = runtime.ort.InferenceSession

    def spy(model, *args, **kwargs):
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    load_bundle(b, device="cpu", threads=1)
    man = _manifest(b)
    listed = {man["files"][f]["sha256"] for f in man["graphs"].values()}
    assert len(seen) == 5 and all(isinstance(m, bytes) for m in seen)
    assert {hashlib.sha256(m).hexdigest() for m in seen} == listed


def test_external_tensor_files_must_be_listed(b: Path) -> None:
    """A graph whose weights live in a side file: loaded from the verified side file when the
    manifest lists it, refused when it does not (onnxruntime would read it from the working
    directory, unchecked)."""
    model = onnx.load(str(b / "vq_decoder.onnx"))
    (b / "vq_decoder.onnx").unlink()
    onnx.save_model(model, str(b / "vq_decoder.onnx"), save_as_external_data=True, location="vq_decoder.weights",
                    size_threshold=0)
    man = _manifest(b)
    man["files"]["vq_decoder.onnx"] = _entry((b / "vq_decoder.onnx").read_bytes())
    _write_manifest(b, man)
    with pytest.raises(BundleError, match=r"vq_decoder.onnx stores tensors in \['vq_decoder.weights'\], which manifest.json does not list"):
        load_bundle(b, device="cpu")
    man["files"]["vq_decoder.weights"] = _entry((b / "vq_decoder.weights").read_bytes())
    _write_manifest(b, man)
    loaded = load_bundle(b, device="cpu", threads=1)
    assert loaded.decode_vq(torch.zeros(1, 4, 4, dtype=torch.long).numpy()).shape == (1, 16, 16, 3)
    data = bytearray((b / "vq_decoder.weights").read_bytes())
    data[0] ^= 0xFF
    (b / "vq_decoder.weights").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vq_decoder.weights is corrupt"):
        load_bundle(b, device="cpu")


def test_a_graph_file_that_is_not_onnx(b: Path) -> None:
    _replace(b, "stage2.onnx", b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(BundleError, match="stage2.onnx"):
        load_bundle(b, device="cpu")
