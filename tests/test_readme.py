"""README's promises: its Python snippets run as written, `pip install -e .` imports the project
from any directory, and the CPU-only requirements list is the full one with CPU builds."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
RUN_ELSEWHERE = {"gradio_client": "needs a running app: tests/test_app.py drives the same endpoints"}
"""Snippets that cannot run here, by what they import, and where they are exercised instead."""


def _kind(block: str) -> str:
    for name in ("digit_core.pipeline", "digit_core.runtime", *RUN_ELSEWHERE):
        if name in block:
            return name
    return "unknown"


RUNNABLE = [b for b in BLOCKS if _kind(b) not in RUN_ELSEWHERE]


def test_every_python_snippet_is_run_here_or_accounted_for() -> None:
    kinds = [_kind(b) for b in BLOCKS]
    assert "unknown" not in kinds, "a README python block this test does not know: run it here or list it"
    assert {"digit_core.pipeline", "digit_core.runtime"} <= set(kinds)
    assert len(RUNNABLE) == sum(k not in RUN_ELSEWHERE for k in kinds)


@pytest.mark.parametrize("block", RUNNABLE, ids=[_kind(b) for b in RUNNABLE])
def test_readme_snippet_runs_as_written(block: str, tmp_path: Path) -> None:
    # In a fresh interpreter and an empty folder (what the snippet writes lands there), with the
    # project importable; `exported` links to the repository's, as the snippet runs "from the root".
    (tmp_path / "exported").symlink_to(ROOT / "exported", target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SamplingSettings(" in r.stdout        # both snippets print the settings they sample with
    if _kind(block) == "digit_core.pipeline":
        assert (tmp_path / "my-model" / "config.json").is_file() and (tmp_path / "my-model" / "model.safetensors").is_file()


def test_editable_install_imports_from_another_directory(tmp_path: Path) -> None:
    # A copy of the packages and pyproject.toml (so the build's egg-info does not land in the
    # checkout), installed editable into a venv that reuses this interpreter's packages.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    for pkg in ("digit_core", "training"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import digit_core.flows, digit_core.runtime, training.trainer, training.analyses.completion as c; "
            "print(digit_core.flows.__file__); print(c.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == [str(src / "digit_core" / "flows.py"), str(src / "training" / "analyses" / "completion.py")]


# -- the requirements files ------------------------------------------------------------------------------
GPU_TO_CPU = {"onnxruntime-gpu": "onnxruntime", "faiss-gpu": "faiss-cpu"}
LINUX_X86 = {"sys_platform": "linux", "platform_machine": "x86_64"}


def _requirements(path: Path) -> list[Requirement]:
    out: list[Requirement] = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            out += _requirements(path.parent / line.split()[1])
        elif line:
            out.append(Requirement(line))
    return out


def _effective(reqs: list[Requirement], env: dict[str, str]) -> dict[str, tuple[set[str], str]]:
    """Per package (for the platform ``env``): its pins and the highest lower bound."""
    pins: dict[str, set[str]] = {}
    floors: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    for r in reqs:
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        name = canonicalize_name(r.name)
        pins.setdefault(name, set())
        floors.setdefault(name, [])
        for s in r.specifier:
            if s.operator == "==":
                pins[name].add(s.version)
            elif s.operator == ">=":
                floors[name].append((tuple(int(p) for p in s.version.split(".")), s.version))
            else:
                raise AssertionError(f"{r}: compare only understands == and >=")
    return {n: (pins[n], max(floors[n])[1] if floors[n] else "") for n in pins}


def test_cpu_requirements_are_the_full_list_with_cpu_builds() -> None:
    full = _effective(_requirements(ROOT / "requirements.txt"), LINUX_X86)
    cpu = _effective(_requirements(ROOT / "requirements-cpu.txt"), LINUX_X86)
    assert {GPU_TO_CPU.get(n, n): v for n, v in full.items()} == cpu
    assert "scipy" in full     # the Fréchet cross-check of tests/test_evaluate.py must not skip
