"""The tokenizer ablation's baseline (paper Table 3a, Fig. 4b) as a ``Flows`` backend.

A ``python -m training.stage1 --tokens=vq`` run is one GPT over the VQGAN's own ids. Seen as
DiGIT, its "discriminative" tokens are VQ ids, so ``tokenize`` (and with it the prefix of
``complete``) is the VQGAN encoder, and stage 2 is the identity: the stage-1 codes go straight
to the VQGAN decoder. Sampling, guidance and completion are the shared ``Flows`` code, so the
two models of the ablation are sampled by the very same loop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from digit_core.config import ConfigError, DiGITConfig
from digit_core.flows import Flows, StepFn
from digit_core.gpt import GPT
from digit_core.pipeline import DiGIT, VQDecoder, VQEncoder, _step_fn, _tensor
from digit_core.sampling import Sampler
from digit_core.vqgan import VQGAN
from training.files import load_tensors, require


class VQAutoregressive(nn.Module, Flows):
    """Stage 1 over VQ ids (``config.codebook.size == vqgan.n_embed``) and the VQGAN."""

    def __init__(self, config: DiGITConfig) -> None:
        super().__init__()
        self.config = config.validate()
        if config.codebook.size != config.vqgan.n_embed or config.disc_grid != config.vq_grid:
            raise ConfigError(f"{config.name}: not a VQ-token model (stage 1 over {config.codebook.size} codes on a "
                              f"{config.disc_grid}x{config.disc_grid} grid, VQGAN {config.vqgan.n_embed} codes on "
                              f"{config.vq_grid}x{config.vq_grid}); train it with training.stage1 --tokens=vq")
        self.vqgan = VQGAN(config.vqgan)
        self.stage1 = GPT(config.stage1.gpt)
        self.vq_encoder, self.vq_decoder = VQEncoder(self.vqgan), VQDecoder(self.vqgan)
        self.eval()

    @classmethod
    def load(cls, stage1: str | Path, vqgan: str | Path, device: str | torch.device = "cpu") -> "VQAutoregressive":
        """From a ``--tokens=vq`` stage-1 artifact and the VQGAN stage's weights."""
        tensors, meta = load_tensors(require(Path(stage1), "stage1 --tokens=vq"))
        if meta.get("tokens") != "vq":
            raise ValueError(f"{stage1} is a stage 1 over {meta.get('tokens', 'disc')} tokens, not VQ ids: "
                             f"train the baseline with python -m training.stage1 ... --tokens=vq")
        model = cls(DiGITConfig.from_dict(meta["model"]))
        model.stage1.load_state_dict(tensors)
        model.vqgan.load_state_dict(load_tensors(require(Path(vqgan), "vqgan"))[0])
        return model.to(device)

    # The VQ operations and the device are DiGIT's own: same modules under the same names.
    device = DiGIT.device
    encode_vq = DiGIT.encode_vq
    decode_vq = DiGIT.decode_vq

    @torch.inference_mode()
    def encode_disc(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """VQ ids ``[N, m, m]``, squared distances to their codes and the latents ``[N, m, m, d]``."""
        ids, z = self.vq_encoder(_tensor(images, self.device))
        dist = (z - self.vqgan.quantize.embedding.weight[ids]).pow(2).sum(-1)
        return ids.cpu().numpy(), dist.float().cpu().numpy(), z.float().cpu().numpy()

    def open_stage1(self, batch: int) -> StepFn:
        return _step_fn(self.stage1, batch, self.config.vq_grid ** 2)   # one VQ code per position

    def open_stage2(self, batch: int) -> StepFn:
        raise NotImplementedError("a VQ-token model has no stage 2: its stage-1 codes are VQ ids")

    def _stage2(self, codes: np.ndarray, sampler: Sampler, rngs: list[np.random.Generator]) -> np.ndarray:
        return codes
