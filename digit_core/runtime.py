"""The DiGIT flows on an exported bundle, in onnxruntime + numpy: no torch, CPU or CUDA.

    m = load_bundle("exported/fmnist")            # device="auto" | "cpu" | "cuda"
    images = m.sample(class_ids=[0, 3], seed=0)   # uint8 [N, H, W, 3]
    ids, dists, feats = m.tokenize(images)
    more = m.complete(images[0], keep_rows=4, n=4, seed=0)

``Bundle`` is the onnxruntime backend of ``digit_core.flows.Flows``: it only says how to run
each graph; the flows themselves (sampling, guidance, completion, input checks) are the very
code the PyTorch pipeline runs. Loading verifies every file's sha256 and that the graphs fit
the config. Sessions are shared and every call keeps its state (KV caches, IO bindings) in
its own locals, so one Bundle serves concurrent calls from many threads.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ortc

from .config import GPTConfig
from .contract import (BundleError, check_graph_list, graph_specs, past_names, read_config, read_manifest,
                       read_verified)
from .flows import Flows, StepFn
from .onnx_refs import external_data_locations

log = logging.getLogger(__name__)

def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if Path("/dev/nvidia0").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def cuda_available() -> bool:
    """onnxruntime has its CUDA provider and there is a GPU for it."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present()


_ORT_LOAD_ERRORS = (_ortc.Fail, _ortc.InvalidGraph, _ortc.InvalidProtobuf, _ortc.InvalidArgument, _ortc.NotImplemented)


def _providers(device: str) -> list[str]:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not cuda_available():
        if device == "cuda":
            raise RuntimeError("device='cuda' but onnxruntime has no usable CUDA provider and GPU "
                               f"(providers: {ort.get_available_providers()}, GPU present: {gpu_present()})")
        return ["CPUExecutionProvider"]
    if hasattr(ort, "preload_dlls"):   # load the CUDA/cuDNN libraries pip installed, before the sessions
        ort.preload_dlls()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Bundle(Flows):
    """An exported DiGIT model on onnxruntime; the flows (``sample``, ``generate``, ``tokenize``,
    ``complete``) come from ``Flows``."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.config = read_config(self.path, self.manifest)
        check_graph_list(self.path, self.manifest, self.config)
        providers = _providers(device)
        self.sessions = {g: self._session(g, threads, providers) for g in graph_specs(self.config)}
        self.provider = self.sessions["stage1"].get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"device='cuda' but onnxruntime created the sessions on {self.provider}")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self._check_graphs()
        log.info("loaded bundle %s (%s) on %s", self.path, self.config.name, self.provider)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    # -- verification ---------------------------------------------------------------------------
    def _session(self, graph: str, threads: int | None, providers: list[str]) -> ort.InferenceSession:
        """A session built from the verified bytes of the graph and of the external-data files it
        names (each must be listed in the manifest): onnxruntime opens no file itself."""
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        # Each of the five sessions owns a thread pool. Spinning between the ops of one run pays
        # (turning it off cost decoding ~20%), but pools left spinning after a run steal the cores
        # of the next session (VQ decoding ran 2x slower right after stage 2) and of other calls.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        name = self.manifest["graphs"][graph]
        model = read_verified(self.path, self.manifest, name)
        try:
            refs = sorted(external_data_locations(model))
        except ValueError as err:
            raise BundleError(f"{self.path}: {name} is not an ONNX model ({err})") from None
        if refs:
            base = PurePosixPath(name).parent
            listed = {r: str(base / r) for r in refs}
            unlisted = [r for r, f in listed.items() if f not in self.manifest["files"]]
            if unlisted:
                raise BundleError(f"{self.path}: {name} stores tensors in {unlisted}, which manifest.json does not list")
            data = [np.frombuffer(read_verified(self.path, self.manifest, f), np.uint8) for f in listed.values()]
            opts.add_external_initializers_from_files_in_memory(refs, data, [len(d) for d in data])
        try:
            return ort.InferenceSession(model, opts, providers=providers)
        except _ORT_LOAD_ERRORS as err:
            raise BundleError(f"{self.path}: onnxruntime cannot load {name} ({err})") from None

    def _check_graphs(self) -> None:
        """Every graph's static input/output dims equal what the config says; raise naming the graph."""
        for g, spec in graph_specs(self.config).items():
            sess = self.sessions[g]
            bad = spec.mismatch({a.name: a.shape for a in sess.get_inputs() + sess.get_outputs()})
            if bad:
                raise BundleError(f"{self.path}: graph {g} has {bad}")

    # -- backend operations -----------------------------------------------------------------------
    def encode_disc(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.check_disc("tokenize")
        ids, dists, feats = self.sessions["tokenizer"].run(None, {"images": images})
        return ids, dists, feats

    def encode_vq(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, latents = self.sessions["vq_encoder"].run(None, {"images": images})
        return ids, latents

    def decode_vq(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["vq_decoder"].run(None, {"ids": np.ascontiguousarray(ids, dtype=np.int64)})[0]

    def open_stage1(self, batch: int) -> StepFn:
        return _step_fn(self.sessions["stage1"], self.config.stage1.gpt, batch, self.config.stage1_positions, self.device)

    def open_stage2(self, batch: int) -> StepFn:
        self.check_disc("run stage 2")
        return _step_fn(self.sessions["stage2"], self.config.stage2.gpt, batch, self.config.stage2_positions, self.device)


def _step_fn(sess: ort.InferenceSession, g: GPTConfig, batch: int, length: int, device: str) -> StepFn:
    """A step function with its own KV cache: one numpy array ``[L, 2, batch, H, length, hd]``.

    Each layer's keys and values are bound once as graph inputs that view the array (no copy),
    and after each step the graph's ``kv`` (this chunk's keys and values) is written into it at
    positions ``start ..``: per token, only the attention reads the cache, as in PyTorch's
    in-place forward. The cache lives in host memory on both devices; on CUDA onnxruntime copies
    the bound inputs to the GPU on every step (the CUDA provider has not run on a GPU yet).
    """
    # Zeros, not garbage: masked positions still enter att @ v, and 0 * NaN would poison it.
    cache = np.zeros((g.n_layer, 2, batch, g.n_head, length, g.head_dim), np.float32)
    io = sess.io_binding()
    for i, name in enumerate(past_names(g.n_layer)):
        io.bind_cpu_input(name, cache[i // 2, i % 2])

    def step(tokens: np.ndarray, start: int) -> np.ndarray:
        tok, pos = np.ascontiguousarray(tokens, dtype=np.int64), np.array(start, dtype=np.int64)  # alive until run ends
        io.bind_cpu_input("tokens", tok)
        io.bind_cpu_input("start", pos)
        for name in ("logits", "kv"):   # fresh outputs: their shapes change with the chunk and the batch
            io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        logits, kv = io.get_outputs()
        cache[:, :, :, :, start:start + tok.shape[1]] = kv.numpy()
        return logits.numpy().copy()   # our own array, whatever onnxruntime does with its buffers

    return step


def load_bundle(path: str | Path, device: str = "auto", threads: int | None = None) -> Bundle:
    """Open an exported bundle; ``device="auto"`` takes CUDA when onnxruntime and a GPU both have it."""
    return Bundle(path, device=device, threads=threads)
