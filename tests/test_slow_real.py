"""Real pretrained model (smollm2-135m, CPU): awq must beat rtn on WikiText-2.

Small calibration (8 × 512 WikiText-2 validation tokens) and the first 2 windows of 2048 of
the WikiText-2 test set keep this to a few minutes on two CPU cores; bench/README.md has the
full-protocol figures.
"""
import copy

import pytest

from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig
from awqnb.model.data import load_calibration, load_eval_tokens
from awqnb.analysis.evaluate import token_perplexity
from awqnb.model.loading import load_model

pytestmark = pytest.mark.slow


def test_awq_beats_rtn_on_smollm2_wikitext2():
    fp, tok = load_model("smollm2-135m")
    calib = load_calibration(tok, "wikitext2", n_calib=8, seqlen=512, seed=42)
    tokens = load_eval_tokens(tok, "wikitext2")
    ppl = {"fp": token_perplexity(fp, tokens, seqlen=2048, max_windows=2, progress=False).ppl}
    for method in ("rtn", "awq"):
        m = copy.deepcopy(fp)
        pipeline.quantize(m, MethodConfig(method, QuantConfig(4, 64)), calib, progress=False)
        ppl[method] = token_perplexity(m, tokens, seqlen=2048, max_windows=2, progress=False).ppl
    assert ppl["fp"] < ppl["awq"] < ppl["rtn"], ppl
    assert ppl["awq"] < 0.97 * ppl["rtn"], ppl  # a clear margin, not noise
