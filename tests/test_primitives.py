"""Primitives against hand-computed values (METHODS.md convention)."""
import pytest
import torch

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import (compute_qparams, dequantize, fake_quant, group_view, n_groups, quantize,
                                   qrange)


def test_asymmetric_4bit_hand_values():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    cfg = QuantConfig(bits=4, group_size=4)
    scale, zero = compute_qparams(w, cfg)
    # scale = (2 - (-1)) / 15 = 0.2; zero = round(1 / 0.2) = 5
    assert scale.item() == pytest.approx(0.2)
    assert zero.item() == 5
    q = quantize(w, scale, zero, cfg)
    # round(w / 0.2) + 5 = [-5, 0, 2.5→2 (round half to even), 10] + 5
    assert q.tolist() == [[0.0, 5.0, 7.0, 15.0]]
    assert dequantize(q, scale, zero, cfg)[0].tolist() == pytest.approx([-1.0, 0.0, 0.4, 2.0])


def test_symmetric_4bit_hand_values():
    w = torch.tensor([[-0.7, 0.1, 0.35, 0.2]])
    cfg = QuantConfig(bits=4, group_size=-1, symmetric=True)
    scale, zero = compute_qparams(w, cfg)
    assert scale.item() == pytest.approx(0.1)  # absmax 0.7 / 7
    assert zero.item() == 0
    q = quantize(w, scale, zero, cfg)
    assert q.tolist() == [[-7.0, 1.0, 4.0, 2.0]]  # 3.5 rounds to even 4
    assert qrange(cfg) == (-7, 7)


def test_partial_last_group_uses_only_its_channels():
    # ci = 6, g = 4: groups [0..3] and [4, 5]
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -10.0, 10.0]])
    cfg = QuantConfig(bits=2, group_size=4)
    assert n_groups(6, 4) == 2
    scale, zero = compute_qparams(w, cfg)
    assert scale[0].tolist() == pytest.approx([1.0, 20.0 / 3])
    assert group_view(w, 4).shape == (1, 2, 4)
    wq = fake_quant(w, cfg)
    # first group exactly representable on its own grid
    assert wq[0, :4].tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # second group: scale 20/3, zero = round(1.5) = 2 (half to even), so -10 → q 0 → -40/3
    assert wq[0, 4:].tolist() == pytest.approx([-40.0 / 3, 20.0 / 3])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_error_bounded(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    cfg = QuantConfig(bits=bits, group_size=64, symmetric=sym)
    scale, zero = compute_qparams(w, cfg)
    q = quantize(w, scale, zero, cfg)
    lo, hi = qrange(cfg)
    assert q.min() >= lo and q.max() <= hi
    assert torch.equal(q, q.round())
    err = (dequantize(q, scale, zero, cfg) - w).abs()
    s_full = scale[:, torch.arange(200) // 64]
    # nearest rounding: at most half a step, except where the asymmetric zero was clamped
    assert (err <= 0.5 * s_full + 1e-6).float().mean() > 0.99


def test_fake_quant_keeps_dtype_and_more_bits_is_closer():
    torch.manual_seed(1)
    w = torch.randn(8, 128, dtype=torch.bfloat16)
    assert fake_quant(w, QuantConfig(4, 32)).dtype == torch.bfloat16
    wf = w.float()
    e = [(fake_quant(wf, QuantConfig(b, 32)) - wf).pow(2).mean() for b in (2, 3, 4, 8)]
    assert e[0] > e[1] > e[2] > e[3]


def test_bad_configs_are_clear_errors():
    with pytest.raises(AwqnbError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(AwqnbError, match="group_size"):
        QuantConfig(group_size=0)
    with pytest.raises(AwqnbError, match="larger than"):
        fake_quant(torch.randn(4, 32), QuantConfig(4, 64))
