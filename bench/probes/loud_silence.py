"""The "loud silence" benchmark (seed: awq_vs_fprpa): how mean |x| (awq L1), L2 and praq rank three
channel groups of a synthetic SiLU MLP, and the down_proj output error after 4-bit AWQ whose α
search each of them drives. Deterministic (seed 0); a few seconds on a CPU.

    python bench/probes/loud_silence.py [--seed 0] [--p-burst 0.02]

Groups (awqnb/analysis/synthetic.py): A steady moderate, B dead just below τ with rare large bursts,
C quiet. Errors are mean squared errors of the layer output on held-out tokens: all of them, the
burst tokens (where some B channels fire) and the quiet rest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd  # noqa: E402

from awqnb.analysis.synthetic import error_table, make_loud_silence, rank_table, saliences  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-burst", type=float, default=0.02)
    args = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)

    toy = make_loud_silence(p_burst=args.p_burst, seed=args.seed)
    sal = saliences(toy)
    print(f"loud silence: {len(toy.group)} intermediate channels, {len(toy.x_calib)} calibration tokens "
          f"({int(toy.burst_calib.sum())} with a burst), {len(toy.x_eval)} held-out tokens "
          f"({int(toy.burst_eval.sum())} with a burst); praq beta=3 tau=-3 noise_factor=0.2\n")
    print("Importance per channel group (mean over the group's channels; rank 1 = most important):")
    print(rank_table(toy, sal).round(3).to_string(index=False))

    print("\nOutput MSE of down_proj after W4 AWQ, alpha searched with each salience (rtn: no scaling):")
    err = error_table(toy, sal)
    l1 = err[err.salience == "l1"].set_index("group_size")
    for col in ("mse_all", "mse_burst", "mse_quiet"):
        err[col + "/l1"] = err[col] / err.group_size.map(l1[col])
    print(err.round(4).to_string(index=False))

    print("\nThe risk gate on group B as its bursts get rarer (B's dead state sits at z ~ -4.5, tau = -3):")
    rows = []
    for p in (0.0, 0.005, 0.02, 0.05):
        t = make_loud_silence(p_burst=p, seed=args.seed)
        s = saliences(t)
        b = [g == "B" for g in t.group]
        rk = rank_table(t, s).set_index("group")
        rows.append({"p_burst": p, "P_live(B)": float(s["p_live"][b].mean()),
                     "praq/l1 (B)": float((s["praq"][b] / s["l1"][b]).mean()),
                     "rank l1 (B)": rk.loc["B", "rank l1"], "rank praq (B)": rk.loc["B", "rank praq"]})
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
