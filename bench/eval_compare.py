"""Two ``training.evaluate`` runs side by side, with 95% intervals: what a weight format costs.

    python -m bench.eval_compare --base /tmp/eval-fp16 --new /tmp/eval-int8 --out reports/int8 \\
        [--base-name float16 --new-name int8 --max-drop 0.01]

Reads ``metrics.json`` of each run and writes ``compare.md`` + ``compare.json`` to ``--out``: class
accuracy of the samples, half-image completion agreement and the linear probe, each with a
Wilson interval and the difference with a normal-approximation interval; the Fréchet distance
(``training.evaluate`` gives no interval for it), the VQGAN PSNR and the sampling wall time. A
drop in sample class accuracy beyond ``--max-drop`` is stated as such. Both runs must share one
classifier (the ``classifier`` option), or their accuracies would not be comparable.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

Z95 = 1.959964


def wilson(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    d = 1 + Z95 ** 2 / n
    mid = (p + Z95 ** 2 / (2 * n)) / d
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / d
    return mid - half, mid + half


def difference(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """``p2 - p1`` and its 95% normal-approximation interval (independent samples)."""
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return p2 - p1, p2 - p1 - Z95 * se, p2 - p1 + Z95 * se


def compare(base: dict[str, Any], new: dict[str, Any], max_drop: float) -> dict[str, Any]:
    if base["classifier"].get("test_accuracy") != new["classifier"].get("test_accuracy"):
        raise ValueError(f"the runs used different classifiers (test accuracy {base['classifier'].get('test_accuracy')} vs "
                         f"{new['classifier'].get('test_accuracy')}): rerun one with the other's classifier=PATH")
    rows = {}
    for key, p, n in (("sample class accuracy", ("samples", "accuracy"), ("samples", "n")),
                      ("completion keeps the class", ("completion", "agreement"), ("completion", "n")),
                      ("linear probe", ("linear_probe", "encoder"), ("linear_probe", "test"))):
        (p1, n1), (p2, n2) = ((m[p[0]][p[1]], m[n[0]][n[1]]) for m in (base, new))
        d, lo, hi = difference(p1, n1, p2, n2)
        rows[key] = {"base": p1, "base_ci": wilson(p1, n1), "new": p2, "new_ci": wilson(p2, n2), "n": [n1, n2],
                     "difference": d, "difference_ci": [lo, hi]}
    drop = -rows["sample class accuracy"]["difference"]
    return {"proportions": rows,
            "frechet": {"base": base["frechet"]["samples"], "new": new["frechet"]["samples"], "n": new["frechet"]["n"],
                        "train_floor": new["frechet"]["train_floor"]},
            "psnr_db": {"base": base["reconstruction"]["psnr_db"], "new": new["reconstruction"]["psnr_db"]},
            "samples_s": {"base": base["timings_s"]["samples"], "new": new["timings_s"]["samples"]},
            "classifier_accuracy": new["classifier"]["test_accuracy"],
            "sample_accuracy_drop": drop, "max_drop": max_drop, "within_budget": drop <= max_drop}


def markdown(c: dict[str, Any], names: tuple[str, str], bundles: tuple[str, str]) -> str:
    a, b = names
    pct = lambda x: f"{100 * x:.1f}%"
    ci = lambda lo_hi: f"[{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"
    lines = [f"# {b} vs {a}: `training.evaluate` on both bundles", "",
             f"{a}: `{bundles[0]}`; {b}: `{bundles[1]}`. One classifier for both (test accuracy "
             f"{pct(c['classifier_accuracy'])}). 95% intervals: Wilson for each proportion, normal approximation for the "
             "difference.", "",
             f"| measure | {a} | {b} | {b} - {a} |", "|---|---|---|---|"]
    for k, r in c["proportions"].items():
        lines.append(f"| {k} (n = {r['n'][1]:,}) | {pct(r['base'])} {ci(r['base_ci'])} | {pct(r['new'])} {ci(r['new_ci'])} | "
                     f"{100 * r['difference']:+.1f} points {ci(r['difference_ci'])} |")
    f, s, t = c["frechet"], c["psnr_db"], c["samples_s"]
    lines += [f"| Fréchet distance, classifier features (n = {f['n']:,}; no interval; floor {f['train_floor']:.2f}) | "
              f"{f['base']:.2f} | {f['new']:.2f} | {f['new'] - f['base']:+.2f} |",
              f"| VQGAN reconstruction PSNR (dB) | {s['base']:.2f} | {s['new']:.2f} | {s['new'] - s['base']:+.2f} |",
              f"| sampling wall time, s (same machine, not the same moment) | {t['base']:.0f} | {t['new']:.0f} | "
              f"{t['base'] / t['new']:.2f}x speed-up |", ""]
    drop = c["sample_accuracy_drop"]
    lines.append(f"Sample class accuracy changes by {-100 * drop:+.1f} points: "
                 + (f"within the {100 * c['max_drop']:.0f}-point budget." if c["within_budget"] else
                    f"**{b} loses more than {100 * c['max_drop']:.0f} point of class accuracy**, so it stays opt-in."))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="training.evaluate output directory of the reference bundle")
    ap.add_argument("--new", required=True, help="training.evaluate output directory of the bundle compared")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-name", default="float16")
    ap.add_argument("--new-name", default="int8")
    ap.add_argument("--max-drop", type=float, default=0.01, help="tolerated drop in sample class accuracy (0.01 = 1 point)")
    a = ap.parse_args(argv)
    runs = []
    for d in (a.base, a.new):
        f = Path(d) / "metrics.json"
        if not f.is_file():
            ap.error(f"{f} does not exist: run training.evaluate --out={d} first")
        runs.append(json.loads(f.read_text()))
    c = compare(runs[0], runs[1], a.max_drop)
    c["bundles"] = [runs[0]["bundle"], runs[1]["bundle"]]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(c, indent=2))
    md = markdown(c, (a.base_name, a.new_name), (runs[0]["bundle"], runs[1]["bundle"]))
    (out / "compare.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
