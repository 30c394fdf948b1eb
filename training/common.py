"""Shared training machinery, written once: config, run directory, DDP, optimiser and schedule,
bf16 autocast, EMA, progress and metrics logs, atomic safetensors checkpoints, resume.

A stage script reads top to bottom::

    cfg = parse_config(Stage1Config)          # file (JSON/YAML) + --key=value overrides
    tr = Trainer(cfg)                         # run dir, DDP (or one process), logs, seeds
    model = tr.add("model", GPT(...))         # DDP-wrapped, with its own AdamW (+ EMA)
    tr.resume()                               # continue from <run>/checkpoint.safetensors
    data = tr.batches(dataset)                # resumable, sharded across ranks
    for step in tr.loop():                    # tqdm; checkpoints every ckpt_every steps
        loss = ...; tr.step(loss); tr.log(loss=loss, samples=B)

The same script runs as one CPU process and under ``torchrun --nproc_per_node=N`` (gloo on CPU,
NCCL on GPU). Our files never need pickle: checkpoints are one safetensors file each, whose
metadata header holds the non-tensor state as JSON, replaced atomically (temp file + os.replace).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from digit_core.config import FAIRSEQ_SPECIALS, PRESETS, ConfigError, DiGITConfig, fairseq_layout, our_layout, preset
from digit_core.pipeline import output_to_images, to_channels
from digit_core.typecheck import check_value

CHECKPOINT = "checkpoint.safetensors"
STAGES = ("ssl", "features", "kmeans", "vqgan", "stage1", "stage2", "assemble")


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Fields every stage shares; these may sit at the top level of a config file."""

    root: str = "runs/exp"         # experiment directory; stage X writes <root>/X
    model: str = "tiny"            # preset name (tiny, fmnist, ...) or a DiGIT config.json
    data: str = ""                 # an image folder (<class>/<image>) or "fmnist"
    seed: int = 0
    device: str = "auto"           # auto = this rank's GPU when there is one, else CPU
    batch_size: int = 64           # per process
    workers: int = 2               # data-loader processes per rank
    bf16: bool = True              # bf16 autocast (CPU too: avx512-bf16/AMX matmuls are ~3-8x faster)
    conditional: bool = True       # class-conditional stage 1 (with label dropout for CFG) or not
    codebook_size: int = 0         # K-Means K; 0 = the model config's

    def input(self, value: str, default: str) -> Path:
        """An upstream file: ``value`` when set, else ``<root>/<default>``."""
        return Path(value) if value else Path(self.root) / default


@dataclass
class TrainConfig(RunConfig):
    """Fields of the stages that train a network."""

    steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 0.0            # floor of the cosine schedule
    schedule: str = "inverse_sqrt"  # inverse_sqrt (fairseq, the paper) | cosine | constant
    warmup: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0         # 0 = off
    ema: float = 0.0               # EMA decay of the weights; 0 = off
    ckpt_every: int = 500
    log_every: int = 20
    fresh: bool = False            # start over: delete this stage's checkpoint and metrics instead of resuming
    resume_unverified: bool = False  # resume a checkpoint that records no provenance (written before it was recorded)


# -- values: types from the hints, ranges and choices declared here ----------------------------------
Rule = tuple[Callable[[Any], bool], str]   # (accepts the value, the allowed values in words)


def at_least(low: float) -> Rule:
    return (lambda v: v >= low), f">= {low}"


def above(low: float) -> Rule:
    return (lambda v: v > low), f"> {low}"


def fraction(upper_open: bool = False) -> Rule:
    return ((lambda v: 0 <= v < 1), "in [0, 1)") if upper_open else ((lambda v: 0 <= v <= 1), "in [0, 1]")


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _data_spec(spec: str) -> bool:
    """An image folder that exists, or ``fmnist[:split][@DIR]`` (DIR must exist); "" is unset."""
    from digit_core.data import FMNIST_SPLITS
    if not spec:
        return True
    if spec.startswith("fmnist"):
        name, at, root = spec.partition("@")
        split = name.partition(":")[2] or "train"
        return name.partition(":")[0] == "fmnist" and split in FMNIST_SPLITS and (not at or Path(root).is_dir())
    return Path(spec).is_dir()


