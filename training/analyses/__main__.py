"""python -m training.analyses --root runs/fmnist --data fmnist --name fmnist [--only stability,probe,...]

Runs each asked analysis on the trained runs under ``--root`` and writes ``reports/<name>/``:
``<analysis>.json``, ``.html`` (plotly), ``.png``, ``.md``, and ``README.md`` joining every
section in the folder. Without ``--only``, an analysis whose inputs are missing (e.g. the
ablation without a ``stage1_vq`` run) is skipped with a message; with ``--only`` it is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from typing import Any, Callable

from training.analyses import ablation, completion, probe, ssl_type, stability
from training.analyses.common import ORDER, Context, Options, Section, write_readme, write_section
from training.evaltools import EvalConfig, held_out_spec

ANALYSES: dict[str, Callable[[Context], Section]] = {
    "stability": stability.run, "probe": probe.run, "ablation": ablation.run, "ssl_type": ssl_type.run,
    "completion": completion.run}
NEEDS = {"stability": "model, ssl/encoder.safetensors (its description)",
         "probe": "model (and --probe_roots runs)",
         "ablation": "model, stage1/, stage1_vq/, vqgan/, the classifier",
         "ssl_type": "model (and --encoders files)",
         "completion": "model, stage1_vq/, vqgan/, the classifier"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.analyses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    lists: dict[str, Callable[[str], Any]] = {"probe_roots": str, "encoders": str, "prefixes": float}
    for f in dataclasses.fields(Options):
        if f.name in lists:
            kind = lists[f.name]
            ap.add_argument(f"--{f.name}", default=f.default, help=f"comma-separated (default {f.default})",
                            type=lambda s, kind=kind: tuple(kind(v) for v in s.split(",") if v))
        else:
            ap.add_argument(f"--{f.name}", default=f.default, type=float if f.name == "cfg_scale" else type(f.default),
                            help=f"default {f.default!r}")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ORDER)} (default: all)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    only = [k for k in args.pop("only").split(",") if k]
    unknown = sorted(set(only) - set(ANALYSES))
    if unknown:
        sys.exit(f"unknown analyses {unknown}; choose from {','.join(ORDER)}")
    opts = Options(**args)
    ctx = Context(opts)
    out = opts.report_dir
    for key in only or ORDER:
        t = time.perf_counter()
        try:
            section = ANALYSES[key](ctx)
        except FileNotFoundError as err:
            if only:
                raise
            print(f"skipping {key} (needs {NEEDS[key]}): {err}", flush=True)
            continue
        paths = write_section(out, section)
        print(f"{key}: {time.perf_counter() - t:.0f} s, wrote {', '.join(p.name for p in paths)}", flush=True)
    command = shlex.join(["python", "-m", "training.analyses", *(sys.argv[1:] if argv is None else argv)])
    header = (f"Runs under `{opts.root}`, images from `{opts.data}` (test: `{held_out_spec(EvalConfig(data=opts.data, test_data=opts.test_data)) or 'a seeded fifth of them'}`), "
              f"seed {opts.seed}. The runs and the command for every section: training/README.md (\"The paper's "
              f"analyses\"); this file was last joined by `{command}`. Our numbers come from small models "
              f"on small images: compare their direction with the paper's, not their values.")
    print(f"wrote {write_readme(out, opts.name or out.name, header)}")


if __name__ == "__main__":
    main()
