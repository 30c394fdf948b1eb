"""A trainer's checkpoint: its modules, EMAs, optimisers, step and every rank's RNG states in one
safetensors file whose metadata header holds the non-tensor state as JSON (our files never need
pickle), replaced atomically; and the check that holds a resumed checkpoint to the resuming run."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import RunConfig, TrainConfig
from training.ema import EMA
from training.files import StaleRunError, as_json, atomic_save, differences, load_strict, load_tensors

CHECKPOINT = "checkpoint.safetensors"
RngState = tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]   # torch, CUDA, Python + numpy


def write_checkpoint(path: Path, step: int, modules: dict[str, nn.Module], emas: dict[str, EMA],
                     optims: dict[str, torch.optim.Optimizer], rngs: list[RngState], provenance: dict[str, Any],
                     config: dict[str, Any]) -> None:
    """Modules, EMAs, optimisers (tensors as tensors, the rest in the header), ``step`` and each
    rank's RNG states (``rngs``, by rank), with the run's provenance and config, in one atomic file."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": step, "optims": {}, "rng": [], "provenance": provenance, "config": config}
    for name, m in modules.items():
        tensors |= {f"model.{name}.{k}": v for k, v in m.state_dict().items()}
    for name, e in emas.items():
        tensors |= {f"ema.{name}.{k}": v for k, v in e.module.state_dict().items()}
    for name, opt in optims.items():
        sd = opt.state_dict()
        meta["optims"][name] = {"param_groups": sd["param_groups"], "state": {}}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{name}.{pid}.{k}"] = v
                else:
                    meta["optims"][name]["state"].setdefault(str(pid), {})[k] = v
    for r, (torch_state, cuda_state, rest) in enumerate(rngs):
        tensors[f"rng.{r}.torch"] = torch_state
        if cuda_state is not None:
            tensors[f"rng.{r}.cuda"] = cuda_state
        meta["rng"].append(rest)
    atomic_save(tensors, path, meta)


def read_checkpoint(path: Path, modules: dict[str, nn.Module], emas: dict[str, EMA],
                    optims: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a ``write_checkpoint`` file into ``modules``, ``emas`` and ``optims``; returns its
    tensors and metadata (the step, the RNG states, the record ``check_resumed`` reads)."""
    tensors, meta = load_tensors(path)
    for name, m in modules.items():
        load_strict(m, _sub(tensors, f"model.{name}."), f"{path} (model.{name})")
    for name, e in emas.items():
        load_strict(e.module, _sub(tensors, f"ema.{name}."), f"{path} (ema.{name})")
    for name, opt in optims.items():
        om = meta["optims"][name]
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith(f"optim.{name}."):
                pid, key = k[len(f"optim.{name}."):].split(".", 1)
                state.setdefault(int(pid), {})[key] = v
        for pid, st in om["state"].items():
            state.setdefault(int(pid), {}).update(st)
        opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
    return tensors, meta


def check_resumed(path: Path, resumed: dict[str, Any], provenance: dict[str, Any], cfg: TrainConfig | RunConfig,
                  info: Callable[[str], None]) -> None:
    """Hold the checkpoint at ``path`` (metadata ``resumed``) to this run's ``provenance``: one made
    from other data, input files or identity fields is refused (StaleRunError saying what changed
    and how to start over), as is one with no record unless ``resume_unverified``. Settings that
    may change between a run and its resumption (steps, lr, ...) are only reported, by ``info``."""
    old = resumed.get("provenance")
    start_over = (f"rerun with --fresh to start this stage over (it deletes {path.name} and the metrics), "
                  f"or use another --root")
    if old is None and not getattr(cfg, "resume_unverified", False):
        raise StaleRunError(f"cannot resume {path}: it records no provenance (written before DiGIT Studio "
                            f"recorded what a checkpoint was trained on), so it cannot be checked against "
                            f"this run's data and inputs; {start_over}, or pass --resume_unverified if you "
                            "know it was trained on exactly this run's data and inputs")
    if old is None:
        info(f"resuming {path} without a provenance record (--resume_unverified); from now on it "
             "records this run's")
    else:
        changed = differences({k: old.get(k) for k in provenance}, provenance)
        if changed:
            was = (resumed.get("config") or {}).get("data")
            note = f" (it was trained with data={was!r}, this run has {cfg.data!r})" if was != cfg.data else ""
            raise StaleRunError(f"cannot resume {path}: it was made from other data, inputs or settings than "
                                f"this run{note}: {'; '.join(changed)}. To train on what this run names, "
                                f"{start_over}")
    before = {k: v for k, v in (resumed.get("config") or {}).items()
              if v != as_json(dataclasses.asdict(cfg)).get(k)}
    if before:
        info("resuming with changed settings: " + ", ".join(
            f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in before.items() if hasattr(cfg, k)))


# -- RNG states ------------------------------------------------------------------------------------------
def rng_state() -> RngState:
    """This process's torch, CUDA (None without CUDA), Python and numpy generator states."""
    np_state = np.random.get_state()
    rest = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, rest


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int) -> None:
    """Set this process's generators to rank ``rank``'s states in a checkpoint's ``tensors`` and ``meta``."""
    torch.set_rng_state(tensors[f"rng.{rank}.torch"])
    cuda_state = tensors.get(f"rng.{rank}.cuda")
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    rest = meta["rng"][rank]
    v, state, gauss = rest["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