DATA_RULE: Rule = (_data_spec, "an existing image folder (<class>/<image> files) or fmnist[:train|fit|val|test][@DIR]")
# Constraints by field name: every config class that has the field gets its rule, the stages'
# own (SSLConfig included) as well as the shared ones. A class may add ``rules: ClassVar[dict]``.
RULES: dict[str, Rule] = {
    "data": DATA_RULE, "val_data": DATA_RULE,
    "model": (lambda v: v in PRESETS or (v.endswith(".json") and Path(v).is_file()),
              f"a preset ({', '.join(PRESETS)}) or an existing config.json"),
    "device": one_of("auto", "cpu", "cuda"),
    "batch_size": at_least(1), "workers": at_least(0), "codebook_size": at_least(0),
    "steps": at_least(1), "lr": above(0), "min_lr": at_least(0), "warmup": at_least(0),
    "schedule": one_of("inverse_sqrt", "cosine", "constant"),
    "weight_decay": at_least(0), "beta1": fraction(upper_open=True), "beta2": fraction(upper_open=True),
    "grad_clip": at_least(0), "ema": fraction(upper_open=True),
    "ckpt_every": at_least(1), "log_every": at_least(1), "eval_every": at_least(1), "eval_batches": at_least(1),
    "eval_images": at_least(1), "probe_every": at_least(0), "label_smoothing": fraction(upper_open=True),
    "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"), "heldout_fraction": fraction(), "patches_per_image": at_least(0),
    "dtype": one_of("float16", "float32"), "niter": at_least(1), "max_points_per_centroid": at_least(1),
    "perceptual": one_of("random", "encoder", "none"), "adv_start": at_least(0), "reset_every": at_least(0),
    "disc_width": at_least(4),
}


def _coerce(text: str, hint: Any, key: str) -> Any:
    """A command-line string (or a string in a config file) as a value of the field's type."""
    try:
        if hint is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if hint in (int, float, str):
            return hint(text)
        return json.loads(text)   # tuples, lists
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(hint, f"JSON for {hint}")
        raise ConfigError(f"{key}: expected {kind}, got {text!r}") from None


def check_field(cls: type, key: str, value: Any) -> Any:
    """``value`` checked against the type hint of ``cls.key`` and the rule for ``key``; a string
    for a non-string field is parsed as on the command line. Raise ConfigError naming the key."""
    hint = typing.get_type_hints(cls)[key]
    if isinstance(value, str) and hint is not str:
        value = _coerce(value, hint, key)
    try:
        value = check_value(value, hint, key)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    accepts, allowed = (RULES | getattr(cls, "rules", {})).get(key, (None, ""))
    if accepts is not None and not accepts(value):
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    return value


def config_help(cls: type) -> str:
    """``--help``: the stage's module docstring, then every field with its default and the
    comment beside it in the dataclass source."""
    import inspect
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                name, _, rest = line.strip().partition(":")
                if "#" in rest and name.isidentifier():
                    comments[name] = rest.partition("#")[2].strip()
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    rows = [f"  --{f.name}={json.dumps(f.default) if isinstance(f.default, (tuple, list)) else f.default}"
            + (f"   # {comments[f.name]}" if f.name in comments else "") for f in dataclasses.fields(cls)]
    return f"{doc}\n\noptions (--config FILE, then --key=value overrides):\n" + "\n".join(rows)


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """``cls`` from ``--config FILE`` (JSON or YAML) then ``--key=value`` overrides, every value
    checked (type, range, choices; see ``check_field``) before any data is touched.

    A file holds shared keys (``RunConfig`` fields) at the top level and stage-specific keys in
    a section named after the stage (``stage1: {steps: ...}``), so one file drives a whole chain.
    Without ``argv`` this is a command line: user errors (ConfigError, a missing file) then end
    the process with one line instead of a traceback.
    """
    if argv is None:
        sys.excepthook = _one_line_user_errors
        argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        sys.exit(0)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            path = a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            if not path:
                raise ConfigError("--config needs a file: --config FILE")
            read = _read_config_file(Path(path), getattr(cls, "stage", ""), fields)
            values.update(read)
            where.update(dict.fromkeys(read, f"{path}: "))
        else:
            rest.append(a)
        i += 1
    for a in rest:
        key, eq, text = a.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if a.startswith("--") and not eq and key in fields and typing.get_type_hints(cls)[key] is bool:
            eq, text = "=", "true"    # --fresh is --fresh=true
        if not a.startswith("--") or not eq:
            raise ConfigError(f"arguments are --key=value, got {a!r}")
        if key not in fields:
            raise ConfigError(f"{cls.__name__} has no field {key!r}; fields: {sorted(fields)}")
        values[key], where[key] = text, ""
    checked = {}
    for k, v in values.items():
        try:
            checked[k] = check_field(cls, k, v)
        except ConfigError as err:
            raise ConfigError(f"{where[k]}{err}") from None
    return cls(**checked)


