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

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ortc

from .config import ConfigError, DiGITConfig, GPTConfig
from .flows import Flows, StepFn
from .onnx_refs import external_data_locations
from .typecheck import check_dataclass

log = logging.getLogger(__name__)

FORMAT = "digit-bundle"
SUPPORTED_FORMAT_VERSIONS = (3,)   # 2: vq_encoder also returns its latents; 3: stage graphs take per-layer caches, return kv
SUPPORTED_OPSETS = range(13, 22)
MAX_IR_VERSION = 13          # onnxruntime 1.31 reads <= 13 (onnx 1.23 writes 14 unless told)
GRAPHS = ("tokenizer", "vq_encoder", "vq_decoder", "stage1", "stage2")


class BundleError(ValueError):
    """A bundle that is missing, corrupt, or does not fit this runtime."""


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
MAX_JSON_BYTES = 4 << 20    # manifest.json / config.json: ImageNet's 1,000 class names take ~40 KB
SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` for a manifest entry that stays in the bundle: relative, no ``..``, and
    (symlinks resolved) under ``root``; raise BundleError naming the entry otherwise."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise BundleError(f"{root / 'manifest.json'}: {what} {name!r:.80} is not a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise BundleError(f"{root / 'manifest.json'}: {what} {name!r:.80} leaves the bundle (absolute or '..')")
    path = root / rel
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {name} resolves to {real}, outside the bundle (a symlink out of it)")
    return real


def _json(path: Path, raw: bytes) -> Any:
    """Parse a bundle's JSON file, raising BundleError (naming it) for anything but clean UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BundleError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a bundle file") from None


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise BundleError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a bundle file")
    return raw


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check ``manifest.json``: its schema, and that every file it lists stays in the
    bundle and has the listed size. Raise BundleError naming the problem. The sha256 of each file
    is checked by ``read_verified`` on the bytes that are then used."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle (no manifest.json)")
    _inside(path, "manifest.json", "manifest")
    man = _json(mpath, _read_small(mpath))
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a DiGIT bundle manifest (format {man.get('format') if isinstance(man, dict) else None!r:.80})")
    if man.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(f"{mpath}: format_version {man.get('format_version')!r:.80} is not supported by this runtime "
                          f"(reads {list(SUPPORTED_FORMAT_VERSIONS)}); re-export the bundle or update digit_core")
    if type(man.get("opset")) is not int or man["opset"] not in SUPPORTED_OPSETS:
        raise BundleError(f"{mpath}: opset {man.get('opset')!r:.80} outside the supported {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1}")
    if type(man.get("ir_version")) is not int or man["ir_version"] > MAX_IR_VERSION:
        raise BundleError(f"{mpath}: ONNX IR version {man.get('ir_version')!r:.80} is newer than onnxruntime reads "
                          f"(<= {MAX_IR_VERSION})")
    files, graphs = man.get("files"), man.get("graphs")
    if not isinstance(files, dict) or not isinstance(graphs, dict):
        raise BundleError(f"{mpath}: no 'files'/'graphs' tables")
    missing = [g for g in GRAPHS if not isinstance(graphs.get(g), str) or graphs[g] not in files]
    if missing or "config.json" not in files:
        raise BundleError(f"{mpath}: lists no file for {missing or ['config.json']}")
    for name, meta in files.items():
        if not (isinstance(meta, dict) and type(meta.get("size")) is int and meta["size"] >= 0
                and isinstance(meta.get("sha256"), str) and SHA256.fullmatch(meta["sha256"])):
            raise BundleError(f"{mpath}: entry for {name!r:.80} needs an integer 'size' and a hex 'sha256'")
        f = _inside(path, name, "file")
        if not f.is_file():
            raise BundleError(f"{path}: missing file {name}")
        if f.stat().st_size != meta["size"]:
            raise BundleError(f"{path}: file {name} is corrupt (its size differs from manifest.json)")
    return man


def read_verified(path: Path, man: dict[str, Any], name: str) -> bytes:
    """The bytes of the listed file ``name``, read once and checked against the manifest: what is
    hashed is what the caller gets (no gap between checking a file and opening it again)."""
    meta = man["files"][name]
    with open(_inside(Path(path), name, "file"), "rb") as f:
        raw = f.read(meta["size"] + 1)
    if len(raw) != meta["size"] or hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise BundleError(f"{path}: file {name} is corrupt (its size or sha256 differs from manifest.json)")
    return raw


def read_config(path: Path, man: dict[str, Any]) -> DiGITConfig:
    """The bundle's verified ``config.json`` as a checked DiGITConfig, or BundleError naming it."""
    cpath = Path(path) / "config.json"
    if man["files"]["config.json"]["size"] > MAX_JSON_BYTES:   # refused before it is read
        raise BundleError(f"{cpath}: larger than {MAX_JSON_BYTES >> 20} MiB; not a bundle file")
    d = _json(cpath, read_verified(path, man, "config.json"))
    try:
        cfg = DiGITConfig.from_dict(d)
        check_dataclass(cfg)
        return cfg.validate()
    except (ConfigError, TypeError) as err:
        raise BundleError(f"{cpath}: {err}") from None


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
        providers = _providers(device)
        self.sessions = {g: self._session(g, threads, providers) for g in GRAPHS}
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
        c = self.config
        s, n, m, d = c.image_size, c.disc_grid, c.vq_grid, c.codebook.dim

        def step_io(g: GPTConfig, length: int) -> tuple[dict[str, list], dict[str, list]]:
            past = {k: [None, g.n_head, length, g.head_dim] for k in past_names(g.n_layer)}
            return ({"tokens": [None, None], "start": [], **past},
                    {"logits": [None, g.out_vocab], "kv": [g.n_layer, 2, None, g.n_head, None, g.head_dim]})

        want = {
            "tokenizer": ({"images": [None, s, s, 3]}, {"ids": [None, n, n], "dists": [None, n, n], "features": [None, n, n, d]}),
            "vq_encoder": ({"images": [None, s, s, 3]}, {"ids": [None, m, m], "latents": [None, m, m, c.vqgan.embed_dim]}),
            "vq_decoder": ({"ids": [None, m, m]}, {"images": [None, s, s, 3]}),
            "stage1": step_io(c.stage1.gpt, c.stage1_positions),
            "stage2": step_io(c.stage2.gpt, c.stage2_positions),
        }
        for g, (ins, outs) in want.items():
            sess = self.sessions[g]
            have = {a.name: a.shape for a in sess.get_inputs() + sess.get_outputs()}
            for name, shape in {**ins, **outs}.items():
                got = have.get(name)
                ok = got is not None and len(got) == len(shape) and all(
                    w is None or h == w or not isinstance(h, int) for h, w in zip(got, shape))
                if not ok:
                    raise BundleError(f"{self.path}: graph {g} has {name} of shape {got}, but config.json "
                                      f"implies {['*' if w is None else w for w in shape]}")

    # -- backend operations -----------------------------------------------------------------------
    def encode_disc(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        return _step_fn(self.sessions["stage2"], self.config.stage2.gpt, batch, self.config.stage2_positions, self.device)


def past_names(n_layer: int) -> list[str]:
    """The stage graphs' cache inputs, in ``GPT.step``'s order: each layer's keys, then its values."""
    return [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


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
