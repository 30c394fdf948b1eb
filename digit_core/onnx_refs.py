"""The external-data files an ONNX model names, read from its protobuf bytes without ``onnx``.

The runtime hands onnxruntime a graph as verified bytes; a graph loaded from bytes looks for its
external tensors relative to the working directory. Listing every location first lets the
runtime refuse one that ``manifest.json`` does not cover and pass the verified bytes of those
it does, so onnxruntime never opens a file itself.

Only the messages that can hold tensors are walked (field numbers from onnx.proto):
ModelProto.graph (7) and .functions (25); GraphProto.node (1), .initializer (5),
.sparse_initializer (15); FunctionProto.node (7); NodeProto.attribute (5); AttributeProto
.t (5), .g (6), .tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23);
SparseTensorProto.values (1), .indices (2); TensorProto.external_data (13) -> (key 1, value 2).
"""
from __future__ import annotations

from typing import Iterator

MODEL, GRAPH, FUNCTION, NODE, ATTRIBUTE, TENSOR, SPARSE, ENTRY = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 25: FUNCTION},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    FUNCTION: {7: NODE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {13: ENTRY},
    ENTRY: {},
}


class ProtoError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ProtoError("truncated or overlong varint")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire type, start, end)`` of each field of the message in ``buf[start:end]``;
    for length-delimited fields start/end bound the payload."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i, end)
            yield field, wire, i, j
        elif wire == 1:
            j = i + 8
            yield field, wire, i, j
        elif wire == 2:
            n, i = _varint(buf, i, end)
            j = i + n
            yield field, wire, i, j
        elif wire == 5:
            j = i + 4
            yield field, wire, i, j
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        if j > end:
            raise ProtoError("field runs past the end of its message")
        i = j


def external_data_locations(model: bytes) -> set[str]:
    """Every ``location`` that a tensor of the serialized ModelProto ``model`` stores its data in."""
    buf = memoryview(model)
    found: set[str] = set()
    stack = [(MODEL, 0, len(buf))]   # iterative: nesting depth is the file's to choose, not ours
    while stack:
        kind, start, end = stack.pop()
        if kind == ENTRY:
            entry = {f: bytes(buf[a:b]) for f, w, a, b in _fields(buf, start, end) if w == 2}
            if entry.get(1) == b"location":
                found.add(entry.get(2, b"").decode("utf-8", "replace"))
            continue
        children = _CHILDREN[kind]
        for field, wire, a, b in _fields(buf, start, end):
            if wire == 2 and field in children:
                stack.append((children[field], a, b))
    return found