def _one_line_user_errors(kind: type, err: BaseException, tb: Any) -> None:
    """``sys.excepthook`` of the stage CLIs: a user error (a bad value, a missing file) is one
    line on stderr; anything else keeps its traceback."""
    if issubclass(kind, (ConfigError, FileNotFoundError)):
        print(f"error: {err}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, err, tb)


def _load_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict; ``base: other.yaml`` (relative to the file) is read first and
    this file's keys override it, a stage section key by key, so a variant recipe names only
    what it changes."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} is its own base")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        d = yaml.safe_load(text) or {}
    else:
        d = json.loads(text)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config file holds a mapping, not {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    out = _load_recipe(path.parent / base, seen + (path.resolve(),))
    for k, v in d.items():
        out[k] = (out.get(k) or {}) | v if k in STAGES and isinstance(v, dict) else v
    return out


def _read_config_file(path: Path, stage: str, fields: set[str]) -> dict[str, Any]:
    d = _load_recipe(path)
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in STAGES:
            continue
        if k not in shared:
            raise ConfigError(f"{path}: top-level key {k!r} is not shared ({sorted(shared)}); put it under a stage section")
        out[k] = v
    section = d.get(stage) or {}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"{path}: section {stage!r} has unknown keys {unknown}")
    return out | section


def model_config(cfg: RunConfig, class_names: list[str]) -> DiGITConfig:
    """The DiGIT config of ``cfg.model`` (preset name or config.json path) with the data's classes.

    When the class count differs from the preset's (or ``conditional`` is off: 0 classes), or
    ``codebook_size`` sets another K, the token layout is rebuilt with ``our_layout``, since the
    ids of classes and specials depend on both.
    """
    m = DiGITConfig.load(cfg.model) if cfg.model.endswith(".json") else preset(cfg.model)
    names = list(class_names) if cfg.conditional else []
    K = cfg.codebook_size or m.codebook.size
    if len(names) != m.stage1.num_classes or K != m.codebook.size:
        keep = ("n_layer", "n_head", "d_model", "d_ff")
        gpt1, gpt2 = ({k: getattr(g, k) for k in keep} for g in (m.stage1.gpt, m.stage2.gpt))
        if m.stage1.code_offset == FAIRSEQ_SPECIALS:   # the official layout (ImageNet presets)
            gpt1["max_len"], gpt2["max_len"] = m.stage1.gpt.max_len, m.stage2.gpt.max_len
            m = fairseq_layout(m.name, m.encoder, K, m.vqgan, len(names), gpt1, gpt2, sampling=m.sampling)
        else:
            more = ("pos_offset", "norm_first", "final_norm", "embed_scale", "dropout", "ln_eps")
            gpt1 |= {k: getattr(m.stage1.gpt, k) for k in more}
            gpt2 |= {k: getattr(m.stage2.gpt, k) for k in more}
            m = our_layout(m.name, m.image_size, m.channels, m.encoder, K, m.vqgan, len(names), gpt1, gpt2,
                           sampling=m.sampling)
    m.class_names = names
    return m.validate()


