"""The trainer every stage uses: run directory, DDP, optimiser and schedule,
bf16 autocast, EMA, progress and metrics logs, atomic safetensors checkpoints, resume.

A stage script reads top to bottom::

    cfg = parse_config(Stage1TrainConfig)          # file (JSON/YAML) + --key=value overrides
    tr = Trainer(cfg)                         # run dir, DDP (or one process), logs, seeds
    model = tr.add("model", GPT(...))         # DDP-wrapped, with its own AdamW (+ EMA)
    tr.resume()                               # continue from <run>/checkpoint.safetensors
    data = tr.batches(dataset)                # resumable, sharded across ranks
    for step in tr.loop():                    # tqdm; checkpoints every ckpt_every steps
        loss = ...; tr.step(loss); tr.log(loss=loss, samples=B)

The same script runs as one CPU process and under ``torchrun --nproc_per_node=N`` (gloo on CPU,
NCCL on GPU). Our files never need pickle: checkpoints are one safetensors file each, whose
metadata header holds the non-tensor state as JSON, replaced atomically (``training.checkpoint``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from digit_core.config import ConfigError
from training.checkpoint import CHECKPOINT, check_resumed, read_checkpoint, restore_rng, rng_state, write_checkpoint
from training.config import RunConfig, TrainConfig
from training.dist import ResumableSampler, all_gather, barrier, init_dist
from training.ema import EMA
from training.files import IDENTITY_FIELDS, as_json, atomic_save, data_identity


# -- the trainer -------------------------------------------------------------------------------------
class Trainer:
    """Run dir, logs, DDP-wrapped modules with their optimisers and EMAs, checkpoints, the step loop."""

    def __init__(self, cfg: TrainConfig | RunConfig) -> None:
        self.cfg, self.d = cfg, init_dist(cfg.device)
        self.run_dir = Path(cfg.root) / cfg.stage
        self.device, self.step = self.d.device, 0
        self.modules: dict[str, nn.Module] = {}     # unwrapped
        self.wrapped: dict[str, nn.Module] = {}     # what forward is called on (DDP or the module)
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.lrs: dict[str, float] = {}
        self.emas: dict[str, EMA] = {}
        self._window: dict[str, list[float]] = {}
        self._counts = {"samples": 0, "tokens": 0}
        self._t_log = time.perf_counter()
        random.seed(cfg.seed + self.d.rank)
        np.random.seed(cfg.seed + self.d.rank)
        torch.manual_seed(cfg.seed + self.d.rank)
        self.log_file = logging.getLogger(f"digit.{cfg.stage}")
        self.log_file.setLevel(logging.INFO)
        self.tb: Any = None            # opened at the first record: --fresh may remove the old logs first
        # What this run's products are made from; checkpoints and artifacts record it, and a
        # checkpoint is resumed only by a run with the same record (see verify).
        self.provenance: dict[str, Any] = {"config": {k: getattr(cfg, k) for k in IDENTITY_FIELDS if hasattr(cfg, k)},
                                           "inputs": {}}
        self._resumed: dict[str, Any] | None = None   # the metadata of the checkpoint resume() loaded
        self._verified = False
        if self.d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for h in list(self.log_file.handlers):   # a second run in this process logs to its own dir
                self.log_file.removeHandler(h)
                h.close()
            h = logging.FileHandler(self.run_dir / "train.log")
            h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.log_file.addHandler(h)
        barrier()
        self.info(f"{cfg.stage}: rank {self.d.rank}/{self.d.world} on {self.device}, run dir {self.run_dir}")

    # -- messages --------------------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if self.d.main:
            tqdm.write(msg)
            self.log_file.info(msg)

    def record(self, **metrics: Any) -> None:
        """Write one line of metrics.jsonl (and TensorBoard) at the current step."""
        if not self.d.main:
            return
        row = {"step": self.step, "time": round(time.time(), 3)} | {k: _plain(v) for k, v in metrics.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # TensorBoard is optional; metrics.jsonl always exists
                self.tb = False
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, self.step)

    # -- modules ----------------------------------------------------------------------------------------
    def add(self, name: str, module: nn.Module, train: bool = True, lr: float | None = None,
            ema: float | None = None) -> nn.Module:
        """Register ``module`` on the device; when ``train``, give it AdamW (decay on matrices only,
        as GPT-2) and DDP. Returns what to call forward on."""
        cfg = self.cfg
        module = module.to(self.device)
        self.modules[name] = module
        if not train:
            self.wrapped[name] = module.eval().requires_grad_(False)
            return module
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optims[name] = torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.lrs[name] = lr or cfg.lr
        if (cfg.ema if ema is None else ema) > 0:
            self.emas[name] = EMA(module)
        wrapped = module
        if self.d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.wrapped[name] = wrapped
        return wrapped

    def depends(self, **inputs: str) -> None:
        """Record input files by name -> sha256 (an encoder, a codebook): part of the provenance."""
        self.provenance["inputs"].update(inputs)

    def verify(self, data: Dataset | None = None) -> None:
        """Complete the provenance with ``data``'s identity and hold a resumed checkpoint to it:
        a checkpoint made from other data, input files or identity fields is refused (StaleRunError
        saying what changed and how to start over), as is one with no record unless
        ``resume_unverified``. Then ``train_config.json`` is written: only a run whose record
        holds may claim the run directory. ``batches`` and ``loop`` call this."""
        if self._verified:
            return
        if data is not None:
            self.provenance["data"] = data_identity(data)
        self.provenance = as_json(self.provenance)
        if self._resumed is not None:
            check_resumed(self.run_dir / CHECKPOINT, self._resumed, self.provenance, self.cfg, self.info)
        self._write_config()
        self._verified = True

    def _write_config(self) -> None:
        if self.d.main:
            (self.run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def lr_at(self, step: int, peak: float) -> float:
        c = self.cfg
        w = max(c.warmup, 1)
        if step < w:
            return peak * (step + 1) / w
        if c.schedule == "inverse_sqrt":
            return peak * math.sqrt(w / (step + 1))
        if c.schedule == "cosine":
            t = min(1.0, (step - w) / max(1, c.steps - w))
            return c.min_lr + 0.5 * (peak - c.min_lr) * (1 + math.cos(math.pi * t))
        if c.schedule == "constant":
            return peak
        raise ConfigError(f"unknown schedule {c.schedule!r}")

    def step_optim(self, loss: torch.Tensor, name: str = "model", ema_decay: float | None = None) -> float:
        """Backward, clip, AdamW step with the scheduled lr, EMA update; returns the grad norm."""
        opt, module = self.optims[name], self.modules[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        lr = self.lr_at(self.step, self.lrs[name])
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        if name in self.emas:
            self.emas[name].update(module, self.cfg.ema if ema_decay is None else ema_decay)
        return float(norm)

    # -- data -----------------------------------------------------------------------------------------------
    def batches(self, dataset: Dataset, shuffle: bool = True) -> Iterator[Any]:
        """Endless batches of this rank's shard; starts where ``self.step`` says (after a resume).
        Checks a resumed checkpoint against ``dataset`` first (``verify``)."""
        self.verify(dataset)
        sampler = ResumableSampler(dataset, self.d, self.cfg.seed, shuffle)
        per_epoch = len(sampler) // self.cfg.batch_size
        if per_epoch == 0:
            raise ConfigError(f"{len(dataset)} rows are fewer than one batch of batch_size={self.cfg.batch_size} "
                              f"x {self.d.world} ranks")
        return self._batches(dataset, sampler, per_epoch)

    def _batches(self, dataset: Dataset, sampler: ResumableSampler, per_epoch: int) -> Iterator[Any]:
        epoch, skip = divmod(self.step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            sampler.start = skip * self.cfg.batch_size
            # An explicit generator: creating the iterator must not draw from the global RNG,
            # or a resumed run would diverge from an uninterrupted one.
            loader = DataLoader(dataset, self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                                drop_last=True, pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            for batch in loader:
                yield [b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
            epoch, skip = epoch + 1, 0

    # -- the loop --------------------------------------------------------------------------------------------
    def loop(self) -> Iterator[int]:
        """Steps from the resumed one to ``cfg.steps``; logs, checkpoints every ``ckpt_every`` and at the end."""
        cfg = self.cfg
        self.verify()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.d.main, desc=cfg.stage, dynamic_ncols=True)
        self._t_log = time.perf_counter()
        while self.step < cfg.steps:
            yield self.step
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                bar.set_postfix(self._flush_log(), refresh=False)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Leave what runs inside (evaluation) out of the logged throughput."""
        t = time.perf_counter()
        yield
        self._t_log += time.perf_counter() - t

    def log(self, samples: int = 0, tokens: int = 0, **metrics: float | torch.Tensor) -> None:
        """Accumulate this step's metrics; they are averaged over the logging window."""
        self._counts["samples"] += samples * self.d.world
        self._counts["tokens"] += tokens * self.d.world
        for k, v in metrics.items():
            self._window.setdefault(k, []).append(float(v))

    def _flush_log(self) -> dict[str, str]:
        dt = time.perf_counter() - self._t_log
        row: dict[str, float] = {k: sum(v) / len(v) for k, v in self._window.items()}
        if self.optims:
            row["lr"] = self.optims[next(iter(self.optims))].param_groups[0]["lr"]
        for k, n in self._counts.items():
            if n:
                row[f"{k}_per_s"] = n / dt
        self.record(**row)
        self._window.clear()
        self._counts = {"samples": 0, "tokens": 0}
        self._t_log = time.perf_counter()
        return {k: f"{v:.4g}" for k, v in row.items() if k != "lr"}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Modules, EMAs, optimisers, step and every rank's RNG states, in one atomic file."""
        rngs = all_gather(rng_state())
        if self.d.main:
            write_checkpoint(self.run_dir / CHECKPOINT, self.step, self.modules, self.emas, self.optims, rngs,
                             self.provenance, dataclasses.asdict(self.cfg))

    def resume(self) -> bool:
        """Load ``<run>/checkpoint.safetensors`` when there is one; returns whether it did. With
        ``fresh``, delete it and the run's metrics instead. ``verify`` (which ``batches`` and
        ``loop`` call) then refuses the checkpoint if it was made from other data or inputs."""
        path = self.run_dir / CHECKPOINT
        if getattr(self.cfg, "fresh", False):
            if self.d.main:
                for f in (path, self.run_dir / "metrics.jsonl"):
                    f.unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
                self.info(f"--fresh: starting {self.cfg.stage} over (removed its checkpoint and metrics)")
            barrier()
            return False
        if not path.exists():
            return False
        tensors, meta = read_checkpoint(path, self.modules, self.emas, self.optims)
        self._resumed = meta
        if len(meta["rng"]) != self.d.world:
            self.info(f"checkpoint has {len(meta['rng'])} ranks' RNG states, this run {self.d.world}: reseeding")
        else:
            restore_rng(tensors, meta, self.d.rank)
        self.step = meta["step"]
        self.info(f"resumed from {path} at step {self.step}")
        return True

    def eval_module(self, name: str) -> nn.Module:
        """The EMA copy when there is one, else the module, in eval mode."""
        return (self.emas[name].module if name in self.emas else self.modules[name]).eval()

    def final_state(self, name: str) -> dict[str, torch.Tensor]:
        """The weights a stage hands on: the EMA ones when EMA is on."""
        return self.eval_module(name).state_dict()

    def save_artifact(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
        """A stage's product (e.g. ``encoder.safetensors``) beside its checkpoint."""
        path = self.run_dir / f"{name}.safetensors"
        if self.d.main:
            atomic_save(tensors, path, (meta or {}) | {"provenance": self.provenance})
            self.info(f"wrote {path}")
        barrier()
        return path

    def finish(self) -> None:
        if not self._verified:   # a stage without a training loop claims the run dir once it is done
            self._write_config()
        if self.tb:
            self.tb.close()
        if dist.is_initialized():
            self.check_replicas()
            dist.destroy_process_group()

    @torch.no_grad()
    def check_replicas(self) -> None:
        """Fail loudly if DDP replicas drifted apart (they must hold bitwise-equal weights)."""
        sums = {n: [float(p.double().sum()) for p in m.parameters()] for n, m in self.modules.items()}
        gathered = all_gather(sums)
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError("DDP replicas hold different weights")
        self.info(f"all {self.d.world} replicas hold identical weights")


def _plain(v: Any) -> Any:
    return float(v) if torch.is_tensor(v) or isinstance(v, np.floating) else v

