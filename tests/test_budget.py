"""The memory check before a walk (awqnb.engine.budget), on a simulated small GPU (CPU only):
a run that would not fit is refused in one line naming the flags that make it fit, before any
block is onloaded; one that fits goes on; the estimate grows with the calibration set, not with
the model's depth; `awqnb eval` loads a model that would not fit on the CPU."""
import copy

import pytest
import torch

from awqnb.analysis import sensitivity as S
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.engine import budget
from awqnb.engine import walk as W
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig


def _llama(n_layers: int):
    """A tiny random Llama with `n_layers` blocks (same widths whatever the depth)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _calib(n: int, seqlen: int = 64) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def small_gpu(monkeypatch):
    """A pretend CUDA device whose free memory the test sets: `free[0]` bytes."""
    free = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (free[0], 80 * 10**9))
    return free


@pytest.fixture
def no_work(monkeypatch):
    """Records every onload (of a block or anything else) and engine walk; none must happen."""
    calls = []
    real = W.onloaded

    def spy(module, *a, **k):
        calls.append(type(module).__name__)
        return real(module, *a, **k)

    monkeypatch.setattr(W, "onloaded", spy)
    monkeypatch.setattr(pipeline, "onloaded", spy)
    monkeypatch.setattr(W.BlockEngine, "capture", lambda self: calls.append("capture") or ([], []))
    return calls


def test_estimate_grows_with_samples_not_with_depth():
    shallow, deep = _llama(2), _llama(8)
    est = {(L, n): budget.quantize_estimate(m, "cuda:0", torch.float32, _calib(n), batch_size=4).total
           for L, m in ((2, shallow), (8, deep)) for n in (8, 16)}
    assert est[(2, 8)] == est[(8, 8)] and est[(2, 16)] == est[(8, 16)]  # one block on the device at a time
    assert est[(2, 16)] > est[(2, 8)]
    # the calibration activations scale with n_samples: the difference is exactly 8 more samples' worth
    width = budget.held_width(shallow, quantizer=True)
    assert width == 4 * 64 + (64 + 64 + 64 + 96)  # in, FP out, quantized out, reference; qkv, o, gate/up, down inputs
    mask = 64 * 64 * (4 if shallow.config._attn_implementation == "eager" else 1)  # [T, T] per sample
    assert est[(2, 16)] - est[(2, 8)] == 8 * 64 * width * 4 + 8 * mask
    # offloaded, the device holds one chunk of activations: only the masks (kept there) still grow
    off = [budget.quantize_estimate(shallow, "cuda:0", torch.float32, _calib(n), 4, offload=True).total
           for n in (8, 16)]
    assert off[1] - off[0] == 8 * mask and off[0] < est[(2, 8)]
    # the engine walk (evaluation's width 2·H) does not grow with depth either
    assert (budget.walk_estimate(shallow, "cuda:0", torch.float32, 8, 64, 4, False).total
            == budget.walk_estimate(deep, "cuda:0", torch.float32, 8, 64, 4, False).total)


def test_quantize_that_would_not_fit_is_refused_before_any_work(small_gpu, no_work):
    model = _llama(2)
    calib = _calib(16)
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=2), calib_batch_size=4)
    need = budget.quantize_estimate(model, "cuda:0", torch.float32, calib, 4).total
    small_gpu[0] = need - 1
    with pytest.raises(AwqnbError) as e:
        pipeline.quantize(model, cfg, calib, device="cuda:0", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("quantizing with awq", f"{need / 1e9:.2f} GB", f"{(need - 1) / 1e9:.2f} GB is free",
                 "--offload-activations", "--calib-batch-size", "--n-calib"):
        assert part in msg, (part, msg)
    assert no_work == []  # nothing onloaded, no walk begun
    # --offload-activations makes it fit: the check passes (the walk itself needs a real GPU)
    budget.check_quantize(model, "cuda:0", torch.float32, calib, 4, offload=True)
    small_gpu[0] = need
    budget.check_quantize(model, "cuda:0", torch.float32, calib, 4)  # exactly enough: no refusal


def test_offloaded_run_that_would_not_fit_names_the_chunk(small_gpu):
    model = _llama(2)
    small_gpu[0] = 1000
    with pytest.raises(AwqnbError, match=r"smaller --calib-batch-size") as e:
        budget.check_quantize(model, "cuda:0", torch.float32, _calib(16), 4, offload=True)
    assert "--offload-activations" not in str(e.value)  # it is on already
    with pytest.raises(AwqnbError, match="pass --device cpu"):  # RTN: no calibration, one block
        budget.check_quantize(model, "cuda:0", torch.float32, None)


def test_no_check_on_the_cpu(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("mem_get_info asked for a CPU run")

    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)
    model = _llama(2)
    budget.check_quantize(model, "cpu", torch.float32, _calib(8), 4)
    budget.check_sensitivity(model, torch.device("cpu"), torch.float32, 4, 64, 2, False, 256)
    budget.check_eval(model, "cpu", "stream", 64)
    res = pipeline.quantize(model, MethodConfig("rtn", QuantConfig(4, 32)), device="cpu", progress=False)
    assert len(res.layers) == 2


def test_sensitivity_that_would_not_fit_is_refused_before_quantizing(small_gpu, monkeypatch):
    model = _llama(2)
    called = []
    monkeypatch.setattr(S, "reference", lambda *a, **k: called.append(1))
    tokens = torch.randint(0, 512, (4 * 64,), generator=torch.Generator().manual_seed(1))
    cfg = MethodConfig("rtn", QuantConfig(4, 32))
    need = budget.sensitivity_estimate(model, "cuda:0", torch.float32, 4, 64, 2, False, 2048).total
    small_gpu[0] = need - 1
    with pytest.raises(AwqnbError) as e:
        S.sensitivity(model, cfg, None, tokens, device="cuda:0", seqlen=64, n_windows=4, batch_size=2,
                      cache=False, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "the sensitivity pass needs" in msg
    assert "offload_activations=True" in msg and "n_windows" in msg and "seqlen" in msg
    assert not called  # refused before the reference quantization
    # the sensitivity pass caches every block's states: unlike the walk, its estimate grows with depth
    assert budget.sensitivity_estimate(_llama(8), "cuda:0", torch.float32, 4, 64, 2, False, 2048).total > need


def test_checkpoint_bytes_from_headers(tmp_path):
    model = _llama(2)
    model.save_pretrained(tmp_path)
    want = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once, no buffers
    assert budget.checkpoint_bytes(tmp_path) == want
    assert budget.checkpoint_bytes(tmp_path / "nowhere") is None


def test_checkpoint_bytes_of_a_packed_directory_is_its_dense_size(tmp_path):
    """A packed linear counts as the dense weight it is dequantized to at load; a safetensors file
    beside the model that is not one of its shards (e.g. the quantization record's) is not counted."""
    from awqnb.export import packed
    from awqnb.model.loading import load_model

    model, tok = load_model("tiny-random-llama")
    cfg = MethodConfig("rtn", QuantConfig(4, 32))
    res = pipeline.quantize(model, cfg, progress=False)
    d = packed.save_packed(model, tok, tmp_path / "p", cfg, res.metadata(), result=res)
    dense, _ = load_model(str(d))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1000)}, str(d / "other.safetensors"))  # not the model's: not counted
    assert budget.checkpoint_bytes(d) == sum(p.numel() * p.element_size() for p in dense.parameters())


