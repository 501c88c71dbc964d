"""Wall time of one sweep under several executors: the Ray overhead on one machine, and fractional GPUs.

Each configuration runs the same grid from scratch (`force`) into its own temporary directory with
`awqnb.workbench.sweep.run_sweep`, timed from the call to its return (a local Ray cluster's start-up
included); the metrics of every run are compared across configurations.

CPU (the overhead target: 8 tiny-model runs, Ray ≤ 10% over in-process):
    OMP_NUM_THREADS=1 python bench/sweep.py --configs local,ray:1,ray:2 --small-data

GPU (fractional requests: two SmolLM2 runs at once against one after another on one GPU):
    python bench/sweep.py --models smollm2-135m --methods rtn,awq --seeds 1,2 --group-sizes 64 \
        --params notebooks/params/cpu.yaml --configs ray:gpu=1,ray:gpu=0.5 --json bench/results/sweep_gpu.json

Configs: `local` (in-process), `ray:N` (a local Ray cluster with N CPUs, one CPU per run),
`ray:gpu=F` (a local Ray cluster with every GPU, each run asking for F of one).
--small-data: evaluate on the first 300 rows of WikiText-2 test (a private AWQNB_DATA_DIR), so the
tiny runs measure the executor rather than tokenising 2.4 MB of text.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from awqnb.workbench import report, sweep  # noqa: E402
from awqnb.workbench.grid import Grid, make_grid  # noqa: E402

TINY_PARAMS = dict(n_calib=4, calib_seqlen=32, eval_windows=2, eval_seqlen=64, n_grid=4, diag_samples=0,
                   sample_datasets=[])


def _small_data(root: Path) -> Path:
    import pandas as pd

    from awqnb.model.data import data_dirs

    src = next(d / "wikitext-2-raw-v1" / "test.parquet" for d in data_dirs()
               if (d / "wikitext-2-raw-v1" / "test.parquet").is_file())
    dest = root / "data" / "wikitext-2-raw-v1"
    dest.mkdir(parents=True)
    pd.read_parquet(src).iloc[:300].to_parquet(dest / "test.parquet")
    calib = root / "calib.txt"
    calib.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 40)
    return calib


def run_config(config: str, grid: Grid, out: Path) -> dict:
    import ray

    kw: dict = {"bars": "none", "force": True}
    if config == "local":
        executor = "local"
    else:
        executor = "ray"
        opt = config.split(":", 1)[1] if ":" in config else ""
        if opt.startswith("gpu="):
            kw["gpus_per_run"] = float(opt[4:])
        elif opt:
            kw["ray_num_cpus"] = int(opt)
    t0 = time.perf_counter()
    res = sweep.run_sweep(grid, out, executor, **kw)
    wall = time.perf_counter() - t0
    if ray.is_initialized():
        ray.shutdown()
    ppl = {r.spec.rel: {f"{m['label']}/{m['dataset']}": m["ppl"] for m in report.read_metrics(r.dir)["results"]}
           for r in res.runs if r.ok}
    run_s = [report.read_json_file(r.dir / report.RUN_FILE).get("seconds") for r in res.runs if r.dir]
    return {"config": config, "wall_s": round(wall, 2), "runs": len(res.runs), "failed": len(res.failed),
            "sum_run_s": round(sum(s or 0 for s in run_s), 2), "ppl": ppl}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-random-llama,tiny-random-gemma3")
    p.add_argument("--methods", default="rtn,awq")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--group-sizes", default="32,64")
    p.add_argument("--params", default=None, help="YAML of notebook parameters (default: tiny ones for tiny models)")
    p.add_argument("--configs", default="local,ray:1,ray:2")
    p.add_argument("--small-data", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import yaml

    params = yaml.safe_load(Path(args.params).read_text()) if args.params else dict(TINY_PARAMS)
    with tempfile.TemporaryDirectory(prefix="awqnb-bench-sweep-") as tmp:
        tmp = Path(tmp)
        if args.small_data:
            params["calib_dataset"] = str(_small_data(tmp))
            os.environ["AWQNB_DATA_DIR"] = str(tmp / "data")  # before any Ray cluster starts: workers inherit it
        grid = make_grid(args.models, args.methods, args.seeds, args.group_sizes, params)
        results = []
        for config in args.configs.split(","):
            r = run_config(config, grid, tmp / config.replace(":", "_").replace("=", ""))
            results.append(r)
            print(f"{config:<14} {r['runs']} runs ({r['failed']} failed): {r['wall_s']:.1f} s wall, "
                  f"{r['sum_run_s']:.1f} s inside the runs", flush=True)
    base = results[0]
    for r in results[1:]:
        same = r["ppl"] == base["ppl"]
        print(f"{r['config']:<14} vs {base['config']}: {100 * (r['wall_s'] / base['wall_s'] - 1):+.1f}% wall time; "
              f"metrics {'identical' if same else 'DIFFER'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "cpus": os.cpu_count(), "results": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
