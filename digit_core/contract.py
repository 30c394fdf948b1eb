"""The bundle contract: what an exported bundle holds, written once for the exporter and the runtime.

A bundle is a directory of ONNX graphs, ``config.json`` and ``manifest.json`` (every file's
size and sha256). Which graphs it has follows from the config (a VQ-token model has no
tokenizer and no stage 2), and each graph's inputs and outputs, names and shapes, follow from
the config too: ``graph_specs`` states them, ``digit_core.export`` traces each graph with
these names and dynamic axes, and ``digit_core.runtime`` checks the loaded graphs against them.

A manifest may list a file of a sibling bundle (``../fmnist/vq_decoder.onnx``): bundles in one
folder then share identical graphs instead of storing them twice; the shared file is checked
against this manifest's sha256 like any other. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .config import ConfigError, DiGITConfig, GPTConfig
from .typecheck import check_dataclass

FORMAT = "digit-bundle"
# 2: vq_encoder also returns its latents; 3: stage graphs take per-layer caches and return kv;
# 4: the graphs follow the config's kind (a VQ-token bundle has three), files may be a sibling's;
# 5: config.json's sampling.cfg is sampling.cfg_scale (3 and 4 are read with the old key: config.RENAMED_SAMPLING)
FORMAT_VERSION = 5
SUPPORTED_FORMAT_VERSIONS = (3, 4, 5)
SUPPORTED_OPSETS = range(13, 22)
MAX_IR_VERSION = 13          # onnxruntime 1.31 reads <= 13 (onnx 1.23 writes 14 unless told)
MAX_JSON_BYTES = 4 << 20     # manifest.json / config.json: ImageNet's 1,000 class names take ~40 KB
_SHA256_HEX = frozenset("0123456789abcdef")

Dim = int | str
"""A static size, or the name of a dynamic axis (``"N"`` images, ``"B"`` rows, ``"S"`` new tokens)."""


class BundleError(ValueError):
    """A bundle that is missing, corrupt, or does not fit this runtime."""


@dataclass(frozen=True)
class GraphSpec:
    """One graph's interface: input and output names, in order, with their dims."""

    inputs: dict[str, tuple[Dim, ...]]
    outputs: dict[str, tuple[Dim, ...]]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes: every named dim."""
        return {k: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
                for k, dims in {**self.inputs, **self.outputs}.items() if any(isinstance(d, str) for d in dims)}

    def mismatch(self, have: dict[str, list[Any]]) -> str | None:
        """The first input/output whose static dims differ from ``have`` (name -> onnxruntime's
        shape, symbolic dims as strings or None), as a message; None when all fit."""
        for name, dims in {**self.inputs, **self.outputs}.items():
            got = have.get(name)
            ok = got is not None and len(got) == len(dims) and all(
                isinstance(w, str) or h == w or not isinstance(h, int) for h, w in zip(got, dims))
            if not ok:
                return f"{name} of shape {got}, but config.json implies {['*' if isinstance(w, str) else w for w in dims]}"
        return None


def past_names(n_layer: int) -> list[str]:
    """The stage graphs' cache inputs, in ``GPT.step``'s order: each layer's keys, then its values."""
    return [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def _stage_spec(g: GPTConfig, length: int) -> GraphSpec:
    """``(tokens [B, S], start, past_* [B, H, T, hd]) -> (logits [B, V], kv [L, 2, B, H, S, hd])``,
    T = the positions one generation fills."""
    past = {k: ("B", g.n_head, length, g.head_dim) for k in past_names(g.n_layer)}
    return GraphSpec({"tokens": ("B", "S"), "start": (), **past},
                     {"logits": ("B", g.out_vocab), "kv": (g.n_layer, 2, "B", g.n_head, "S", g.head_dim)})


def graph_specs(c: DiGITConfig) -> dict[str, GraphSpec]:
    """The graphs of a bundle of config ``c``, in export order, with their interfaces."""
    s, n, m = c.image_size, c.disc_grid, c.vq_grid
    specs = {}
    if not c.is_vq:
        specs["tokenizer"] = GraphSpec({"images": ("N", s, s, 3)},
                                       {"ids": ("N", n, n), "dists": ("N", n, n), "features": ("N", n, n, c.codebook.dim)})
    specs["vq_encoder"] = GraphSpec({"images": ("N", s, s, 3)}, {"ids": ("N", m, m), "latents": ("N", m, m, c.vqgan.embed_dim)})
    specs["vq_decoder"] = GraphSpec({"ids": ("N", m, m)}, {"images": ("N", s, s, 3)})
    specs["stage1"] = _stage_spec(c.stage1.gpt, c.stage1_positions)
    if not c.is_vq:
        specs["stage2"] = _stage_spec(c.stage2.gpt, c.stage2_positions)
    return specs


# -- files ------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate(root: Path, name: Any, what: str) -> Path:
    """The file a manifest entry names: ``root / name`` for a relative name with no ``..``, or
    ``root/../<sibling>/<file>`` for a sibling bundle's file (``../<sibling>/...``, nothing else
    upwards); symlinks resolved, it must stay in that bundle. Raise BundleError naming the entry."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise BundleError(f"{root / 'manifest.json'}: {what} {name!r:.80} is not a file name")
    rel = PurePosixPath(name)
    parts = rel.parts
    base = root
    if parts and parts[0] == "..":   # a sibling's: ../<sibling>/<file ...>
        if len(parts) < 3 or parts[1] in ("..", "."):
            raise BundleError(f"{root / 'manifest.json'}: {what} {name!r:.80} leaves the bundle (only ../<sibling>/<file> may)")
        base, rel = root.parent / parts[1], PurePosixPath(*parts[2:])
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise BundleError(f"{root / 'manifest.json'}: {what} {name!r:.80} leaves the bundle (absolute or '..')")
    real = (base / rel).resolve()
    if not real.is_relative_to(base.resolve()):
        raise BundleError(f"{root}: {name} resolves to {real}, outside the bundle {base.name} (a symlink out of it)")
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
    bundle (or a sibling) and has the listed size. Raise BundleError naming the problem. The
    sha256 of each file is checked by ``read_verified`` on the bytes that are then used; which
    graphs must be there, by ``check_graph_list`` once the config is read."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle (no manifest.json)")
    locate(path, "manifest.json", "manifest")
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
    if "config.json" not in files:
        raise BundleError(f"{mpath}: lists no file for ['config.json']")
    unlisted = sorted(g for g, f in graphs.items() if not isinstance(f, str) or f not in files)
    if unlisted:
        raise BundleError(f"{mpath}: lists no file for {unlisted}")
    for name, meta in files.items():
        if not (isinstance(meta, dict) and type(meta.get("size")) is int and meta["size"] >= 0
                and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64 and set(meta["sha256"]) <= _SHA256_HEX):
            raise BundleError(f"{mpath}: entry for {name!r:.80} needs an integer 'size' and a hex 'sha256'")
        f = locate(path, name, "file")
        if not f.is_file():
            shared = " (a file of a sibling bundle: keep the bundles side by side)" if name.startswith("../") else ""
            raise BundleError(f"{path}: missing file {name}{shared}")
        if f.stat().st_size != meta["size"]:
            raise BundleError(f"{path}: file {name} is corrupt (its size differs from manifest.json)")
    return man


def check_graph_list(path: Path, man: dict[str, Any], cfg: DiGITConfig) -> None:
    """The manifest lists exactly the graphs a bundle of ``cfg`` has."""
    want, have = list(graph_specs(cfg)), sorted(man["graphs"])
    missing = [g for g in want if g not in man["graphs"]]
    if missing:
        raise BundleError(f"{Path(path) / 'manifest.json'}: lists no file for {missing}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise BundleError(f"{Path(path) / 'manifest.json'}: lists graphs {extra}, which a "
                          f"{'VQ-token' if cfg.is_vq else 'DiGIT'} model has none of")


def read_verified(path: Path, man: dict[str, Any], name: str) -> bytes:
    """The bytes of the listed file ``name``, read once and checked against the manifest: what is
    hashed is what the caller gets (no gap between checking a file and opening it again)."""
    meta = man["files"][name]
    with open(locate(Path(path), name, "file"), "rb") as f:
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


def manifest(cfg: DiGITConfig, folder: Path, graphs: dict[str, str], shared: dict[str, dict[str, Any]],
             **fields: Any) -> dict[str, Any]:
    """The manifest of the bundle being written in ``folder``: every file there hashed, plus the
    ``shared`` entries (a sibling's files, already hashed); ``fields`` adds producer records."""
    s1 = cfg.stage1
    special: dict[str, Any] = {"stage1": {"bos": s1.bos_id, "null_class": s1.null_class_id,
                                          "class_offset": s1.class_offset, "code_offset": s1.code_offset}}
    if not cfg.is_vq:
        special["stage2"] = {"sep": cfg.stage2.sep_id, "vq_offset": cfg.stage2.vq_offset, "disc_offset": cfg.stage2.disc_offset}
    files = {f.name: {"sha256": sha256(f), "size": f.stat().st_size} for f in sorted(folder.iterdir())}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": cfg.name, "tokens": cfg.tokens,
        "image_size": cfg.image_size, "channels": cfg.channels, "disc_grid": cfg.disc_grid, "vq_grid": cfg.vq_grid,
        "codebook_size": cfg.stage1_vocab, "vq_vocab": cfg.vqgan.n_embed, "num_classes": s1.num_classes,
        "special_ids": special, "class_names": list(cfg.class_names), "sampling": cfg.to_dict()["sampling"],
        **fields, "config": cfg.to_dict(), "graphs": graphs, "files": dict(sorted({**files, **shared}.items())),
    }
