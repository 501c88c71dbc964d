"""Why is a gate_up α→loss curve jagged? Split its loss over the MLP's intermediate channels.

For one block's MLP and its FP inputs (the block engine's walk, then the block's own attention),
quantize gate_proj/up_proj as the awq search does for each α and attribute the MLP output error
to intermediate channels with the diagonal approximation
  share_i(α) = Σ_t Δh_ti² · ‖W_down[:, i]‖² / Σ_j (same),   Δh = act(x Ŵgᵀ)·(x Ŵuᵀ) − act(x Wgᵀ)·(x Wuᵀ)
and print, per α, the loss (mean over tokens of ‖ΔMLP(x)‖²), its share carried by the 10 worst tokens
and by the top intermediate channels.

  python bench/probes/alpha_probe.py --model smollm2-135m --layer 28 --group-size 64 --n-calib 32
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.func import functional_call

from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.core.config import QuantConfig
from awqnb.model.data import load_calibration
from awqnb.analysis.layer_local import capture_layer_inputs
from awqnb.quant.methods.awq import scaled_fake_quant, scales_for
from awqnb.quant.methods.praq import block_activation
from awqnb.model.loading import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=28)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--alphas", default="0,0.05,0.1,0.15,0.2,0.35,0.5")
    args = p.parse_args(argv)
    model, tok = load_model(args.model, dtype="float32")
    calib = load_calibration(tok, "wikitext2", n_calib=args.n_calib, seqlen=512, seed=args.seed)
    hidden, kw = capture_layer_inputs(model, calib, args.layer, batch_size=16)
    spec = resolve_spec(model)
    blk = blocks(model, spec)[args.layer]
    mlp_norm = next(g.prev_op for g in spec.groups if g.name == "gate_up")
    with torch.no_grad():
        xs = []
        for hs, k in zip(hidden, kw):
            attn = blk.self_attn(hidden_states=blk.input_layernorm(hs), **k)[0]
            if hasattr(blk, "post_attention_layernorm") and mlp_norm != "post_attention_layernorm":
                attn = blk.post_attention_layernorm(attn)  # Gemma: norm after attention, before the residual
            xs.append(get_module(blk, mlp_norm)(hs + attn).reshape(-1, hs.shape[-1]))
        x = torch.cat(xs)
        mlp = blk.mlp
        _, act, _ = block_activation(blk, spec)
        a = x.pow(2).mean(0).sqrt()  # L2 salience
        q = QuantConfig(4, args.group_size)
        ref = mlp(x)
        h0 = act(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        wd2 = mlp.down_proj.weight.pow(2).sum(0)
        out = [f"{args.model} layer {args.layer} gate_up, W4 g{args.group_size}, {x.shape[0]} calibration tokens "
               f"(WikiText-2 validation, seed {args.seed}), fp32, CPU",
               "| α | loss | loss / RTN | 10 worst tokens' share | top intermediate channels (share) |",
               "|---|---|---|---|---|"]
        rtn = None
        for alpha in [float(v) for v in args.alphas.split(",")]:
            s = scales_for(a, alpha, None)
            g = scaled_fake_quant(mlp.gate_proj.weight, s, q)
            u = scaled_fake_quant(mlp.up_proj.weight, s, q)
            e = (functional_call(mlp, {"gate_proj.weight": g, "up_proj.weight": u}, (x,)) - ref).pow(2).sum(1)
            loss = float(e.mean())
            rtn = rtn or loss
            dh = act(x @ g.T) * (x @ u.T) - h0
            contrib = dh.pow(2).sum(0) * wd2
            top = contrib.topk(3)
            chans = ", ".join(f"{i} ({v / contrib.sum():.2f})" for i, v in zip(top.indices.tolist(), top.values))
            out.append(f"| {alpha:g} | {loss:.4g} | {loss / rtn:.3f} | {float(e.topk(10).values.sum() / e.sum()):.3f} "
                       f"| {chans} |")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
