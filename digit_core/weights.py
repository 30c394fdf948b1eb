"""Weight formats of a bundle's graphs: float16 rounding and storage (compute stays float32), and
int8 dynamic quantization of the transformer matrix products (``digit_core.export --weights``);
and one weights file that both a graph (as ONNX external data) and the training scripts read."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from .pipeline import DiGIT


def round_weights_to_half(model: DiGIT) -> DiGIT:
    """A copy of ``model`` whose float tensors are rounded to float16 (and kept float32)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
        if not model.config.is_vq:
            model.codebook.set_centroids(model.codebook.centroids)   # centroid_sq from the rounded centroids
    return model


def half_safetensors(module: torch.nn.Module, meta: dict) -> bytes:
    """``module``'s state dict as float16 safetensors bytes (what ``training.files.load_tensors`` reads)."""
    from safetensors.torch import save
    return save({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, {"json": json.dumps(meta)})


def link_external(proto: onnx.ModelProto, blob: bytes, location: str, prefix: str) -> int:
    """Point each float16 initializer of ``proto`` named ``<prefix><key>.fp16`` whose bytes equal
    tensor ``key`` of the safetensors ``blob`` at that tensor inside the file ``location`` (ONNX
    external data: file, offset, length), so the graph stores no copy of it. Initializers the
    exporter renamed or reshaped (GroupNorm's) stay in the graph. Returns the bytes linked."""
    from onnx.external_data_helper import set_external_data
    n = int.from_bytes(blob[:8], "little")
    header, start = json.loads(blob[8:8 + n]), 8 + n
    linked = 0
    for init in proto.graph.initializer:
        key = init.name.removesuffix(".fp16").removeprefix(prefix)
        meta = header.get(key) if init.name.startswith(prefix) and init.name.endswith(".fp16") else None
        if meta is None or meta["dtype"] != "F16" or list(init.dims) != meta["shape"]:
            continue
        begin, end = meta["data_offsets"]
        if init.raw_data != blob[start + begin:start + end]:
            raise RuntimeError(f"initializer {init.name} differs from {key} in {location}")
        set_external_data(init, location, offset=start + begin, length=end - begin)
        init.ClearField("raw_data")
        linked += end - begin
    return linked


def store_half(proto: onnx.ModelProto, min_size: int = 1024) -> int:
    """Store each float32 initializer of ``min_size`` or more values that float16 holds exactly
    as float16 + a Cast to float32 (in place); returns the bytes saved."""
    from onnx import numpy_helper
    g, saved, casts = proto.graph, 0, []
    for init in g.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims) < min_size:
            continue
        x = numpy_helper.to_array(init)
        h = x.astype(np.float16)
        if not np.array_equal(h.astype(np.float32), x):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(h, f"{name}.fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}.fp16"], [name], to=onnx.TensorProto.FLOAT))
        saved += x.nbytes - h.nbytes
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return saved


def quantize_int8(proto: onnx.ModelProto, scratch: Path) -> tuple[onnx.ModelProto, int]:
    """``proto`` with int8 weights in the MatMul/Gemm nodes of its transformer blocks and head
    (see the module docstring), through files in ``scratch``; returns it and the node count."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    consts = {i.name for i in proto.graph.initializer}
    # torch's exporter names nodes by module path: /blocks.N/... and /head/...
    nodes = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
             and n.input[1] in consts and (n.name.startswith("/blocks.") or n.name.startswith("/head/"))]
    if not nodes:
        return proto, 0
    src, dst = scratch / "float.onnx", scratch / "int8.onnx"
    big = proto.ByteSize() > 1_800_000_000
    onnx.save_model(proto, str(src), save_as_external_data=big, location="float.onnx.data" if big else None)
    # reduce_range stays off: it costs a bit of weight precision and only helps AVX2 kernels
    # without VNNI, whose u8 x s8 products can saturate
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                     per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                     use_external_data_format=big)
    out = onnx.load(str(dst))
    for f in scratch.glob("float.onnx*"):
        f.unlink()
    for f in scratch.glob("int8.onnx*"):
        f.unlink()
    return out, len(nodes)