def load_data(cfg: RunConfig, spec: str, train: bool = True) -> tuple[Dataset, DiGITConfig]:
    """The dataset ``spec`` at the model's image size and channels, and the model config with its classes."""
    from digit_core.data import build_dataset
    if not spec:
        raise ConfigError(f"{cfg.stage} needs data: --data=DIR (an image folder) or --data=fmnist")
    base = DiGITConfig.load(cfg.model) if cfg.model.endswith(".json") else preset(cfg.model)
    data = build_dataset(spec, base.image_size, base.channels, train=train)
    return data, model_config(cfg, data.classes)


def test_split(spec: str) -> str | None:
    """The held-out counterpart of a data spec: Fashion-MNIST's test files (same root); an image
    folder has none."""
    if not spec.startswith("fmnist"):
        return None
    root = spec.partition("@")[2]
    return "fmnist:test" + (f"@{root}" if root else "")


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """Float ``[N, C, S, S]`` in [0, 1] (a dataset batch) -> the uint8 ``[N, S, S, 3]`` a bundle takes."""
    return output_to_images(x).numpy()


# -- distributed ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str = "auto") -> Dist:
    """One process, or the process group torchrun describes in its environment variables."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU here; use device=auto or device=cpu")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif world > 1:  # ranks on one host share its cores; oversubscription makes all of them slow
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, dev)


def all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """DistributedSampler that starts ``start`` samples into its epoch (a resume skips the
    batches already seen without loading them) and yields ``(index, seed)``: the per-sample
    augmentation seed depends on (run seed, epoch, index) only."""

    def __init__(self, dataset: Dataset, d: Dist, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=d.world, rank=d.rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in list(super().__iter__())[self.start:]:
            yield i, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i


# -- files -----------------------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` written to a temp name then renamed: a kill leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """safetensors file written to a temp name then renamed: a kill leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"json": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON metadata of a file ``atomic_save`` wrote."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a file ``atomic_save`` wrote, without reading its tensors."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("json", "{}"))


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
    from digit_core.runtime import sha256
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
    if isinstance(dataset, TokenDataset):
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


