"""Compare two settings of the same methods over calibration seeds and evaluation windows.

Reads `bench/quality.py` output directories named `<setting>_<seed>` (their results.json holds
each evaluation's per-window NLL) and reports, per method and setting, the perplexity per seed,
its mean and spread over seeds, and for setting B against setting A the paired difference (delta %)
with its 95% interval and verdict from `awqnb.analysis.stats` (the one verdict rule: a t interval over the
seeds' paired differences combined with the windows' shared sampling noise; fewer than 3 seeds
give no verdict).

  python bench/seed_noise.py /tmp/q --a fp32 --b bf16 --out bench/results/seed_noise/2026-12-02_h200_smollm2-135m_dtype/dtype_noise.md
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from awqnb.analysis.evaluate import PerplexityResult
from awqnb.analysis.stats import paired_interval


def load(root: Path) -> dict:
    """{(setting, method): {seed: PerplexityResult}}."""
    out: dict = defaultdict(dict)
    for d in sorted(root.iterdir()):
        if not (d / "results.json").is_file() or "_" not in d.name:
            continue
        setting, seed = d.name.rsplit("_", 1)
        for e in json.loads((d / "results.json").read_text())["evals"]:
            s = e["meta"].get("seed")  # quality.py --seeds: several seeds in one directory
            out[(setting, e["meta"]["method"])][int(seed) if s is None else int(s)] = PerplexityResult.from_dict(e)
    return out




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--a", required=True, help="reference setting (directory prefix)")
    p.add_argument("--b", required=True, help="setting compared with it")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    data = load(Path(args.root))
    methods = sorted({m for _, m in data})
    lines = [f"| method | setting | ppl per seed | mean ± sd over seeds | {args.b} vs {args.a}, delta % (95% CI, awqnb.analysis.stats) |",
             "|---|---|---|---|---|"]
    for m in methods:
        for setting in (args.a, args.b):
            runs = data.get((setting, m), {})
            vals = [runs[s].ppl for s in sorted(runs)]
            per = " / ".join(f"{v:.3f}" for v in vals)
            diff = ""
            if setting == args.b and (args.a, m) in data:
                iv = paired_interval(runs, data[(args.a, m)])
                diff = f"{iv.delta_pct:+.2f} [{iv.ci_low:+.2f}, {iv.ci_high:+.2f}] {iv.verdict}"
            lines.append(f"| {m} | {setting} | {per} (seeds {sorted(runs)}) | {np.mean(vals):.3f} ± "
                         f"{np.std(vals, ddof=1) if len(vals) > 1 else float('nan'):.3f} | {diff} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
