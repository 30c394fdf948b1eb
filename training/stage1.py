"""Stage 1: a GPT over discriminative tokens (paper §3.3, A.3).

``[first, t_1 .. t_{N-1}]`` predicts ``[t_1 .. t_N]``; ``first`` is the class token, replaced by
the null class with probability ``label_dropout`` (so sampling can use classifier-free
guidance), or ``bos`` for an unconditional model. Adam (0.9, 0.98), inverse-sqrt warm-up,
label smoothing 0.1, clipping 1.0, weight decay 0.01, as the official recipe.

``--tokens=vq`` trains the tokenizer ablation's baseline (paper Table 3a, §4.5): the same GPT,
data and budget on the VQGAN's own ids (K = vqgan.n_embed) instead of cluster ids, into
``<root>/stage1_vq``; it generates VQ ids that the VQGAN decodes directly, without a stage 2
(``training.assemble --tokens=vq`` makes it a model: ``digit_core.presets.vq_baseline``).

    python -m training.stage1 --config training/fmnist.yaml [--steps=... --batch_size=...]
    python -m training.stage1 --config training/fmnist.yaml --tokens=vq
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # run as a file, training/ would shadow the standard library
    raise SystemExit("run the stages as modules from the repository root: python -m training.stage1 --help")

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from digit_core import layout
from digit_core.config import ConfigError, DiGITConfig
from digit_core.gpt import GPT
from digit_core.presets import vq_baseline
from training.config import TrainConfig, parse_config
from training.data import load_data, model_config
from training.layout import LAYOUT
from training.tokens import TokenDataset, code_loss, disc_tokenizer, token_datasets, vq_tokenizer
from training.trainer import Trainer

TOKENS = ("disc", "vq")


@dataclass
class Stage1TrainConfig(TrainConfig):
    stage: ClassVar[str] = "stage1"
    encoder: str = ""              # default <root>/ssl/encoder.safetensors
    codebook: str = ""             # default <root>/kmeans/codebook.safetensors
    val_data: str = ""             # e.g. "fmnist:test": held-out loss every eval_every steps
    flip: bool = True              # also train on the tokens of mirrored images
    label_smoothing: float = 0.1
    eval_every: int = 1000
    eval_batches: int = 20
    tokens: str = "disc"           # disc | vq (the ablation baseline on VQGAN ids, run dir <root>/stage1_vq)
    vqgan: str = ""                # tokens=vq: default <root>/vqgan/vqgan.safetensors

    def __post_init__(self) -> None:
        if self.tokens not in TOKENS:
            raise ConfigError(f"tokens must be one of {TOKENS}, got {self.tokens!r}")
        if self.tokens == "vq":
            # Its own run dir (the Trainer writes <root>/<stage>), so it never resumes from or
            # overwrites the discriminative run; the config file's stage1 section still applies.
            self.stage = "stage1_vq"


def vq_model_config(cfg: Stage1TrainConfig, class_names: list[str]) -> DiGITConfig:
    """The VQ-AR baseline of the run's model: stage 1 predicts the VQGAN's ids with the same GPT
    sizes. The grids must match so both models see sequences of equal length."""
    m = model_config(cfg, class_names)
    m = model_config(dataclasses.replace(cfg, codebook_size=m.vqgan.n_embed), class_names)
    if m.disc_grid != m.vq_grid:
        raise ConfigError(f"tokens=vq needs equal token grids for a like-for-like ablation; "
                          f"disc {m.disc_grid}x{m.disc_grid} vs VQ {m.vq_grid}x{m.vq_grid}")
    return vq_baseline(m)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Stage1TrainConfig, argv)
    tr = Trainer(cfg)
    data, mcfg = load_data(cfg, cfg.data, train=False)
    if cfg.tokens == "vq":
        mcfg = vq_model_config(cfg, data.classes)
    s1, g = mcfg.stage1, mcfg.stage1.gpt

    # Tokenize once instead of on the fly: the frozen encoder's forward costs about as much as
    # the GPT step itself, and its output never changes, so each later epoch costs only the GPT.
    # Random crops are lost (the cache holds centre crops); flips are kept by caching both.
    if cfg.tokens == "vq":
        tokenize = {"vq": vq_tokenizer(tr, mcfg, cfg.input(cfg.vqgan, LAYOUT.vqgan.path))}
    else:
        tokenize = {"disc": disc_tokenizer(tr, mcfg, cfg.input(cfg.encoder, LAYOUT.encoder.path),
                                           cfg.input(cfg.codebook, LAYOUT.codebook.path))}
    train_tokens, val_tokens = token_datasets(tr, cfg, data, tokenize, (cfg.tokens, "label"))
    del tokenize

    model = tr.add("model", GPT(g))
    tr.info(f"stage 1 GPT: {tr.modules['model'].num_params() / 1e6:.2f}M parameters, "
            f"{len(train_tokens)} token rows, {mcfg.disc_grid ** 2} tokens each")
    tr.resume()

    def inputs(codes: torch.Tensor, labels: torch.Tensor, drop: float) -> torch.Tensor:
        """``[first, t_1 .. t_{N-1}]`` with ids in the stage-1 vocabulary (``digit_core.layout``)."""
        if s1.num_classes:
            first = layout.class_tokens(s1, labels)
            if drop > 0:
                first = torch.where(torch.rand(labels.shape, device=labels.device) < drop, s1.null_class_id, first)
        else:
            first = torch.full_like(labels, s1.bos_id)
        return layout.stage1_input(s1, first[:, None], codes[:, :-1])

    batches = tr.batches(train_tokens)
    for step in tr.loop():
        codes, labels = next(batches)
        model.train()
        with tr.autocast():
            loss = code_loss(model(inputs(codes, labels, s1.label_dropout)), codes, g, cfg.label_smoothing)
        gnorm = tr.step_optim(loss)
        tr.log(samples=codes.shape[0], tokens=codes.numel(), loss=loss.item(), grad_norm=gnorm)
        if val_tokens is not None and (step + 1) % cfg.eval_every == 0:
            with tr.untimed():
                tr.record(step=step + 1, val_loss=evaluate(tr, val_tokens, inputs, g, cfg.eval_batches))

    tr.save_artifact("stage1", tr.final_state("model"), {"model": mcfg.to_dict(), "tokens": cfg.tokens})
    tr.finish()


@torch.no_grad()
def evaluate(tr: Trainer, tokens: TokenDataset, inputs, g, n_batches: int) -> float:
    """Mean held-out cross-entropy (no smoothing, labels kept) of the EMA weights when there are any."""
    model = tr.eval_module("model")
    losses = []
    for i in range(0, min(len(tokens), n_batches * tr.cfg.batch_size), tr.cfg.batch_size):
        codes, labels = (t.to(tr.device) for t in tokens[slice(i, i + tr.cfg.batch_size)])
        with tr.autocast():
            losses.append(code_loss(model(inputs(codes, labels, 0.0)), codes, g).item())
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
