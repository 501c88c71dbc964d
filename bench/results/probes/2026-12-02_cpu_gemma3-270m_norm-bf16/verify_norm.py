# Usage: python verify_norm.py TOKENIZER_DIR (Gemma's tokenizer saved with transformers 5.23)
# Does evaluating a quantized Gemma with its folded (1+w) norms rounded to bf16 raise perplexity?
import copy, sys, torch
from awqnb.models import load_model, cast_parameters
from awqnb.data import load_calibration, load_eval_tokens
from awqnb.config import MethodConfig, QuantConfig
from awqnb import pipeline
from awqnb.evaluate import token_perplexity
from awqnb.engine import fp32_names
torch.set_num_threads(1)
m, tok = load_model("gemma3-270m", tokenizer=sys.argv[1])
calib = load_calibration(tok, "wikitext2", n_calib=16, seqlen=512, seed=42)
pipeline.quantize(m, MethodConfig(method="awq", quant=QuantConfig(4, 64), seed=42), calib, device="cpu", progress=False)
print("marked:", len(fp32_names(m)))
toks = load_eval_tokens(tok, "wikitext2")
a = copy.deepcopy(m); cast_parameters(a, torch.bfloat16)        # marks kept (the fix)
b = copy.deepcopy(m)
for n, p in b.named_parameters():                                # what the bench did before the fix
    p.data = p.data.to(torch.bfloat16)
for lab, x in (("fp32 norms", a), ("bf16 norms", b)):
    r = token_perplexity(x, toks, seqlen=2048, max_windows=8, device="cpu", progress=False)
    print(lab, round(r.ppl, 4))
