"""PyTorch -> ONNX: a bundle of graphs + manifest that ``digit_core.runtime`` runs without torch.

The graphs and their interfaces are the bundle contract's (``digit_core.contract``); a DiGIT
model has five, a VQ-token model (the VQ-AR baseline) only vq_encoder, vq_decoder and stage1:

    tokenizer.onnx   uint8 images [N, H, W, 3] -> ids [N, n, n], sq. distances [N, n, n], features [N, n, n, d]
    vq_encoder.onnx  uint8 images [N, H, W, 3] -> VQ ids [N, m, m], latents [N, m, m, d] (before quantization)
    vq_decoder.onnx  VQ ids [N, m, m] -> uint8 images [N, H, W, 3]
    stage1.onnx      (tokens [B, S], start, past_key_i / past_value_i [B, H, T, hd] for each layer i)
                     -> (logits [B, V], kv [L, 2, B, H, S, hd]: this chunk's keys and values);
                     T = the positions one generation fills (config.stage1_positions)
    stage2.onnx      the same for stage 2

``weights="float16"`` rounds the model's weights to float16 first and stores every initializer
that float16 holds exactly as float16 behind a Cast (onnxruntime folds the Cast at load, so
compute stays float32 and as fast): the bundle is half the size and equals, to float32
rounding, the PyTorch model with float16-rounded weights -- the check below holds it to that.

``weights="int8"`` starts from the same float16-rounded model and quantizes the matrix
products of the transformers (``onnxruntime.quantization.quantize_dynamic``): in the tokenizer's
encoder blocks and in both stages, every MatMul/Gemm with a constant weight gets int8 weights,
one scale per output channel, and multiplies uint8 activations quantized per tensor at run time
(onnxruntime fuses this into DynamicQuantizeMatMul on CPU). The tokenizer's resize and
nearest-centroid products stay float, since they decide which token wins; every other
initializer is stored as float16. The bundle runs on any onnxruntime like the others, and the
check holds it to the rounded PyTorch model within ``INT8_RTOL``.

Each stage graph serves both prefill (S > 1) and decoding (S = 1): it traces ``GPT.step``, the
functional twin of the in-place cached forward. Every graph is checked against PyTorch on
fresh random inputs at another batch size than it was traced with (so the dynamic axes are
exercised too); the bundle is written to a temp directory and renamed into place.

    python -m digit_core.export --model MODEL_DIR --out exported/NAME
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from .codebook import sq_distances
from .contract import MAX_IR_VERSION, graph_specs, manifest, past_names, read_manifest, sha256
from .gpt import GPT
from .onnx_refs import external_data_locations
from .pipeline import DiGIT
from .weights import half_safetensors, link_external, quantize_int8, round_weights_to_half, store_half

RTOL = 1e-4           # max |ort - torch| / max |torch| tolerated at export
# int8 weights + uint8 activations: ~1% of max |logit| on the test models; a wrong scale or
# a saturating kernel gives tens of percent
INT8_RTOL = 0.05
WEIGHT_FORMATS = ("float32", "float16", "int8")
INT8_GRAPHS = ("tokenizer", "stage1", "stage2")
TRACE_BATCH, CHECK_BATCH = 2, 3


class GPTStep(nn.Module):
    """``GPT.step`` as a module: ``(tokens, start, *past) -> (logits of the last position, kv)``."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gpt.step(tokens, start, past)



def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