# -- EMA -----------------------------------------------------------------------------------------------
class EMA:
    """An exponential moving average copy of a module's parameters (buffers are copied)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


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
            path, old = self.run_dir / CHECKPOINT, self._resumed.get("provenance")
            start_over = (f"rerun with --fresh to start this stage over (it deletes {path.name} and the metrics), "
                          f"or use another --root")
            if old is None and not getattr(self.cfg, "resume_unverified", False):
                raise StaleRunError(f"cannot resume {path}: it records no provenance (written before DiGIT Studio "
                                    f"recorded what a checkpoint was trained on), so it cannot be checked against "
                                    f"this run's data and inputs; {start_over}, or pass --resume_unverified if you "
                                    "know it was trained on exactly this run's data and inputs")
            if old is None:
                self.info(f"resuming {path} without a provenance record (--resume_unverified); from now on it "
                          "records this run's")
            else:
                changed = differences({k: old.get(k) for k in self.provenance}, self.provenance)
                if changed:
                    was = (self._resumed.get("config") or {}).get("data")
                    note = f" (it was trained with data={was!r}, this run has {self.cfg.data!r})" if was != self.cfg.data else ""
                    raise StaleRunError(f"cannot resume {path}: it was made from other data, inputs or settings than "
                                        f"this run{note}: {'; '.join(changed)}. To train on what this run names, "
                                        f"{start_over}")
            before = {k: v for k, v in (self._resumed.get("config") or {}).items()
                      if v != as_json(dataclasses.asdict(self.cfg)).get(k)}
            if before:
                self.info("resuming with changed settings: " + ", ".join(
                    f"{k} {v!r} -> {getattr(self.cfg, k)!r}" for k, v in before.items() if hasattr(self.cfg, k)))
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
        rngs = all_gather(_rng_state())
        if not self.d.main:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"step": self.step, "optims": {}, "rng": [], "provenance": self.provenance,
                                "config": dataclasses.asdict(self.cfg)}
        for name, m in self.modules.items():
            tensors |= {f"model.{name}.{k}": v for k, v in m.state_dict().items()}
        for name, e in self.emas.items():
            tensors |= {f"ema.{name}.{k}": v for k, v in e.module.state_dict().items()}
        for name, opt in self.optims.items():
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
        atomic_save(tensors, self.run_dir / CHECKPOINT, meta)

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
        tensors, meta = load_tensors(path)
        self._resumed = meta
        for name, m in self.modules.items():
            m.load_state_dict(_sub(tensors, f"model.{name}."))
        for name, e in self.emas.items():
            e.module.load_state_dict(_sub(tensors, f"ema.{name}."))
        for name, opt in self.optims.items():
            om = meta["optims"][name]
            state: dict[int, dict[str, Any]] = {}
            for k, v in tensors.items():
                if k.startswith(f"optim.{name}."):
                    pid, key = k[len(f"optim.{name}."):].split(".", 1)
                    state.setdefault(int(pid), {})[key] = v
            for pid, st in om["state"].items():
                state.setdefault(int(pid), {}).update(st)
            opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
        if len(meta["rng"]) != self.d.world:
            self.info(f"checkpoint has {len(meta['rng'])} ranks' RNG states, this run {self.d.world}: reseeding")
        else:
            r = self.d.rank
            _set_rng_state(tensors[f"rng.{r}.torch"], tensors.get(f"rng.{r}.cuda"), meta["rng"][r])
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


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _plain(v: Any) -> Any:
    return float(v) if torch.is_tensor(v) or isinstance(v, np.floating) else v


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    np_state = np.random.get_state()
    rest = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, rest


def _set_rng_state(torch_state: torch.Tensor, cuda_state: torch.Tensor | None, rest: dict[str, Any]) -> None:
    torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    v, state, gauss = rest["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- trained parts and token caches (the stages hand these to each other) -----------------------------
def load_encoder(cfg: DiGITConfig, path: str | Path) -> nn.Module:
    """Our Encoder with the weights the ssl stage wrote (frozen, eval)."""
    from digit_core.encoders import Encoder
    enc = Encoder(cfg.encoder)
    enc.load_state_dict(load_tensors(require(Path(path), "ssl"))[0])
    return enc.eval().requires_grad_(False)


def load_codebook(path: str | Path) -> nn.Module:
    from digit_core.codebook import Codebook
    return Codebook.load(require(Path(path), "kmeans"))


def load_vqgan(cfg: DiGITConfig, path: str | Path) -> nn.Module:
    from digit_core.vqgan import VQGAN
    vq = VQGAN(cfg.vqgan)
    vq.load_state_dict(load_tensors(require(Path(path), "vqgan"))[0])
    return vq.eval().requires_grad_(False)


class TokenDataset(Dataset):
    """Rows of equal-length tensors (a token cache); keys may carry a sampler seed, ignored."""

    def __init__(self, tensors: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        self.tensors = [tensors[k] for k in keys]

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, key: int | tuple[int, int]) -> list[torch.Tensor]:
        i = key[0] if isinstance(key, tuple) else key
        return [t[i].long() for t in self.tensors]


@dataclass
class Tokenizer:
    """A frozen tokenizer: ``fn(images [B, C, H, W] in [0, 1]) -> ids [B, ...]`` and what
    identifies it (its files' sha256 and its config), which keys the token caches."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    identity: dict[str, Any]


@torch.no_grad()
def token_cache(tr: Trainer, dataset: Dataset, name: str, tokenizers: dict[str, Tokenizer], flip: bool) -> dict[str, torch.Tensor]:
    """Tokenize ``dataset`` once (and its mirror images when ``flip``) into ``<run>/<name>.safetensors``.

    Each rank tokenizes a strided shard and writes it; rank 0 merges. Rows: ``label`` plus one
    per key of ``tokenizers``. Runs in fp32, as the exported tokenizer does, so the training
    tokens are the app's tokens. The cache (and each shard) records its key - the data's
    identity, the tokenizers' and ``flip`` - and is rebuilt when this run's key differs.
    """
    key = as_json({"data": data_identity(dataset), "tokenizers": {k: t.identity for k, t in tokenizers.items()},
                   "flip": flip})
    path = tr.run_dir / f"{name}.safetensors"
    if path.exists():
        old = read_meta(path).get("key")
        if old == key:
            return load_tensors(path)[0]
        tr.info(f"{path} was made from other data or tokenizers "
                f"({'; '.join(differences(old, key)) if old else 'it records none'}): rebuilding it")
    r, w = tr.d.rank, tr.d.world
    shard = tr.run_dir / f"{name}.rank{r}-of-{w}.safetensors"
    if not shard.exists() or read_meta(shard).get("key") != key:
        loader = DataLoader(torch.utils.data.Subset(dataset, range(r, len(dataset), w)), tr.cfg.batch_size,
                            num_workers=tr.cfg.workers)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("label", *tokenizers)}
        for x, y in tqdm(loader, desc=f"tokenize {name}", disable=not tr.d.main, dynamic_ncols=True):
            x = x.to(tr.device)
            for v in ((x, x.flip(-1)) if flip else (x,)):
                out["label"].append(y)
                for k, t in tokenizers.items():
                    ids = t.fn(v).flatten(1).cpu()
                    out[k].append(ids.to(torch.int16 if ids.max() < 2 ** 15 else torch.int32))
        atomic_save({k: torch.cat(v) for k, v in out.items()}, shard, {"key": key})
    barrier()
    if tr.d.main:
        parts = [tr.run_dir / f"{name}.rank{i}-of-{w}.safetensors" for i in range(w)]
        loaded = [load_tensors(p)[0] for p in parts]
        atomic_save({k: torch.cat([t[k] for t in loaded]) for k in loaded[0]}, path, {"key": key})
        for p in parts:
            p.unlink()
        skipped = getattr(dataset, "skipped", 0)
        tr.info(f"tokenized {len(dataset)} images{' and their mirror images' if flip else ''} into {path}"
                + (f"; skipped {skipped} unreadable files" if skipped else ""))
    barrier()
    return load_tensors(path)[0]


