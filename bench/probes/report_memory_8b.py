"""Two figures behind the 8B report's fixes, on this machine's CPU (no GPU needed):
  - the cost of rounding one Llama-3-8B-shaped layer's linears at 8 bits on the CPU in float32, as
    `plans.keep_weights` did for every layer before the pareto bar (3 repeats, all shown);
  - `engine.budget.sensitivity_estimate` for the full 8B shape (8 × 512 windows, float32), by part,
    beside the hybrid-state cap SENS_STATES_BYTES.

    python bench/probes/report_memory_8b.py --out bench/results/probes/<date>_cpu_report-memory-8b
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _common import environment  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from awqnb.analysis import plans
    from awqnb.core.config import QuantConfig
    from awqnb.engine import budget
    from awqnb.quant import pipeline
    from awqnb.quant.method_config import MethodConfig

    spec = importlib.util.spec_from_file_location("make_shaped_model", ROOT / "bench" / "make_shaped_model.py")
    shaped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shaped)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(shaped.shape_config("llama3-8b"), dtype=torch.bfloat16)
    est = budget.sensitivity_estimate(full, "cuda:0", torch.float32, 8, 512, 8, False, 2048)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shaped.shape_config("llama3-8b:1"), dtype=torch.bfloat16).eval()
    res = pipeline.quantize(copy.deepcopy(model), MethodConfig("rtn", QuantConfig(4, 128)), None, progress=False)
    reps = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plans.keep_weights(model, res, 8, [0])
        reps.append(time.perf_counter() - t0)
    rec = {"command": "python " + " ".join(sys.argv), "environment": environment("cpu"),
           "keep_weights_one_8b_layer_cpu_float32_s": {"repeats": reps, "median": statistics.median(reps),
                                                       "x32_layers_median": 32 * statistics.median(reps)},
           "sensitivity_estimate_8b_gb": {k: v / 1e9 for k, v in est.parts.items()},
           "sensitivity_estimate_8b_total_gb": est.total / 1e9,
           "sens_states_cap_gb": budget.SENS_STATES_BYTES / 1e9,
           "note": "random weights (llama3-8b shape, 1 layer for the timing; meta tensors for the estimate); "
                   "the timing is of this machine's CPU"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: rec[k] for k in rec if k not in ("environment",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
