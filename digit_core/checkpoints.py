"""Loading released PyTorch checkpoints without trusting them: a file that is not a checkpoint
is named as such, and unpickling allows only the globals those files need unless the user
passes ``--trust-pickle``. Used by the converter (``digit_core.convert``)."""
from __future__ import annotations

import argparse
import collections
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ConvertError(ValueError):
    """An input that does not match the official release (or our preset for it)."""


def _safe_globals() -> list[Any]:
    """What fairseq checkpoints pickle besides tensors: the legacy argparse ``args`` and numpy
    scalars/arrays in the trainer's metrics. All are plain data; nothing here runs code.
    Each numpy global is listed under both the numpy 1.x (``numpy.core``) and 2.x names."""
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: list[Any] = [argparse.Namespace, collections.OrderedDict, np.ndarray, np.dtype]
    for fn in (mod._reconstruct, mod.scalar):
        out += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    out += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}, key=str)  # numpy.dtypes.Float64DType ...
    return out


# The first bytes of a legacy (pre-zip, PyTorch < 1.6) torch.save file: its magic number, pickled.
_LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def check_torch_file(path: Path) -> None:
    """Raise ConvertError "not a PyTorch checkpoint" (naming the file) unless ``path`` is a
    complete torch.save archive: a zip with ``<dir>/data.pkl`` or the legacy pickle format.
    Looks at the container only, before any unpickling."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEADER))
    if not head:
        raise ConvertError(f"{path}: not a PyTorch checkpoint (the file is empty)")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
        except (zipfile.BadZipFile, OSError) as err:
            raise ConvertError(f"{path}: not a PyTorch checkpoint (a truncated or damaged zip archive: {err})") from None
        if not any(f"{n.split('/', 1)[0]}/data.pkl" in names for n in names):
            raise ConvertError(f"{path}: not a PyTorch checkpoint (a zip archive without <dir>/data.pkl)")
    elif head != _LEGACY_HEADER:
        raise ConvertError(f"{path}: not a PyTorch checkpoint (it starts with {head[:8]!r}; torch.save writes a "
                           "zip archive)")


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """``torch.load`` restricted to tensors and the allow-list; ``trust_pickle`` lifts the restriction.
    Files that are not PyTorch checkpoints, or damaged ones, are a ConvertError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_torch_file(path)
    if trust_pickle:
        print(f"WARNING: --trust-pickle: unpickling {path} without restrictions; a malicious file can "
              "execute arbitrary code. Only do this for files from a source you trust.", file=sys.stderr)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        if not refused:   # not the allow-list: the pickle itself is broken
            raise ConvertError(f"{path}: a damaged PyTorch checkpoint ({str(err).splitlines()[0]})") from None
        raise ConvertError(
            f"{path}: refused to unpickle {', '.join(refused)} (not on the allow-list of plain data types). "
            "If you trust this file, rerun with --trust-pickle, which unpickles without restrictions and "
            "can execute arbitrary code.") from None
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError) as err:   # torch's readers on damaged data
        raise ConvertError(f"{path}: a damaged PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def state_mismatch(own: dict[str, Any], state: dict[str, Any]) -> str | None:
    """How a state dict differs from a module's own (missing, unexpected and mis-shaped tensors,
    ten of each at most), or None when it fits: the one check behind every strict load."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    few = (lambda names: f"{names[:10]}{' ...' if len(names) > 10 else ''}")
    return f"missing {few(missing)}, unexpected {few(unexpected)}, shape mismatches (file vs model) {few(shapes)}"