def disc_tokenizer(tr: Trainer, mcfg: DiGITConfig, encoder_path: str | Path, codebook_path: str | Path) -> Tokenizer:
    """The frozen encoder + codebook's cluster ids; records both files in the run's provenance."""
    encoder = load_encoder(mcfg, encoder_path).to(tr.device)
    codebook = load_codebook(codebook_path).to(tr.device)
    files = {"encoder": file_digest(encoder_path), "codebook": file_digest(codebook_path)}
    tr.depends(**files)
    return Tokenizer(lambda x: codebook.assign(encoder.features(to_channels(x, mcfg.encoder.in_chans)))[0],
                     files | {"encoder_config": dataclasses.asdict(mcfg.encoder)})


def vq_tokenizer(tr: Trainer, mcfg: DiGITConfig, path: str | Path) -> Tokenizer:
    """The frozen VQGAN encoder's ids; records its file in the run's provenance."""
    vqgan = load_vqgan(mcfg, path).to(tr.device)
    files = {"vqgan": file_digest(path)}
    tr.depends(**files)
    return Tokenizer(lambda x: vqgan.encode(to_channels(x, mcfg.vqgan.in_channels)),
                     files | {"vqgan_config": dataclasses.asdict(mcfg.vqgan)})


def token_datasets(tr: Trainer, cfg: Any, data: Dataset, tokenizers: dict[str, Tokenizer],
                   keys: tuple[str, ...]) -> tuple[TokenDataset, TokenDataset | None]:
    """The training token cache (mirrors included when ``cfg.flip``) and, when ``cfg.val_data``
    names a split, the held-out one."""
    train = TokenDataset(token_cache(tr, data, "tokens", tokenizers, cfg.flip), keys)
    if not cfg.val_data:
        return train, None
    val = load_data(cfg, cfg.val_data, train=False)[0]
    return train, TokenDataset(token_cache(tr, val, "val_tokens", tokenizers, False), keys)


def code_loss(logits: torch.Tensor, targets: torch.Tensor, g: Any, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the code slice ``[out_offset, out_offset + num_out)`` of the logits."""
    z = logits[..., g.out_offset: g.out_offset + g.num_out].float()
    return torch.nn.functional.cross_entropy(z.flatten(0, -2), targets.flatten(), label_smoothing=smoothing)