# -- the graphs ----------------------------------------------------------------------------------
def _graph_specs(model: DiGIT) -> dict[str, dict[str, Any]]:
    """Per graph of the bundle contract (``contract.graph_specs``): the module to trace, example
    inputs (at batch ``b``), and the contract's I/O names and dynamic axes."""
    c = model.config
    s, m = c.image_size, c.vq_grid

    def images(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g),)

    def vq_ids(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, c.vqgan.n_embed, (b, m, m), generator=g),)

    def stage(gpt: GPT, length: int) -> Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]:
        def inputs(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
            S = min(3 + b, length - 1)   # a prefill chunk whose length differs between trace and check
            cache = gpt.new_cache(b, length)
            return (torch.randint(0, gpt.cfg.vocab_size, (b, S), generator=g), torch.tensor(0),
                    *(cache[i, j] for i in range(gpt.cfg.n_layer) for j in (0, 1)))
        return inputs

    traced = {"vq_encoder": (model.vq_encoder, images), "vq_decoder": (model.vq_decoder, vq_ids),
              "stage1": (GPTStep(model.stage1), stage(model.stage1, c.stage1_positions))}
    if not c.is_vq:
        traced |= {"tokenizer": (model.disc_tokenizer, images),
                   "stage2": (GPTStep(model.stage2), stage(model.stage2, c.stage2_positions))}
    return {name: dict(module=traced[name][0], make=traced[name][1], inputs=list(spec.inputs),
                       outputs=list(spec.outputs), axes=spec.dynamic_axes)
            for name, spec in graph_specs(c).items()}


def _export_graph(spec: dict[str, Any], path: Path, opset: int, half: bool = False, int8: bool = False,
                  link: tuple[bytes, str, str] | None = None) -> int:
    """Trace one module to ``path``, with the IR version onnxruntime reads; returns the number
    of int8-quantized nodes. ``link = (safetensors bytes, file name, name prefix)``: write that
    file beside the graph and keep the float16 weights it holds there only (``link_external``)."""
    example = spec["make"](TRACE_BATCH, torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        outputs = spec["module"](*example)
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript;
        # our graphs are plain static-shape tensor code, which it exports exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(spec["module"], example, str(path), dynamo=False, opset_version=opset,
                          input_names=spec["inputs"], output_names=spec["outputs"], dynamic_axes=spec["axes"],
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    # The tracer names every reshaped dim symbolically; state the static ones, which the runtime checks.
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for value, tensor in zip(proto.graph.output, outputs):
        dynamic = spec["axes"].get(value.name, {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis in dynamic:
                dim.dim_param = dynamic[axis]
            else:
                dim.dim_value = tensor.shape[axis]
    quantized = 0
    if int8:
        proto, quantized = quantize_int8(proto, path.parent)
    if half:
        store_half(proto)
    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    if proto.ir_version > MAX_IR_VERSION:
        raise ValueError(f"opset {opset} needs ONNX IR version {proto.ir_version} > {MAX_IR_VERSION}, "
                         "more than onnxruntime reads")
    onnx.checker.check_model(proto)
    for f in path.parent.iterdir():   # a graph over 2 GB came with one file per tensor: keep one .data file
        if f != path:
            f.unlink()
    if link is not None:
        blob, location, prefix = link
        if link_external(proto, blob, location, prefix):
            (path.parent / location).write_bytes(blob)
    big = sum(t.ByteSize() for t in proto.graph.initializer) > 1_800_000_000
    onnx.save_model(proto, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)
    return quantized


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _check_nearest(name: str, ids: np.ndarray, ref_ids: np.ndarray, dists: np.ndarray, rtol: float = RTOL) -> None:
    """Ids must equal PyTorch's, except at near-ties where either choice is the nearest within ``rtol``.
    ``dists [..., K]``: PyTorch's squared distances to every code."""
    diff = ids != ref_ids
    if not diff.any():
        return
    d = dists.reshape(-1, dists.shape[-1])[diff.reshape(-1)]
    chosen = np.take_along_axis(d, ids.reshape(-1)[diff.reshape(-1), None], 1)[:, 0]
    best = d.min(1)
    if (chosen - best > rtol * np.maximum(np.abs(best), 1.0)).any():
        raise RuntimeError(f"{name}.onnx: {int(diff.sum())} token ids differ from PyTorch beyond near-ties")


def _check_graph(name: str, spec: dict[str, Any], path: Path, model: DiGIT, rtol: float = RTOL) -> None:
    """Run the exported graph in onnxruntime on new random inputs; raise naming the graph on a
    mismatch beyond ``rtol``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    inputs = spec["make"](CHECK_BATCH, g)
    out = sess.run(None, {k: v.numpy() for k, v in zip(spec["inputs"], inputs)})

    def close(what: str, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise RuntimeError(f"{name}.onnx: {what} has shape {a.shape}, PyTorch gives {b.shape}")
        err = _rel_err(a, b)
        if not err <= rtol:
            raise RuntimeError(f"{name}.onnx: {what} differs from PyTorch by relative error {err:.2e} > {rtol:g}")

    with torch.no_grad():
        _CHECKS[name](name, sess, spec, inputs, out, model, close, g, rtol)


def _check_tokenizer(name, sess, spec, inputs, out, model: DiGIT, close, g, rtol) -> None:
    ids, dists, feats = model.disc_tokenizer(inputs[0])
    close("features", out[2], feats.numpy())
    close("distances", out[1], dists.numpy())
    cb = model.codebook
    _check_nearest(name, out[0], ids.numpy(), _all_dists(feats, cb.centroids, cb.centroid_sq), rtol)


def _check_vq_encoder(name, sess, spec, inputs, out, model: DiGIT, close, g, rtol) -> None:
    ids, z = model.vq_encoder(inputs[0])
    close("latents", out[1], z.numpy())
    e = model.vqgan.quantize.embedding.weight
    _check_nearest(name, out[0], ids.numpy(), _all_dists(z, e))


def _check_vq_decoder(name, sess, spec, inputs, out, model: DiGIT, close, g, rtol) -> None:
    ref = model.vq_decoder(inputs[0]).numpy()
    if out[0].shape != ref.shape or np.abs(out[0].astype(int) - ref).max() > 1:
        raise RuntimeError(f"{name}.onnx: images differ from PyTorch by more than one level")


def _check_stage(name, sess, spec, inputs, out, model: DiGIT, close, g, rtol) -> None:
    """A prefill chunk, then one decode step over a cache holding the graph's own keys/values."""
    gpt: GPT = spec["module"].gpt
    tokens, S, T = inputs[0], inputs[0].shape[1], inputs[2].shape[2]
    cache = gpt.new_cache(CHECK_BATCH, T)   # PyTorch's in-place cached forward fills it
    close("prefill logits", out[0], gpt(tokens, 0, cache)[:, -1].numpy())
    close("prefill keys/values", out[1], cache[:, :, :, :, :S].numpy())
    mine = np.zeros(cache.shape, np.float32)
    mine[:, :, :, :, :S] = out[1]
    nxt = torch.randint(0, gpt.cfg.vocab_size, (CHECK_BATCH, 1), generator=g)
    past = {k: mine[i // 2, i % 2] for i, k in enumerate(past_names(gpt.cfg.n_layer))}
    out = sess.run(None, {"tokens": nxt.numpy(), "start": np.array(S, np.int64), **past})
    close("decode logits", out[0], gpt(nxt, S, cache)[:, -1].numpy())
    close("decode keys/values", out[1], cache[:, :, :, :, S:S + 1].numpy())


_CHECKS = {"tokenizer": _check_tokenizer, "vq_encoder": _check_vq_encoder, "vq_decoder": _check_vq_decoder,
           "stage1": _check_stage, "stage2": _check_stage}
"""Each graph's reference check against the PyTorch module it was traced from."""


def _all_dists(x: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor | None = None) -> np.ndarray:
    """Squared distances ``[rows, K]`` of every vector of ``x [..., d]`` to every code, as ``nearest`` sees them."""
    return sq_distances(x.reshape(-1, x.shape[-1]), codes, codes_sq).numpy()


# -- the bundle ----------------------------------------------------------------------------------
def export_bundle(model: DiGIT, out_dir: str | Path, *, opset: int = 17, check: bool = True,
                  weights: str = "float32", share_with: str | Path | None = None) -> Path:
    """Export ``model`` to the bundle directory ``out_dir`` (replaced atomically); returns its path.

    Every graph has a dynamic batch axis (and the stage graphs a dynamic sequence axis).
    ``check`` runs each graph in onnxruntime against PyTorch and raises on a mismatch.
    ``weights``: "float32", "float16" storage or "int8" (see the module docstring); with float16
    or int8 the VQGAN's weights are one file, ``vqgan.safetensors``, that its two graphs read as
    external data and the training scripts read as a VQGAN (``--vqgan=<bundle>/vqgan.safetensors``).
    ``share_with``: a sibling bundle (same parent folder); each file identical to one of its
    files is listed as ``../<sibling>/<file>`` instead of being written again.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_FORMATS))}, got {weights!r}")
    out = Path(out_dir)
    sibling = None if share_with is None else Path(share_with)
    if sibling is not None:
        if sibling.resolve().parent != out.resolve().parent or sibling.resolve() == out.resolve():
            raise ValueError(f"share_with {sibling} must be another bundle in the folder of {out} ({out.parent})")
        read_manifest(sibling)   # a readable bundle, every file the size it lists
    out.parent.mkdir(parents=True, exist_ok=True)
    if model.device.type != "cpu" or model.stage1.head.weight.dtype != torch.float32:
        model = copy.deepcopy(model).cpu().float()   # graphs are float32; leave the caller's model be
    if weights != "float32":
        model = round_weights_to_half(model)
    was_training = model.training
    model.eval()
    try:
        return _write_bundle(model, out, opset, check, weights, sibling)
    finally:
        model.train(was_training)


VQGAN_FILE = "vqgan.safetensors"


def _write_bundle(model: DiGIT, out: Path, opset: int, check: bool, weights: str, sibling: Path | None) -> Path:
    cfg = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)   # mkdtemp makes it private (0700); a bundle is meant to be shared and served
    link = None
    if weights != "float32":
        link = (half_safetensors(model.vqgan, {"vqgan": dataclasses.asdict(cfg.vqgan)}), VQGAN_FILE, "vqgan.")
    try:
        graphs: dict[str, str] = {}
        quantized: dict[str, int] = {}
        ir_version = 0
        for name, spec in _graph_specs(model).items():
            scratch = tmp / f".{name}"   # torch may write external tensors beside the graph
            scratch.mkdir()
            int8 = weights == "int8" and name in INT8_GRAPHS
            quantized[name] = _export_graph(spec, scratch / f"{name}.onnx", opset, half=weights != "float32", int8=int8,
                                            link=link if name.startswith("vq_") else None)
            if name.startswith("stage") and int8 and not quantized[name]:
                raise RuntimeError(f"{name}.onnx: no MatMul found to quantize (did the exporter rename the nodes?)")
            if check:
                _check_graph(name, spec, scratch / f"{name}.onnx", model, INT8_RTOL if quantized[name] else RTOL)
            ir_version = max(ir_version, onnx.load(str(scratch / f"{name}.onnx"), load_external_data=False).ir_version)
            for f in scratch.iterdir():
                os.replace(f, tmp / f.name)
            scratch.rmdir()
            graphs[name] = f"{name}.onnx"
        cfg.save(tmp / "config.json")
        shared = _share(tmp, graphs, sibling) if sibling is not None else {}
        fields: dict[str, Any] = {"opset": opset, "weights": WEIGHTS_LABEL[weights], "ir_version": ir_version,
                                  "producer": {"git_commit": git_commit(), "torch": torch.__version__, "onnx": onnx.__version__}}
        if weights == "int8":
            fields["quantization"] = _int8_record(quantized)
        (tmp / "manifest.json").write_text(json.dumps(manifest(cfg, tmp, graphs, shared, **fields), indent=2))
        # Swap in: the old bundle moves aside first, so a crash leaves one complete bundle.
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _share(tmp: Path, graphs: dict[str, str], sibling: Path) -> dict[str, dict[str, Any]]:
    """Drop each file of ``tmp`` that ``sibling`` holds byte for byte and return the manifest
    entries naming the sibling's copy; ``graphs`` is updated to match. A graph is shared only
    with the external-data files it reads, so a shared graph never reads a file of its own."""
    theirs = read_manifest(sibling)["files"]
    same = {f.name for f in tmp.iterdir()
            if f.name != "config.json" and f.name in theirs and theirs[f.name]["sha256"] == sha256(f)}
    for file in graphs.values():
        if file in same and not set(external_data_locations((tmp / file).read_bytes())) <= same:
            same.discard(file)
    shared = {}
    for name in sorted(same):
        shared[f"../{sibling.name}/{name}"] = {**theirs[name]}
        (tmp / name).unlink()
    for g, file in graphs.items():
        if file in same:
            graphs[g] = f"../{sibling.name}/{file}"
    return shared


WEIGHTS_LABEL = {"float32": "float32", "float16": "float16 storage, float32 compute",
                 "int8": "int8 matrix products (dynamic quantization), float16 storage elsewhere"}


def _int8_record(quantized: dict[str, int]) -> dict[str, Any]:
    """What ``quantize_int8`` did, for the manifest."""
    import onnxruntime as ort
    return {"method": "onnxruntime.quantization.quantize_dynamic", "onnxruntime": ort.__version__,
            "weights": "int8, symmetric, one scale per output channel", "activations": "uint8, per tensor, at run time",
            "quantized_nodes": {g: n for g, n in quantized.items() if n}, "check_rtol": INT8_RTOL}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a saved DiGIT model (DiGIT.save directory) to an ONNX bundle.")
    p.add_argument("--model", required=True, help="model directory: config.json + model.safetensors")
    p.add_argument("--out", required=True, help="bundle directory to write, e.g. exported/fmnist")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                   help="float16: round the weights and store them in half the bytes (compute stays float32); "
                        "int8: also quantize the transformers' matrix products to int8 (CPU speed, a quarter of the bytes)")
    p.add_argument("--share-with", default=None,
                   help="a sibling bundle (e.g. exported/fmnist): files identical to its own are listed, not copied")
    a = p.parse_args(argv)
    path = export_bundle(DiGIT.load(a.model), a.out, opset=a.opset, check=not a.no_check, weights=a.weights,
                         share_with=a.share_with)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
