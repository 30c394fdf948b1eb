"""The whole DiGIT model in PyTorch: tokenizer, both stages, VQGAN, and the three flows.

``DiGIT`` is the PyTorch backend of ``digit_core.flows.Flows``: the flows (sampling loops,
classifier-free guidance, completion) are shared with the onnxruntime runtime; this module
only says how to run each network. The image-facing modules below (``DiscTokenizer``,
``VQEncoder``, ``VQDecoder``) take and give uint8 images, and are exactly what the ONNX
exporter traces, so preprocessing lives in one place.

A saved model is a directory: ``config.json`` + ``model.safetensors`` (no pickle).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .codebook import Codebook
from .config import ConfigError, DiGITConfig
from .encoders import Encoder
from .flows import Flows, StepFn
from .gpt import GPT
from .vqgan import VQGAN

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images ``[N, C, H, W]`` as ``channels`` channels: grey is the channel mean, grey to
    colour repeats it."""
    if x.shape[1] == channels:
        return x
    return x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)


def images_to_input(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, channels, H, W]`` in [0, 1]."""
    return to_channels(images.permute(0, 3, 1, 2).float() / 255.0, channels)


def output_to_images(x: torch.Tensor) -> torch.Tensor:
    """float ``[N, C, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]`` (grey repeated to 3 channels)."""
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3) if x.shape[-1] == 1 else x


class DiscTokenizer(nn.Module):
    """uint8 images -> (cluster ids ``[N, n, n]``, squared distances ``[N, n, n]``, features ``[N, n, n, d]``)."""

    def __init__(self, encoder: Encoder, codebook: Codebook) -> None:
        super().__init__()
        self.encoder, self.codebook = encoder, codebook

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.encoder.features(images_to_input(images, self.encoder.cfg.in_chans))
        ids, dist = self.codebook.assign(feats)
        return ids, dist, feats


class VQEncoder(nn.Module):
    """uint8 images -> VQ code ids ``[N, m, m]`` and the encoder latents they quantize ``[N, m, m, d]``."""

    def __init__(self, vqgan: VQGAN) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.vqgan.encode_latent(images_to_input(images, self.vqgan.cfg.in_channels)).permute(0, 2, 3, 1)
        return self.vqgan.quantize.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:3]), z


class VQDecoder(nn.Module):
    """VQ code ids ``[N, m, m]`` -> uint8 images ``[N, H, W, 3]``."""

    def __init__(self, vqgan: VQGAN) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return output_to_images(self.vqgan.decode(ids))


class DiGIT(nn.Module, Flows):
    """A complete DiGIT model; ``tokenize``, ``sample``, ``generate`` and ``complete`` come from ``Flows``.

    A VQ-token config (``config.tokens == "vq"``, the VQ-AR baseline) builds only stage 1 and
    the VQGAN: no encoder, codebook or stage 2.
    """

    def __init__(self, config: DiGITConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.vqgan = VQGAN(config.vqgan)
        self.stage1 = GPT(config.stage1.gpt)
        if not config.is_vq:
            self.encoder = Encoder(config.encoder)
            self.codebook = Codebook(torch.zeros(config.codebook.size, config.codebook.dim))
            self.stage2 = GPT(config.stage2.gpt)
            self.disc_tokenizer = DiscTokenizer(self.encoder, self.codebook)
        self.vq_encoder, self.vq_decoder = VQEncoder(self.vqgan), VQDecoder(self.vqgan)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.stage1.head.weight.device

    # -- backend operations (numpy in, numpy out) ---------------------------------------------------
    @torch.inference_mode()
    def encode_disc(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.check_disc("tokenize")
        ids, dist, feats = self.disc_tokenizer(_tensor(images, self.device))
        return ids.cpu().numpy(), dist.float().cpu().numpy(), feats.float().cpu().numpy()

    @torch.inference_mode()
    def encode_vq(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, z = self.vq_encoder(_tensor(images, self.device))
        return ids.cpu().numpy(), z.float().cpu().numpy()

    @torch.inference_mode()
    def decode_vq(self, ids: np.ndarray) -> np.ndarray:
        return self.vq_decoder(_tensor(ids, self.device)).cpu().numpy()

    def open_stage1(self, batch: int) -> StepFn:
        return _step_fn(self.stage1, batch, self.config.stage1_positions)

    def open_stage2(self, batch: int) -> StepFn:
        self.check_disc("run stage 2")
        return _step_fn(self.stage2, batch, self.config.stage2_positions)

    # -- save / load -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically: a crash leaves the old copy or none."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.config.save(tmp / CONFIG_FILE)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.own_state_dict().items()}, tmp / WEIGHTS_FILE)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the aliases that the image-facing wrappers add."""
        skip = ("disc_tokenizer.", "vq_encoder.", "vq_decoder.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "DiGIT":
        path = Path(path)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path}: missing {f} (a DiGIT model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        model = cls(DiGITConfig.load(path / CONFIG_FILE))
        try:
            state = load_file(path / WEIGHTS_FILE)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({err})") from None
        model.load_weights(state, source=str(path / WEIGHTS_FILE))
        return model.to(device)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load with an error that names missing, unexpected and mis-shaped tensors."""
        from .checkpoints import state_mismatch
        bad = state_mismatch(self.own_state_dict(), state)
        if bad:
            raise ConfigError(f"{source} does not match the config: {bad}")
        self.load_state_dict(state, strict=False)   # strict=False: the wrappers' aliases are not in ``state``


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """numpy -> torch on ``device``; read-only arrays (the caller's) are copied, not aliased."""
    return torch.from_numpy(a if a.flags.writeable else a.copy()).to(device)


def _step_fn(gpt: GPT, batch: int, length: int) -> StepFn:
    """A numpy step function over ``gpt`` with its own preallocated KV cache of ``length`` positions."""
    cache = gpt.new_cache(batch, length)

    @torch.inference_mode()
    def step(tokens: np.ndarray, start: int) -> np.ndarray:
        idx = torch.from_numpy(np.ascontiguousarray(tokens)).to(cache.device)
        return gpt(idx, start, cache)[:, -1].float().cpu().numpy()

    return step
