"""Training config values are checked when parsed, naming the key and what it allows (issue #19.14)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from digit_core.config import ConfigError
from training.config import parse_config
from training.trainer import Trainer
from training.ssl import SSLConfig
from training.stage1 import Stage1TrainConfig
from training.vqgan import VQGANTrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arg, match", [
    ("--lr=abc", "lr: expected a number, got 'abc'"),
    ("--lr=nan", "lr: expected a finite number"),
    ("--lr=-1", "lr must be > 0, got -1.0"),
    ("--steps=1.5", "steps: expected an integer, got '1.5'"),
    ("--steps=-5", "steps must be >= 1, got -5"),
    ("--ckpt_every=0", "ckpt_every must be >= 1, got 0"),
    ("--schedule=linear", "schedule must be one of inverse_sqrt, cosine, constant, got 'linear'"),
    ("--device=tpu", "device must be one of auto, cpu, cuda, got 'tpu'"),
    ("--flip=maybe", "flip: expected true or false, got 'maybe'"),
    ("--beta2=1", r"beta2 must be in \[0, 1\), got 1.0"),
    ("--data=/no/such/folder", "data must be an existing image folder .* got '/no/such/folder'"),
    ("--data=fmnist:tset", "data must be .*fmnist\\[:train\\|fit\\|val\\|test\\]"),
    ("--val_data=fmnist@/no/such/dir", "val_data must be"),
    ("--model=imagenet-huge", "model must be a preset \\(tiny, .*\\) or an existing config.json"),
])
def test_bad_command_line_values_name_the_key(arg: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(Stage1TrainConfig, [arg])


@pytest.mark.parametrize("section, match", [
    ('steps: "abc"', "c.yaml: steps: expected an integer, got 'abc'"),
    ('lr: "abc"', "c.yaml: lr: expected a number, got 'abc'"),
    ("steps: 2.5", "c.yaml: steps: expected an integer, got 2.5"),
    ("steps: true", "c.yaml: steps: expected an integer, got True"),
    ("flip: 1", "c.yaml: flip: expected true or false, got 1"),
    ("eval_every: 0", "c.yaml: eval_every must be >= 1, got 0"),
    ("label_smoothing: [0.1]", "c.yaml: label_smoothing: expected a number"),
])
def test_bad_config_file_values_name_the_file_and_key(tmp_path: Path, section: str, match: str) -> None:
    (tmp_path / "c.yaml").write_text(f"stage1:\n  {section}\n")
    with pytest.raises(ConfigError, match=match):
        parse_config(Stage1TrainConfig, ["--config", str(tmp_path / "c.yaml")])


def test_strings_in_files_are_read_as_on_the_command_line(tmp_path: Path) -> None:
    """YAML reads `steps: "20"` and `lr: 3e-4` (no dot) as strings: they mean 20 and 0.0003."""
    (tmp_path / "c.yaml").write_text('stage1:\n  steps: "20"\n  lr: 3e-4\n  flip: "false"\n')
    cfg = parse_config(Stage1TrainConfig, ["--config", str(tmp_path / "c.yaml")])
    assert (cfg.steps, cfg.lr, cfg.flip) == (20, 3e-4, False) and type(cfg.steps) is int


def test_every_stage_gets_the_checks_ssl_included(tmp_path: Path) -> None:
    """The rules go by field name and type hint, so SSLConfig needs no code of its own."""
    with pytest.raises(ConfigError, match="ckpt_every must be >= 1"):
        parse_config(SSLConfig, ["--ckpt_every=0"])
    with pytest.raises(ConfigError, match=r"global_scale\[1\]: expected a number, got 'x'"):
        parse_config(SSLConfig, ['--global_scale=[0.4, "x"]'])
    with pytest.raises(ConfigError, match="global_scale: expected 2 values, got 3"):
        parse_config(SSLConfig, ["--global_scale=[0.1, 0.2, 0.3]"])
    assert parse_config(SSLConfig, ["--global_scale=[0.3, 1]"]).global_scale == (0.3, 1.0)
    with pytest.raises(ConfigError, match="perceptual must be one of random, encoder, none"):
        parse_config(VQGANTrainConfig, ["--perceptual=vgg"])
    assert parse_config(Stage1TrainConfig, ["--fresh"]).fresh is True   # a bare boolean flag means true


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device=cuda but torch sees no CUDA GPU"):
        Trainer(parse_config(Stage1TrainConfig, [f"--root={tmp_path}", "--device=cuda"]))


def test_a_user_error_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    """No traceback, and nothing written: the run directory is not even created."""
    for args, message in ((["--lr=abc"], "error: lr: expected a number, got 'abc'"),
                          ([f"--data={tmp_path / 'missing'}"], "error: data must be an existing image folder")):
        r = subprocess.run([sys.executable, "-m", "training.stage1", f"--root={tmp_path / 'run'}", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
        assert r.returncode != 0 and r.stderr.strip().startswith(message), r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_shipped_recipes_pass_for_every_stage() -> None:
    from training.assemble import AssembleConfig
    from training.features import FeaturesConfig
    from training.kmeans import KMeansConfig
    from training.stage2 import Stage2TrainConfig
    for recipe in sorted((REPO / "training").glob("*.yaml")):
        for cls in (SSLConfig, FeaturesConfig, KMeansConfig, VQGANTrainConfig, Stage1TrainConfig, Stage2TrainConfig, AssembleConfig):
            parse_config(cls, ["--config", str(recipe)])
