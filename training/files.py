"""Our files: atomic writes (temp file + rename), safetensors with a JSON metadata header, and
the provenance keys (data identity, file digests) that caches and checkpoints are checked against."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from digit_core.config import ConfigError


# -- files -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to, renamed onto ``path`` when the block ends and
    removed when it raises: an error or a kill leaves the old file (or none), never half a new
    one. The temp name is hidden and ends in ``.tmp``, so globs for the real files skip it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # the pid: concurrent writers never share one
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` written to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """A safetensors file with ``meta`` as its JSON header, written atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"json": json.dumps(meta or {})})


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON metadata of a file ``atomic_save`` wrote."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta   # noqa: SIM118 (safe_open is no mapping)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a file ``atomic_save`` wrote, without reading its tensors."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("json", "{}"))


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)``, strict, after a check whose ConfigError names the
    missing, unexpected and mis-shaped tensors and where ``state`` came from (``source``)."""
    from digit_core.checkpoints import state_mismatch
    bad = state_mismatch(module.state_dict(), state)
    if bad:
        raise ConfigError(f"{source} does not fit this {type(module).__name__}: {bad}")
    module.load_state_dict(state)


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {what} stage first (or set its path)")
    return path


# -- provenance: what produced a checkpoint or a cache -----------------------------------------------
# The config fields that change what a stage trains (beside its data and input files); others,
# such as steps or lr, may change between a run and its resumption.
IDENTITY_FIELDS = ("model", "conditional", "codebook_size", "tokens", "objective")


class StaleRunError(ConfigError):
    """A checkpoint made from other data, input files or settings than the run resuming it."""


def file_digest(path: str | Path) -> str:
    """sha256 of an input file (an upstream stage's product)."""
    from digit_core.contract import sha256
    return sha256(Path(path))


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so records compare equal."""
    return json.loads(json.dumps(value))


def data_identity(dataset: Dataset) -> dict[str, Any]:
    """What a dataset holds, cheaply: rows, classes, how items are made, and a content
    fingerprint (a token cache: every token; Fashion-MNIST: every pixel; an image folder: every
    file's name and size plus the bytes of 16 of them; anything else: 16 of its items)."""
    h, n = hashlib.sha256(), len(dataset)
    picks = np.linspace(0, n - 1, min(n, 16)).astype(int) if n else []
    if hasattr(dataset, "tensors"):   # a token cache (TokenDataset) or a TensorDataset
        for t in dataset.tensors:
            h.update(t.contiguous().numpy().tobytes())
    elif isinstance(getattr(dataset, "images", None), np.ndarray):
        h.update(dataset.images.tobytes())
        h.update(np.asarray(dataset.targets).tobytes())
    elif hasattr(dataset, "samples") and hasattr(dataset, "root"):
        for path, label in dataset.samples:
            h.update(f"{Path(path).relative_to(dataset.root)}\0{label}\0{os.path.getsize(path)}\n".encode())
        for i in picks:
            h.update(Path(dataset.samples[i][0]).read_bytes())
    else:
        for i in picks:
            h.update(np.ascontiguousarray(np.asarray(dataset[int(i)][0])).tobytes())
    classes = getattr(dataset, "classes", None)
    made = {k: getattr(dataset, k) for k in ("image_size", "pad", "channels", "train", "flip") if hasattr(dataset, k)}
    return as_json({"rows": n, "classes": list(classes) if classes else None, "items": made,
                    "fingerprint": h.hexdigest()[:16]})


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two records differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    if old == new:
        return []
    short = (lambda v: f"{json.dumps(v)[:60]}{'...' if len(json.dumps(v)) > 60 else ''}")
    return [f"{prefix or 'record'}: {short(old)} -> {short(new)}"]
