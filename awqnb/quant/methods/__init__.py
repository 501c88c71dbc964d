"""Quantization methods, by name: each one line, a composition of steps (base.py).

salience: Activation (L1/L2, base.py), PRAQ, RobustPRAQ (praq.py)
scaler:   Clip (the clip search), AWQGrid (α search, fold, clip) (awq.py)
rounder:  Nearest (base.py), HeuristicFlip, DynamicFlip, JamesSteinFlip (rounding.py), GPTQ (gptq.py)
refiners: ReFlip (gqa.py)
"""
from awqnb.quant.methods.awq import AWQGrid, Clip
from awqnb.quant.methods.base import REGISTRY, Activation, BlockContext, Method, Nearest, Step, get_method, register
from awqnb.quant.methods.gptq import GPTQ
from awqnb.quant.methods.gqa import ReFlip
from awqnb.quant.methods.praq import PRAQ, RobustPRAQ
from awqnb.quant.methods.rounding import DynamicFlip, HeuristicFlip, JamesSteinFlip

register("rtn", "Round-to-nearest Q(W) of every block linear: the floor other methods are measured against.",
         rounder=Nearest())
register("awq", "Activation-aware scaling (L1/L2 salience, α grid per scale group, fold, clip), then round-to-nearest.",
         salience=Activation(), scaler=AWQGrid(), rounder=Nearest())
register("awq_sh", "AWQ scaling, then heuristic-guided global greedy rounding (static top-% outliers).",
         salience=Activation(), scaler=AWQGrid(), rounder=HeuristicFlip())
register("awq_dh", "AWQ scaling, then greedy flips with knee outliers and a per-row flip cap (dynamic heuristic).",
         salience=Activation(), scaler=AWQGrid(), rounder=DynamicFlip())
register("awq_js", "AWQ scaling, then greedy flips against a James-Stein shrunk mean input.",
         salience=Activation(), scaler=AWQGrid(), rounder=JamesSteinFlip())
register("awq_gqa", "awq_js, then ReFlip of q_proj against the (post-RoPE) attention-score error.",
         salience=Activation(), scaler=AWQGrid(), rounder=JamesSteinFlip(), refiners=(ReFlip(),))
register("praq", "AWQ whose α search is driven by post-activation, risk-aware importance; round-to-nearest.",
         salience=PRAQ(), scaler=AWQGrid(), rounder=Nearest())
register("robust_praq", "praq with its importance averaged over noisy copies of the inputs.",
         salience=RobustPRAQ(), scaler=AWQGrid(), rounder=Nearest())
register("gptq", "Hessian-based error-compensating rounding (GPTQ) after the clip search, no scale search.",
         scaler=Clip(), rounder=GPTQ())
register("awq_gptq", "AWQ's α search and fold, then GPTQ rounding of the scaled weights against H of x/s.",
         salience=Activation(), scaler=AWQGrid(), rounder=GPTQ())
# combinations no class existed for
register("praq_gptq", "praq's importance drives the AWQ α search, then GPTQ rounding of the scaled weights.",
         salience=PRAQ(), scaler=AWQGrid(), rounder=GPTQ())
register("awq_gptq_reflip", "awq_gptq, then ReFlip of q_proj's GPTQ codes against the attention-score error.",
         salience=Activation(), scaler=AWQGrid(), rounder=GPTQ(), refiners=(ReFlip(),))

__all__ = ["REGISTRY", "BlockContext", "Method", "Step", "get_method", "register", "Activation", "Nearest",
           "AWQGrid", "Clip", "GPTQ", "ReFlip", "PRAQ", "RobustPRAQ", "HeuristicFlip", "DynamicFlip",
           "JamesSteinFlip"]
