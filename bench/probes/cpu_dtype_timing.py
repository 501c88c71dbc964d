"""AWQ on smollm2-135m truncated to K blocks, 16 x 512 calibration (seed 0), n_grid 20, group 64, CPU:
compute dtype bf16 vs float32, interleaved, R repeats; per-block seconds (scale x30 for the full model).

  python bench/probes/cpu_dtype_timing.py 2 3 bfloat16,float32   # K blocks, R repeats, dtypes"""
import copy, sys, time, torch
from awqnb.model.loading import load_model
from awqnb.model.data import load_calibration
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
K = int(sys.argv[1]); R = int(sys.argv[2]); dts = sys.argv[3].split(",")
model, tok = load_model("smollm2-135m")
model.model.layers = model.model.layers[:K]; model.config.num_hidden_layers = K
calib = load_calibration(tok, "wikitext2", n_calib=16, seqlen=512, seed=0)
print("threads", torch.get_num_threads(), flush=True)
for r in range(R):
    for dt in dts:
        q = copy.deepcopy(model)
        cfg = MethodConfig("awq", quant=QuantConfig(group_size=64), search=SearchConfig(n_grid=20), dtype=dt)
        t = time.perf_counter()
        res = pipeline.quantize(q, cfg, calib, device="cpu", progress=False)
        tot = time.perf_counter() - t
        per = [round(l.seconds, 2) for l in res.layers]
        ph = {k: round(v, 2) for k, v in res.timings.items() if isinstance(v, float)}
        print(f"rep {r} dtype {dt} -> {res.timings['compute_dtype']} total {tot:.1f}s per-block {per} {ph}", flush=True)
