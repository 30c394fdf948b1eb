"""int8 bundles (``digit_core.export --weights int8``): quantized, recorded, and close to float."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from digit_core.presets import tiny
from digit_core.export import main as export_main
from digit_core.weights import round_weights_to_half
from digit_core.pipeline import DiGIT
from digit_core.runtime import load_bundle


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DiGIT:
    """A tiny model whose heads are scaled up: random-init logits are nearly flat, and then any
    logits, right or wrong, would sample the same tokens from the same random draws."""
    torch.manual_seed(0)
    m = DiGIT(tiny(3))
    with torch.no_grad():
        m.codebook.set_centroids(torch.randn(16, 32))
        m.stage1.head.weight.mul_(100)
        m.stage2.head.weight.mul_(100)
    return m


@pytest.fixture(scope="module")
def bundle_dir(model: DiGIT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    model.save(root / "model")
    export_main(["--model", str(root / "model"), "--out", str(root / "tiny-int8"), "--weights", "int8"])   # checks itself
    return root / "tiny-int8"


def test_manifest_records_the_quantization(bundle_dir: Path) -> None:
    man = json.loads((bundle_dir / "manifest.json").read_text())
    assert man["weights"].startswith("int8")
    q = man["quantization"]
    assert q["method"] == "onnxruntime.quantization.quantize_dynamic"
    # tokenizer: 2 ViT blocks x (qkv, proj, fc1, fc2); stages: 2 blocks x 4 + the head
    assert q["quantized_nodes"] == {"tokenizer": 8, "stage1": 9, "stage2": 9}


def test_matrix_weights_are_stored_as_int8(bundle_dir: Path) -> None:
    for name in ("stage1", "stage2", "tokenizer"):
        g = onnx.load(str(bundle_dir / f"{name}.onnx")).graph
        ops = [n.op_type for n in g.node]
        assert ops.count("MatMulInteger") == (9 if name != "tokenizer" else 8), name
        init = {t.name: t for t in g.initializer}
        weights = [n.input[1] for n in g.node if n.op_type == "MatMulInteger"]
        assert all(init[w].data_type == onnx.TensorProto.INT8 for w in weights), name
        # what stays float is stored as float16 (behind a Cast), except small tensors
        big_float = [t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 1024]
        assert not big_float, (name, big_float)
    # the tokenizer's nearest-centroid product stays float: it decides which token wins
    tok = onnx.load(str(bundle_dir / "tokenizer.onnx")).graph
    assert any(n.op_type == "MatMul" and not n.name.startswith("/blocks.") for n in tok.node)


def test_int8_bundle_samples_close_to_the_float_model(model: DiGIT, bundle_dir: Path) -> None:
    b, ref = load_bundle(bundle_dir, device="cpu", threads=1), round_weights_to_half(model)
    # logits of a full-context prefill: within 2% of the largest (a broken scale gives tens of percent)
    for name, gpt in (("stage1", ref.stage1), ("stage2", ref.stage2)):
        tokens = np.random.default_rng(2).integers(0, gpt.cfg.vocab_size, (4, gpt.cfg.context))
        with torch.no_grad():
            want = gpt(torch.from_numpy(tokens))[:, -1].numpy()
        got = getattr(b, f"open_{name}")(4)(tokens, 0)
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max(), name
        assert want.std() > 1.0   # sharp logits: the agreement below means something
    classes = [0, 1, 2] * 8
    a, r = b.generate(classes, seed=3), ref.generate(classes, seed=3)
    assert (a.disc_tokens == r.disc_tokens).mean() >= 0.9
    assert (a.vq_tokens == r.vq_tokens).mean() >= 0.9
    imgs = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    assert (b.tokenize(imgs)[0] == ref.tokenize(imgs)[0]).mean() >= 0.95


def test_unknown_weight_format_is_rejected_by_name(model: DiGIT, tmp_path: Path) -> None:
    from digit_core.export import export_bundle
    with pytest.raises(ValueError, match="weights must be one of 'float32', 'float16', 'int8', got 'int4'"):
        export_bundle(model, tmp_path / "x", weights="int4")
    assert not (tmp_path / "x").exists()