def test_cli_eval_loads_on_the_cpu_when_the_model_would_not_fit(tmp_path, small_gpu):
    from awqnb import cli
    from awqnb.analysis.evaluate import WHOLE_FRACTION

    model = _llama(2)
    model.save_pretrained(tmp_path)
    size = budget.checkpoint_bytes(tmp_path)
    small_gpu[0] = int(size / WHOLE_FRACTION) + 1
    assert cli._eval_load_device(str(tmp_path), torch.device("cuda:0"))[0] == torch.device("cuda:0")
    small_gpu[0] = int(size / WHOLE_FRACTION) - 1
    where, why = cli._eval_load_device(str(tmp_path), torch.device("cuda:0"))
    assert where == torch.device("cpu") and "GB of weights" in why
    assert cli._eval_load_device("tiny-random-llama", torch.device("cuda:0"))[0] == torch.device("cpu")
    assert cli._eval_load_device("x", torch.device("cpu")) == (torch.device("cpu"), "cpu device: no memory check")


def test_cli_eval_that_would_not_fit_even_streamed_says_so(small_gpu, capsys, monkeypatch):
    """A GPU too small for one block and one window: the model loads on the CPU, evaluation would
    stream, and the run is refused in one line naming --seqlen, before any data is read."""
    from awqnb import cli
    from awqnb.model import data

    monkeypatch.setattr(data, "load_eval_tokens", lambda *a, **k: pytest.fail("data read before the check"))
    small_gpu[0] = 10_000
    rc = cli.main(["eval", "--model", "tiny-random-llama", "--device", "cuda:0", "--seqlen", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    line = [l for l in err if l.startswith("awqnb: error:")]
    assert len(line) == 1 and "evaluation (stream) needs about" in line[0] and "--seqlen" in line[0], err


def test_cli_eval_sample_protocol_checks_the_longest_text_not_seqlen(tmp_path, small_gpu, capsys, monkeypatch):
    """Sample batches are as long as their longest text: the check uses that (at most --seqlen), so
    a GPU that takes the short texts is not refused for a 2048-token window nobody scores."""
    from awqnb import cli
    from awqnb.analysis import evaluate
    from awqnb.model.loading import load_model

    model, tok = load_model("tiny-random-llama")
    texts = ["The cat sat on the mat.", "Stocks fell on Monday.", "A short line of text here."]
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(texts) + "\n")
    longest = max(len(tok(t, add_special_tokens=True).input_ids) for t in texts)
    short = budget.eval_estimate(model, "cuda:0", "stream", longest, 16).total
    assert budget.eval_estimate(model, "cuda:0", "stream", 2048, 16).total > short + 1
    monkeypatch.setattr(evaluate, "eval_placement", lambda *a, **k: "stream")

    class Reached(Exception):
        pass

    monkeypatch.setattr(evaluate, "sample_perplexity", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    small_gpu[0] = short + 1
    with pytest.raises(Reached):  # passed the check: evaluation was called
        cli.main(["eval", "--model", "tiny-random-llama", "--dataset", str(f), "--protocol", "sample",
                  "--device", "cuda:0", "--seqlen", "2048"])
    small_gpu[0] = short - 1
    assert cli.main(["eval", "--model", "tiny-random-llama", "--dataset", str(f), "--protocol", "sample",
                     "--device", "cuda:0", "--seqlen", "2048"]) == 2
    assert "evaluation (stream) needs about" in capsys.readouterr().err
