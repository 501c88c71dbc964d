"""How fast the α explorer answers: α-slider moves and group changes on a real model.

    python bench/widgets_latency.py [--model smollm2-135m] [--layer 28] [--n-calib 16]
        [--device cpu] [--threads N]

For every scale group of the layer: the time to (re)compute the α→loss curve when the group is
selected, then the time of each α-slider move over 0, 0.25, …, 1 (`AlphaExplorer.timings`),
driven through the widgets' own API as a user's slider would. The target is "well under
a second" per slider move; the ratio column is the move time against that 1 s budget.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from awqnb.model.data import load_calibration  # noqa: E402
from awqnb.model.devices import resolve_device  # noqa: E402
from awqnb.model.loading import load_model
from awqnb.model.provenance import versions
from awqnb.workbench.widgets import AlphaExplorer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=28)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    model, tok = load_model(args.model, device=dev)
    calib = load_calibration(tok, "wikitext2", n_calib=args.n_calib, seqlen=args.calib_seqlen, seed=42)
    with tempfile.TemporaryDirectory() as cache_dir:
        from awqnb.analysis.statcache import DiagnosticsCache

        t0 = time.perf_counter()
        ex = AlphaExplorer(model, calib, layer=args.layer, group_size=args.group_size, device=dev,
                           model_name=args.model, cache=DiagnosticsCache(cache_dir), widget=False)
        open_s = time.perf_counter() - t0
        v = versions()
        print(f"model={args.model} layer={args.layer} device={dev} threads={torch.get_num_threads()} "
              f"calibration=wikitext2 {args.n_calib}x{args.calib_seqlen} seed 42 W4 g{args.group_size} "
              f"torch={v['torch']}")
        print(f"open layer (token sample + salience pass, cold cache): {open_s:.2f} s\n")
        print(f"{'group':8} {'curve s':>8} {'move mean s':>12} {'move max s':>11} {'max / 1 s':>10}")
        names = [g.name for g in ex.spec.groups]
        for g in names:
            ex.widgets["group"].value = g  # recomputes the curve (the first group's came with opening)
            t = ex.timings()
            mark = "*" if g == names[0] else " "
            print(f"{g + mark:8} {t['curve_s']:8.3f} {t['mean_s']:12.4f} {t['max_s']:11.4f} {t['max_s'] / 1.0:10.3f}")
        print(f"\n* {names[0]}'s curve time includes opening the layer (token sample, salience pass).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
