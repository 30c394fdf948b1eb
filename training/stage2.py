"""Stage 2, the pixel decoder: discriminative tokens -> VQGAN tokens (paper §3.3, A.3).

One decoder-only GPT over ``[d_1 .. d_N, sep, v_1 .. v_{M-1}]`` predicting ``[v_1 .. v_M]``:
the discriminative tokens are a causally masked prefix with their own position table, and the
loss covers only the VQ part. Both token kinds come from one cache of the training images (and
their mirror images): the frozen tokenizer and the trained VQGAN's encoder.

    python -m training.stage2 --config training/fmnist.yaml [--steps=...]
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.stage2 --help")

from dataclasses import dataclass
from typing import ClassVar

import torch

from digit_core import layout
from digit_core.gpt import GPT
from training.config import TrainConfig, parse_config
from training.data import load_data
from training.layout import LAYOUT
from training.tokens import TokenDataset, code_loss, disc_tokenizer, token_datasets, vq_tokenizer
from training.trainer import Trainer


@dataclass
class Stage2TrainConfig(TrainConfig):
    stage: ClassVar[str] = "stage2"
    encoder: str = ""              # default <root>/ssl/encoder.safetensors
    codebook: str = ""             # default <root>/kmeans/codebook.safetensors
    vqgan: str = ""                # default <root>/vqgan/vqgan.safetensors
    val_data: str = ""             # e.g. "fmnist:test": held-out loss and token accuracy
    flip: bool = True
    label_smoothing: float = 0.1
    eval_every: int = 1000
    eval_batches: int = 20


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Stage2TrainConfig, argv)
    tr = Trainer(cfg)
    data, mcfg = load_data(cfg, cfg.data, train=False)
    s2, g = mcfg.stage2, mcfg.stage2.gpt
    N = mcfg.disc_grid ** 2

    # Cached for the same reason as stage 1: the frozen encoder and VQGAN never change.
    tokenize = {"disc": disc_tokenizer(tr, mcfg, cfg.input(cfg.encoder, LAYOUT.encoder.path),
                                       cfg.input(cfg.codebook, LAYOUT.codebook.path)),
                "vq": vq_tokenizer(tr, mcfg, cfg.input(cfg.vqgan, LAYOUT.vqgan.path))}
    train_tokens, val_tokens = token_datasets(tr, cfg, data, tokenize, ("disc", "vq"))
    del tokenize

    model = tr.add("model", GPT(g))
    tr.info(f"stage 2 GPT: {tr.modules['model'].num_params() / 1e6:.2f}M parameters, {len(train_tokens)} rows")
    tr.resume()

    def inputs(disc: torch.Tensor, vq: torch.Tensor) -> torch.Tensor:
        """``[d + disc_offset, sep, v_1 .. v_{M-1} + vq_offset]`` (``digit_core.layout``)."""
        return layout.stage2_input(s2, disc, vq)

    batches = tr.batches(train_tokens)
    for step in tr.loop():
        disc, vq = next(batches)
        model.train()
        with tr.autocast():
            logits = model(inputs(disc, vq))[:, N:]       # the positions that predict v_1 .. v_M
            loss = code_loss(logits, vq, g, cfg.label_smoothing)
        gnorm = tr.step_optim(loss)
        tr.log(samples=vq.shape[0], tokens=disc.numel() + vq.numel(), loss=loss.item(), grad_norm=gnorm)
        if val_tokens is not None and (step + 1) % cfg.eval_every == 0:
            with tr.untimed():
                tr.record(step=step + 1, **evaluate(tr, val_tokens, inputs, N, g, cfg.eval_batches))

    tr.save_artifact(LAYOUT.stage2.name, tr.final_state("model"), {"model": mcfg.to_dict()})
    tr.finish()


@torch.no_grad()
def evaluate(tr: Trainer, tokens: TokenDataset, inputs, N: int, g, n_batches: int) -> dict[str, float]:
    """Held-out cross-entropy and teacher-forced top-1 accuracy of the VQ tokens."""
    model = tr.eval_module("model")
    losses, correct, total = [], 0, 0
    for i in range(0, min(len(tokens), n_batches * tr.cfg.batch_size), tr.cfg.batch_size):
        disc, vq = (t.to(tr.device) for t in tokens[slice(i, i + tr.cfg.batch_size)])
        with tr.autocast():
            logits = model(inputs(disc, vq))[:, N:]
        losses.append(code_loss(logits, vq, g).item())
        correct += (logits[..., layout.code_slice(g)].argmax(-1) == vq).sum().item()
        total += vq.numel()
    return {"val_loss": sum(losses) / len(losses), "val_token_acc": correct / total}


if __name__ == "__main__":
    main()
