"""weights_fingerprint: a sampled hash, cheap at any size, that still changes when weights do."""
import copy
import subprocess
import sys

import pytest
import torch

from awqnb.analysis import statcache
from awqnb.analysis.statcache import FINGERPRINT_SAMPLE, weights_fingerprint
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig

# a Llama whose linears (128 × 256 = 32768 elements) are larger than the sample: hashed sampled, not whole
BUILD = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).eval()
"""


def _model():
    scope = {}
    exec(BUILD, scope)  # noqa: S102  the same source the subprocess runs
    return scope["model"]


@pytest.fixture(scope="module")
def model():
    m = _model()
    w = m.model.layers[0].mlp.down_proj.weight
    assert w.numel() > 4 * FINGERPRINT_SAMPLE  # the sampled path is what is tested
    return m


def _sampled(w: torch.Tensor) -> set[int]:
    step = statcache._sample_step(w.numel(), w.shape[-1], FINGERPRINT_SAMPLE)
    return set(range(0, w.numel(), step)[:FINGERPRINT_SAMPLE])


def test_stable_across_calls_and_processes(model):
    key = weights_fingerprint(model)
    assert key == weights_fingerprint(model) == weights_fingerprint(copy.deepcopy(model))
    code = BUILD + "from awqnb.analysis.statcache import weights_fingerprint\nprint(weights_fingerprint(model))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key


def test_sample_spreads_over_rows_and_columns(model):
    w = model.model.layers[0].mlp.down_proj.weight  # [128, 256]
    idx = sorted(_sampled(w))
    assert FINGERPRINT_SAMPLE // 2 < len(idx) <= FINGERPRINT_SAMPLE  # fewer when the stride was bumped
    cols = {i % w.shape[1] for i in idx}
    rows = {i // w.shape[1] for i in idx}
    assert len(cols) == w.shape[1] and len(rows) == w.shape[0]  # every column and every row is sampled
    # a stride that is a multiple of the row length would sample one column: it is made coprime
    assert statcache._sample_step(1 << 20, 1024, 4096) % 2 == 1


def test_one_sampled_element_changes_the_key_an_unsampled_one_does_not(model):
    key = weights_fingerprint(model)
    w = model.model.layers[1].mlp.down_proj.weight
    inside = sorted(_sampled(w))[123]
    outside = next(i for i in range(w.numel()) if i not in _sampled(w))
    m = copy.deepcopy(model)
    with torch.no_grad():
        flat = m.model.layers[1].mlp.down_proj.weight.view(-1)
        flat[inside] += 1e-3
    assert weights_fingerprint(m) != key
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.view(-1)[outside] += 1e-3
    # the documented limit of a sampled key: an edit of unsampled elements only keeps the key
    assert weights_fingerprint(m) == key
    # a tensor no larger than the sample is hashed whole: any one element counts
    m = copy.deepcopy(model)
    norm = m.model.layers[1].input_layernorm.weight
    assert norm.numel() <= FINGERPRINT_SAMPLE
    with torch.no_grad():
        norm[77] += 1e-3
    assert weights_fingerprint(m) != key


def test_quantized_block_fold_and_buffers_change_the_key(model):
    key = weights_fingerprint(model)
    q = copy.deepcopy(model)
    cfg = MethodConfig("rtn", QuantConfig(4, 32), SearchConfig(n_grid=4), calib_batch_size=4)
    pipeline.quantize(q, cfg, None, progress=False, device="cpu")
    assert weights_fingerprint(q) != key
    # a fold, as AWQ does it: one layer's norm divided by s, the q/k/v columns multiplied by s
    f = copy.deepcopy(model)
    s = torch.linspace(0.5, 2.0, 128)
    layer = f.model.layers[1]
    with torch.no_grad():
        layer.input_layernorm.weight.div_(s)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight.mul_(s)
    assert weights_fingerprint(f) != key
    # buffers count too (a packed model's weights are buffers)
    b = copy.deepcopy(model)
    b.model.layers[0].mlp.register_buffer("codes", torch.zeros(8192, dtype=torch.uint8))
    kb = weights_fingerprint(b)
    b.model.layers[0].mlp.codes[0] = 3
    assert kb != key and weights_fingerprint(b) != kb


def test_dtypes_hash_their_own_bytes_and_meta_weights_are_refused(model):
    key = weights_fingerprint(model)
    bf = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_fingerprint(bf) not in (key, None)
    assert weights_fingerprint(bf) == weights_fingerprint(copy.deepcopy(bf))
    meta = copy.deepcopy(model)
    meta.lm_head.weight = torch.nn.Parameter(torch.empty(512, 128, device="meta"))
    with pytest.raises(AwqnbError, match="meta device"):
        weights_fingerprint(meta)
