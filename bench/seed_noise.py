"""Compare two settings of the same methods over calibration seeds and evaluation windows.

Reads `bench/quality.py` output directories named `<setting>_<seed>` (their results.json holds
each evaluation's per-window NLL) and reports, per method and setting, the perplexity per seed,
its mean and spread over seeds, and for setting B against setting A the paired difference with a
95% interval from a two-level bootstrap (`awqnb.evaluate.seed_bootstrap_delta`: resample seeds,
then windows within each, the same windows for both settings, so the pairing is kept). A
difference counts only when the interval excludes 0.

  python bench/seed_noise.py /tmp/q --a fp32 --b bf16 --out bench/results/h200/dtype_noise.md
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from awqnb.evaluate import PerplexityResult, seed_bootstrap_delta


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


def paired_bootstrap(a: dict, b: dict, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of ppl(b) − ppl(a), with a seeds × windows bootstrap 95% interval."""
    point, lo, hi, _ = seed_bootstrap_delta(b, a, n_boot, seed, statistic="ppl_diff")
    return point, lo, hi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--a", required=True, help="reference setting (directory prefix)")
    p.add_argument("--b", required=True, help="setting compared with it")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    data = load(Path(args.root))
    methods = sorted({m for _, m in data})
    lines = [f"| method | setting | ppl per seed | mean ± sd over seeds | {args.b} − {args.a} (95% CI, seeds × windows) |",
             "|---|---|---|---|---|"]
    for m in methods:
        for setting in (args.a, args.b):
            runs = data.get((setting, m), {})
            vals = [runs[s].ppl for s in sorted(runs)]
            per = " / ".join(f"{v:.3f}" for v in vals)
            diff = ""
            if setting == args.b and (args.a, m) in data:
                d, lo, hi = paired_bootstrap(data[(args.a, m)], runs, args.n_boot)
                verdict = "within noise" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
                diff = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"
            lines.append(f"| {m} | {setting} | {per} (seeds {sorted(runs)}) | {np.mean(vals):.3f} ± "
                         f"{np.std(vals, ddof=1) if len(vals) > 1 else float('nan'):.3f} | {diff} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
