"""Audit the published results against bench/results/ under the calibrated verdict rule (awqnb.analysis.stats).

Two checks, both from the stored per-window NLLs (the comparison JSON files and results.json):

1. README.md's method table (## Methods): every figure in the two model columns (ppl mean ± sd,
   delta % and its 95% interval, the verdict words, the share of the RTN→FP gap, quantize
   seconds, the ratios) is recomputed here and compared cell by cell with what the README prints:
   the numbers in the cell, in order, its verdict words and its bold marks. A row the README has
   and this script does not know (a figure it cannot recompute) is a mismatch too.
2. Every verdict published in README.md and bench/README.md is re-judged, and bench/README.md's
   section "Verdicts re-judged under the calibrated rule" must hold exactly the table this script
   renders (`--table` prints it).

Exit status 0: everything matches; 1: a mismatch (each printed); 2: a results file is missing.

  python bench/audit.py            # check (CI: tests/test_audit.py)
  python bench/audit.py --table    # print the re-judged table
  python bench/audit.py --cells    # print the method table's expected model-column cells
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

from awqnb.analysis import stats
from awqnb.analysis.evaluate import PerplexityResult
from awqnb.compare.comparison import Comparison

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench" / "results"

COMPARISONS = {  # key → comparison JSON (every per-window NLL)
    "smol": "quality/2026-12-02_h200_smollm2-135m_g64/comparison_g64.json",  # SmolLM2 g64, 3 seeds
    "smol_more": "quality/2026-12-02_h200_smollm2-135m_g64_more/comparison_g64.json",  # the other SmolLM2 methods
    "gemma": "quality/2026-12-02_h200_gemma3-270m_g64/comparison_g64.json",  # Gemma g64, 3 seeds (merged)
    "gemma_c4ag": "quality/2026-12-02_h200_gemma3-270m_g64_run_c4ag/comparison_g64.json",  # Gemma C4 / AG News, 2 seeds (cut)
    "gemma_g128": "quality/2026-12-02_h200_gemma3-270m_g128_run/comparison_g128.json",
    "smol_g128": "quality/2026-12-02_h200_smollm2-135m_g128_run/comparison_g128.json",
    "gemma_cpu": "quality/2026-12-02_cpu_gemma3-270m_g64_reflip-rope/comparison_g64.json",  # CPU, one seed, 20 windows
    # five calibration seeds 42–46: the 3-seed runs above merged with seeds 45, 46 (bench/quality.py --merge)
    "smol5": "quality/2026-12-03_h200_smollm2-135m_g64_5seeds/comparison_g64.json",
    "gemma5": "quality/2026-12-03_h200_gemma3-270m_g64_5seeds/comparison_g64.json",
    # the compositions added with the step registry (praq_gptq, awq_gptq_reflip), same seeds 42–46
    "smol_comp": "quality/2026-12-03_h200_smollm2-135m_g64_compositions/comparison_g64.json",
    # the peers (AutoRound, HQQ) beside awq_gptq, and ar@prescale=awq (2026-12-04, two calls merged)
    "smol_peers": "quality/2026-12-04_h200_smollm2-135m_g64_peers/comparison_g64.json",
}
MERGED = {"smol5c": ("smol5", "smol_comp")}  # key → the comparison keys merged into it
RESULTS = {  # key → bench/quality.py results.json of one-seed runs (every per-window NLL)
    "smol_cpu": "quality/2026-12-02_cpu_smollm2-135m_g64_reflip-rope/results.json",  # CPU, SmolLM2, one seed, 40 windows
    "gemma_42": "quality/2026-12-02_h200_gemma3-270m_g64_seed42_awq-variants/results.json",  # Gemma seed 42
    "gemma_b42": "quality/2026-12-02_h200_gemma3-270m_g64_seed42_gptq-praq/results.json",
}


class Missing(Exception):
    pass


@lru_cache(None)
def comp(key: str) -> Comparison:
    if key in MERGED:  # merged here from stored pieces (as `bench/quality.py --merge` does)
        return Comparison.merge(*(comp(k) for k in MERGED[key]))
    p = RES / COMPARISONS[key]
    if not p.is_file():
        raise Missing(str(p))
    return Comparison.read(p)


@lru_cache(None)
def one_seed(key: str) -> dict:
    """label → dataset → PerplexityResult of a one-seed results.json."""
    p = RES / RESULTS[key]
    if not p.is_file():
        raise Missing(str(p))
    out: dict = {}
    for e in json.loads(p.read_text())["evals"]:
        out.setdefault(e["meta"]["method"], {})[e["dataset"]] = PerplexityResult.from_dict(e)
    return out


# --- figures --------------------------------------------------------------------------------

def num(x: float, nd: int = 2, sign: bool = False) -> str:
    """A number as the READMEs print it: unicode minus, '+' when `sign`."""
    s = f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"
    return s.replace("-", "−")


def shared(c: Comparison, a: str, b: str) -> bool:
    sh = {r.label for r in c.runs if r.shared}
    return a in sh and b in sh


def judge(key: str, a: str, b: str, ds: str = "wikitext2") -> stats.Interval:
    """The rule on a comparison file (key in COMPARISONS) or on one-seed results (key in RESULTS)."""
    if key in RESULTS:
        ra, rb = one_seed(key)[a][ds], one_seed(key)[b][ds]
        return stats.paired_interval({0: ra}, {0: rb}, calibrated=stats.uses_calibration(ra) or stats.uses_calibration(rb))
    c = comp(key)
    return stats.paired_interval(c.per_seed(a, ds), c.per_seed(b, ds), calibrated=not shared(c, a, b))


def one_seed_judge(key_a: str, a: str, key_b: str, b: str, ds: str = "wikitext2") -> stats.Interval:
    """Two one-seed runs of the same seed and device (e.g. gemma_42 and gemma_b42), paired by window."""
    return stats.paired_interval({0: one_seed(key_a)[a][ds]}, {0: one_seed(key_b)[b][ds]})


def iv_text(iv: stats.Interval, pct: bool = True) -> str:
    """'−2.97% [−4.38, −1.55] better' (README) or without % (bench tables)."""
    return (f"{num(iv.delta_pct, sign=True)}{'%' if pct else ''} [{num(iv.ci_low, sign=True)}, "
            f"{num(iv.ci_high, sign=True)}] {iv.verdict}")


def ms(key: str, label: str, ds: str = "wikitext2") -> str:
    v = [r.ppl for r in comp(key).per_seed(label, ds).values()]
    if len(set(v)) == 1 and any(r.shared for r in comp(key).runs if r.label == label):
        return num(v[0], 3)
    import numpy as np

    return f"{num(float(np.mean(v)), 3)} ± {num(float(np.std(v, ddof=1)), 3)}"


def ppl(key: str, label: str, ds: str = "wikitext2", seed: int | None = None, nd: int = 3) -> str:
    per = comp(key).per_seed(label, ds)
    return num(per[seed if seed is not None else min(per)].ppl, nd)


def secs(key: str, label: str) -> float:
    import numpy as np

    return float(np.mean([r.quantize_s for r in comp(key).runs if r.label == label and r.status == "ok"]))


def gap(key: str, label: str, ds: str = "wikitext2") -> str:
    """Share of the RTN→FP gap closed, mean over seeds of the ppl."""
    import numpy as np

    c = comp(key)
    m = float(np.mean([r.ppl for r in c.per_seed(label, ds).values()]))
    fp = c.per_seed("fp", ds)[c.seeds[0]].ppl
    rtn = c.per_seed("rtn", ds)[c.seeds[0]].ppl
    return num(100 * (rtn - m) / (rtn - fp), 1) + "%"


def t(key: str, label: str) -> str:
    return f"{num(secs(key, label), 1)} s"


# --- 1. README's method table ------------------------------------------------------------------

def method_cells() -> dict[str, tuple[str, str]]:
    """Row key (the first cell of README's method table) → (SmolLM2 cell, Gemma cell), the figures
    recomputed here; the README's cells must carry the same numbers, verdict words and bold."""
    S, M, G, C4, G128, S128 = "smol5", "smol_more", "gemma5", "gemma_c4ag", "gemma_g128", "smol_g128"
    SC, P = "smol5c", "smol_peers"

    def vs(key, a, b, ds="wikitext2"):  # a verdict that claims a difference is bold
        iv = judge(key, a, b, ds)
        return f"**{iv_text(iv)}**" if iv.verdict in (stats.BETTER, stats.WORSE) else iv_text(iv)

    llmc_awq_42 = comp(M).per_seed("llmc_awq", "wikitext2")
    awq_42_more = next(r for r in comp(M).runs if r.label == "awq" and r.seed == 42)
    llmc_awq_run = next(r for r in comp(M).runs if r.label == "llmc_awq")
    cells = {
        "FP": (ppl(S, "fp"), f"{ppl(G, 'fp')} / {ppl(C4, 'fp', 'c4', nd=2)} / {ppl(C4, 'fp', 'ag_news', nd=2)}"),
        "`rtn`": (ppl(S, "rtn"), f"{ppl(G, 'rtn')} / {ppl(C4, 'rtn', 'c4', nd=2)} / {ppl(C4, 'rtn', 'ag_news', nd=2)}"),
        "`awq`": (f"{ms(S, 'awq')}, {t(S, 'awq')}",
                  f"{ms(G, 'awq')}, {t(G, 'awq')} (seed 42: {ppl(C4, 'awq', seed=42, nd=2)} / "
                  f"{ppl(C4, 'awq', 'c4', seed=42, nd=2)} / {ppl(C4, 'awq', 'ag_news', seed=42, nd=2)})"),
        "`awq` reference style": (f"{ms(S, 'awq_ref')}, {vs(S, 'awq_ref', 'awq')}, {t(S, 'awq_ref')}",
                                  f"{ms(G, 'awq_ref')}, {vs(G, 'awq_ref', 'awq')}, {t(G, 'awq_ref')}"),
        "`awq_sh`": (f"{ms(S, 'awq_sh')}, {vs(S, 'awq_sh', 'awq')}, {t(S, 'awq_sh')}",
                     f"{ms(G, 'awq_sh')}, {vs(G, 'awq_sh', 'awq')}, {t(G, 'awq_sh')}"),
        "`awq_dh`": (f"{ms(S, 'awq_dh')}, {vs(S, 'awq_dh', 'awq')}, {t(S, 'awq_dh')}",
                     f"{ms(G, 'awq_dh')}, {vs(G, 'awq_dh', 'awq')}, {t(G, 'awq_dh')}"),
        "`awq_js`": (f"{ms(S, 'awq_js')}, {vs(S, 'awq_js', 'awq')}, {t(S, 'awq_js')}",
                     f"{ms(G, 'awq_js')}, {vs(G, 'awq_js', 'awq')}, {t(G, 'awq_js')}"),
        "`awq_gqa`": (f"{ms(S, 'awq_gqa')}, {vs(S, 'awq_gqa', 'awq')}, {t(S, 'awq_gqa')}; pre-RoPE objective "
                      f"(`gqa_rope=false`) {ms(S, 'awq_gqa@gqa_rope=false')}; post- against pre-RoPE "
                      f"{vs(S, 'awq_gqa', 'awq_gqa@gqa_rope=false')}",
                      f"{ms(G, 'awq_gqa')}, {vs(G, 'awq_gqa', 'awq')}, {t(G, 'awq_gqa')}"),
        "`praq`": (f"{ms(S, 'praq')}, {vs(S, 'praq', 'awq')}, {t(S, 'praq')}",
                   f"{ms(G, 'praq')}, {vs(G, 'praq', 'awq')}, {t(G, 'praq')}"),
        "`robust_praq`": (f"{ms(S, 'robust_praq')}, {vs(S, 'robust_praq', 'awq')}, {t(S, 'robust_praq')}",
                          f"{ms(G, 'robust_praq')}, {vs(G, 'robust_praq', 'awq')}, {t(G, 'robust_praq')}"),
        "`gptq`": (f"{ms(S, 'gptq')}, {vs(S, 'gptq', 'awq')}, {t(S, 'gptq')}",
                   f"{ms(G, 'gptq')}, {vs(G, 'gptq', 'awq')}, {t(G, 'gptq')}; against `llmc_gptq` "
                   f"{vs(G, 'gptq', 'llmc_gptq')}"),
        "`awq_gptq`": (f"**{ms(S, 'awq_gptq')}**, {vs(S, 'awq_gptq', 'awq')}, {t(S, 'awq_gptq')}: "
                       f"{gap(S, 'awq_gptq')} of the RTN→FP gap; against `llmc_gptq` "
                       f"{vs(S, 'awq_gptq', 'llmc_gptq')}; at g128 {ms(S128, 'awq_gptq')}, against `gptq` "
                       f"{vs(S128, 'awq_gptq', 'gptq')}",
                       f"**{ms(G, 'awq_gptq')}**, {vs(G, 'awq_gptq', 'awq')}, {t(G, 'awq_gptq')}: "
                       f"{gap(G, 'awq_gptq')} of the RTN→FP gap; against `llmc_gptq` "
                       f"{vs(G, 'awq_gptq', 'llmc_gptq')} (C4 {num(judge(C4, 'awq_gptq', 'llmc_gptq', 'c4').delta_pct, sign=True)}%, "
                       f"AG News {num(judge(C4, 'awq_gptq', 'llmc_gptq', 'ag_news').delta_pct, sign=True)}%: 2 seeds, "
                       f"{judge(C4, 'awq_gptq', 'llmc_gptq', 'c4').verdict}); at g128 {ms(G128, 'awq_gptq')}, "
                       f"against `llmc_gptq` {vs(G128, 'awq_gptq', 'llmc_gptq')}"),
        "`llmc_awq`": (f"seed 42 only: {num(llmc_awq_42[42].ppl, 3)}, {vs(M, 'llmc_awq', 'awq')}, "
                       f"{num(llmc_awq_run.quantize_s, 1)} s ({num(llmc_awq_run.quantize_s / awq_42_more.quantize_s, 0)}× "
                       f"awqnb `awq`'s {num(awq_42_more.quantize_s, 1)} s on that seed)",
                       f"{ms(G, 'llmc_awq')}, {vs(G, 'llmc_awq', 'awq')}, {t(G, 'llmc_awq')}"),
        "`llmc_gptq`": (f"{ms(S, 'llmc_gptq')}, {vs(S, 'llmc_gptq', 'awq')}, {t(S, 'llmc_gptq')}; against awqnb `gptq` "
                        f"{vs(S, 'llmc_gptq', 'gptq')}",
                        f"{ms(G, 'llmc_gptq')}, {vs(G, 'llmc_gptq', 'awq')}, {t(G, 'llmc_gptq')}"),
        "`praq_gptq`": (f"{ms(SC, 'praq_gptq')}, {vs(SC, 'praq_gptq', 'awq')}, {t(SC, 'praq_gptq')}; against "
                        f"`awq_gptq` {vs(SC, 'praq_gptq', 'awq_gptq')}", "not run"),
        "`awq_gptq_reflip`": (f"{ms(SC, 'awq_gptq_reflip')}, {vs(SC, 'awq_gptq_reflip', 'awq')}, "
                              f"{t(SC, 'awq_gptq_reflip')}; against `awq_gptq` {vs(SC, 'awq_gptq_reflip', 'awq_gptq')}",
                              "not run"),
        "`ar`": (f"{ms(P, 'ar')}, against `awq_gptq` {vs(P, 'ar', 'awq_gptq')} (C4 {vs(P, 'ar', 'awq_gptq', 'c4')}), "
                 f"{t(P, 'ar')}: {gap(P, 'ar')} of the RTN→FP gap", "not run"),
        "`hqq`": (f"{ms(P, 'hqq')}, against `awq_gptq` {vs(P, 'hqq', 'awq_gptq')}, {t(P, 'hqq')}", "not run"),
        "`ar@prescale=awq`": (f"{ms(P, 'ar@prescale=awq')}, against `ar` {vs(P, 'ar@prescale=awq', 'ar')} (C4 "
                              f"{vs(P, 'ar@prescale=awq', 'ar', 'c4')}), against `awq_gptq` "
                              f"{vs(P, 'ar@prescale=awq', 'awq_gptq')}, {t(P, 'ar@prescale=awq')}: "
                              f"{gap(P, 'ar@prescale=awq')} of the RTN→FP gap", "not run"),
        "`full_<method>`": ("", ""),
    }
    return cells


NUM = re.compile(r"[−+-]?\d+(?:[.,]\d+)*")
WORDS = ("cannot separate seeds", "within noise", "better", "worse")


def _cell_facts(cell: str) -> tuple[list[str], list[str], int]:
    plain = re.sub(r"`[^`]*`", "", cell)  # method names in backticks (gqa_rope=false, llmc_gptq) are not figures
    words = re.findall("|".join(WORDS), plain)
    return [n.replace("-", "−").replace(",", "") for n in NUM.findall(plain)], words, cell.count("**")


def readme_method_rows(text: str) -> dict[str, list[str]]:
    """First cell → cells of README's method table (the table after '## Methods' whose header starts
    '| method | what it computes |')."""
    sec = text.split("\n## Methods", 1)[1]
    lines = sec.split("\n| method | what it computes |", 1)[1].splitlines()[2:]
    rows = {}
    for ln in lines:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells
    return rows


def check_method_table(text: str) -> list[str]:
    bad = []
    rows = readme_method_rows(text)
    want = method_cells()
    for key in rows.keys() - want.keys():
        bad.append(f"README method table: row {key!r} has figures this audit cannot recompute")
    for key, (smol, gem) in want.items():
        if key not in rows:
            bad.append(f"README method table: row {key!r} is missing")
            continue
        cells = rows[key]
        for col, exp in ((2, smol), (3, gem)):
            got = cells[col] if col < len(cells) else ""
            if _cell_facts(got) != _cell_facts(exp):
                g, e = _cell_facts(got), _cell_facts(exp)
                what = "numbers" if g[0] != e[0] else "verdict words" if g[1] != e[1] else "bold marks"
                bad.append(f"README method table, {key} / {'smollm2' if col == 2 else 'gemma'}: {what} differ\n"
                           f"    README:     {got}\n    recomputed: {exp}")
    return bad


# --- 2. every published verdict, re-judged -------------------------------------------------------

# (where it is published, what was compared, how it was judged then, the key and labels to re-judge)
# `old` is the published verdict: better / worse / within noise (the old vocabulary's 'tie' is
# within noise; a bracketed interval without a word, excluding 0, is better/worse by the old rule).
PUBLISHED = [
    # SmolLM2 g64, 3 seeds (first H200 runs): bench/README table and bullets, README method table
    ("both", "SmolLM2 g64", "smol", "rtn", "awq", "worse"),
    ("both", "SmolLM2 g64", "smol", "awq_dh", "awq", "better"),
    ("both", "SmolLM2 g64", "smol", "awq_js", "awq", "better"),
    ("both", "SmolLM2 g64", "smol", "awq_gqa", "awq", "better"),
    ("bench", "SmolLM2 g64", "smol", "awq_gqa@gqa_rope=false", "awq", "better"),
    ("both", "SmolLM2 g64", "smol", "gptq", "awq", "better"),
    ("both", "SmolLM2 g64", "smol", "awq_gptq", "awq", "better"),
    ("both", "SmolLM2 g64", "smol", "llmc_gptq", "awq", "better"),
    ("bench", "SmolLM2 g64", "smol", "awq", "llmc_gptq", "worse"),
    ("bench", "SmolLM2 g64", "smol", "awq_dh", "llmc_gptq", "better"),
    ("bench", "SmolLM2 g64", "smol", "awq_js", "llmc_gptq", "within noise"),
    ("bench", "SmolLM2 g64", "smol", "awq_gqa", "llmc_gptq", "better"),
    ("bench", "SmolLM2 g64", "smol", "awq_gqa@gqa_rope=false", "llmc_gptq", "better"),
    ("both", "SmolLM2 g64", "smol", "gptq", "llmc_gptq", "within noise"),
    ("both", "SmolLM2 g64", "smol", "awq_gptq", "llmc_gptq", "better"),
    ("both", "SmolLM2 g64", "smol", "awq_gqa", "awq_gqa@gqa_rope=false", "within noise"),
    ("bench", "SmolLM2 g64", "smol", "awq_gqa", "awq_js", "within noise"),
    ("bench", "SmolLM2 g64", "smol", "awq_gqa@gqa_rope=false", "awq_js", "better"),
    # the other SmolLM2 methods (second H200 runs) (vs that run's awq)
    ("both", "SmolLM2 g64", "smol_more", "awq_ref", "awq", "within noise"),
    ("both", "SmolLM2 g64", "smol_more", "awq_sh", "awq", "better"),
    ("both", "SmolLM2 g64", "smol_more", "praq", "awq", "within noise"),
    ("both", "SmolLM2 g64", "smol_more", "robust_praq", "awq", "within noise"),
    ("both", "SmolLM2 g64, seed 42", "smol_more", "llmc_awq", "awq", "worse"),
    # Gemma g64, 3 seeds (second H200 runs)
    ("both", "Gemma g64", "gemma", "awq_ref", "awq", "within noise"),
    ("both", "Gemma g64", "gemma", "awq_sh", "awq", "better"),
    ("both", "Gemma g64", "gemma", "awq_dh", "awq", "better"),
    ("both", "Gemma g64", "gemma", "awq_js", "awq", "better"),
    ("both", "Gemma g64", "gemma", "awq_gqa", "awq", "better"),
    ("both", "Gemma g64", "gemma", "praq", "awq", "within noise"),
    ("both", "Gemma g64", "gemma", "robust_praq", "awq", "within noise"),
    ("both", "Gemma g64", "gemma", "gptq", "awq", "better"),
    ("both", "Gemma g64", "gemma", "awq_gptq", "awq", "better"),
    ("both", "Gemma g64", "gemma", "llmc_gptq", "awq", "better"),
    ("both", "Gemma g64", "gemma", "llmc_awq", "awq", "worse"),
    ("both", "Gemma g64", "gemma", "awq", "llmc_gptq", "worse"),
    ("bench", "Gemma g64", "gemma", "awq_ref", "llmc_gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq_sh", "llmc_gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq_dh", "llmc_gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq_js", "llmc_gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq_gqa", "llmc_gptq", "worse"),
    ("bench", "Gemma g64", "gemma", "praq", "llmc_gptq", "worse"),
    ("bench", "Gemma g64", "gemma", "robust_praq", "llmc_gptq", "worse"),
    ("both", "Gemma g64", "gemma", "gptq", "llmc_gptq", "better"),
    ("both", "Gemma g64", "gemma", "awq_gptq", "llmc_gptq", "better"),
    ("bench", "Gemma g64", "gemma", "llmc_awq", "llmc_gptq", "worse"),
    ("bench", "Gemma g64", "gemma", "awq_gptq", "gptq", "better"),
    ("both", "Gemma g64", "gemma", "awq_sh", "gptq", "worse"),  # README: every AWQ variant behind both GPTQs
    ("both", "Gemma g64", "gemma", "awq_dh", "gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq_js", "gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq_gqa", "gptq", "worse"),
    ("both", "Gemma g64", "gemma", "awq", "gptq", "worse"),
    ("bench", "Gemma g64", "gemma", "awq_sh", "awq_dh", "within noise"),
    ("bench", "Gemma g64", "gemma", "awq_js", "awq_dh", "within noise"),
    ("bench", "Gemma g64", "gemma", "awq_gqa", "awq_dh", "within noise"),
    ("bench", "Gemma g64", "gemma", "awq_gqa", "awq_js", "better"),
    ("bench", "Gemma g64", "gemma", "awq_sh", "awq_js", "better"),
    # Gemma C4 / AG News (2 seeds: the run was cut)
    ("bench", "Gemma g64 C4, 2 seeds", "gemma_c4ag", "awq", "llmc_gptq", "worse", "c4"),
    ("bench", "Gemma g64 AG News, 2 seeds", "gemma_c4ag", "awq", "llmc_gptq", "within noise", "ag_news"),
    ("bench", "Gemma g64 C4, 2 seeds", "gemma_c4ag", "gptq", "llmc_gptq", "within noise", "c4"),
    ("bench", "Gemma g64 AG News, 2 seeds", "gemma_c4ag", "gptq", "llmc_gptq", "within noise", "ag_news"),
    ("both", "Gemma g64 C4, 2 seeds", "gemma_c4ag", "awq_gptq", "llmc_gptq", "better", "c4"),
    ("both", "Gemma g64 AG News, 2 seeds", "gemma_c4ag", "awq_gptq", "llmc_gptq", "better", "ag_news"),
    # g128, 3 seeds (third H200 runs)
    ("bench", "Gemma g128", "gemma_g128", "awq", "gptq", "worse"),
    ("bench", "Gemma g128", "gemma_g128", "awq_gptq", "gptq", "within noise"),
    ("bench", "Gemma g128", "gemma_g128", "llmc_gptq", "gptq", "within noise"),
    ("bench", "Gemma g128", "gemma_g128", "awq_gptq", "llmc_gptq", "within noise"),
    ("bench", "SmolLM2 g128", "smol_g128", "awq", "gptq", "worse"),
    ("bench", "SmolLM2 g128", "smol_g128", "awq_gptq", "gptq", "better"),
    # the peers on SmolLM2 g64 (2026-12-04; ar and awq_gptq seeds 42–44, ar@prescale=awq 42–46)
    ("both", "SmolLM2 g64 peers", "smol_peers", "ar", "awq_gptq", "better"),
    ("both", "SmolLM2 g64 peers C4", "smol_peers", "ar", "awq_gptq", "better", "c4"),
    ("both", "SmolLM2 g64 peers", "smol_peers", "hqq", "awq_gptq", "worse"),
    ("bench", "SmolLM2 g64 peers C4", "smol_peers", "hqq", "awq_gptq", "worse", "c4"),
    ("both", "SmolLM2 g64 peers", "smol_peers", "ar@prescale=awq", "awq_gptq", "better"),
    ("bench", "SmolLM2 g64 peers C4", "smol_peers", "ar@prescale=awq", "awq_gptq", "better", "c4"),
    ("both", "SmolLM2 g64 peers", "smol_peers", "ar@prescale=awq", "ar", "within noise"),
    ("both", "SmolLM2 g64 peers C4", "smol_peers", "ar@prescale=awq", "ar", "within noise", "c4"),
    # one seed, per-window data stored: CPU ReFlip runs and the first H200 runs' Gemma seed 42
    ("bench", "Gemma g64 CPU, 1 seed", "gemma_cpu", "awq_gqa", "awq_js", "within noise"),
    ("bench", "Gemma g64 CPU, 1 seed", "gemma_cpu", "awq_gqa@gqa_rope=false", "awq_js", "worse"),
    ("bench", "Gemma g64 CPU, 1 seed", "gemma_cpu", "awq_gqa", "awq_gqa@gqa_rope=false", "better"),
    ("bench", "SmolLM2 g64 CPU, 1 seed", "smol_cpu", "awq_gqa", "awq_js", "better"),
    ("bench", "SmolLM2 g64 CPU, 1 seed", "smol_cpu", "awq_gqa@gqa_rope=false", "awq_js", "better"),
    ("bench", "SmolLM2 g64 CPU, 1 seed", "smol_cpu", "awq_gqa", "awq_gqa@gqa_rope=false", "within noise"),
]
# one seed in two runs of one session (gemma_42: the AWQ variants; gemma_b42: gptq, awq_gptq, praq)
PUBLISHED_PAIRS = [
    ("bench", "Gemma g64, seed 42 (first H200 runs)", ("gemma_42", "awq"), ("gemma_b42", "gptq"), "worse"),
    ("bench", "Gemma g64, seed 42 (first H200 runs)", ("gemma_42", "awq_ref"), ("gemma_b42", "gptq"), "worse"),
    ("bench", "Gemma g64, seed 42 (first H200 runs)", ("gemma_42", "awq_sh"), ("gemma_b42", "gptq"), "worse"),
    ("bench", "Gemma g64, seed 42 (first H200 runs)", ("gemma_42", "awq_dh"), ("gemma_b42", "gptq"), "worse"),
    ("bench", "Gemma g64, seed 42 (first H200 runs)", ("gemma_b42", "praq"), ("gemma_b42", "gptq"), "worse"),
    ("bench", "Gemma g64, seed 42 (first H200 runs)", ("gemma_b42", "awq_gptq"), ("gemma_b42", "gptq"), "better"),
]
# verdicts published without per-window data in the repo: one seed (the rule cannot separate seeds
# from method, whatever the data) or none kept
UNSTORED = [
    ("bench", "H100, one seed (`results/quality/2026-11-23_h100_*/`: summaries only)",
     "every delta with an interval excluding 0 in the H100 one-seed tables and their seed-claims paragraphs "
     "(awq vs rtn, the flip methods and PRAQ vs awq, awq_ref vs awq; 34 in all), and README's Full-PRAQ vs "
     "Full-AWQ figures", "better / worse (bold)", "cannot separate seeds (one seed); not reproducible from the repo"),
    ("both", "bf16 vs fp32 search (H200, 3 seeds, `results/seed_noise/2026-12-02_h200_smollm2-135m_dtype/dtype_noise.md`: summaries only)",
     "awq bf16 vs fp32 search +0.113 ppl [+0.079, +0.147]; awq_dh within noise", "worse; within noise",
     "not re-judged: no per-window data kept"),
]


def rejudge() -> list[dict]:
    rows = []
    for entry in PUBLISHED:
        where, what, key, a, b, old = entry[:6]
        ds = entry[6] if len(entry) > 6 else "wikitext2"
        iv = judge(key, a, b, ds)
        rows.append({"where": where, "what": what, "a": a, "b": b, "old": old, "iv": iv})
    for where, what, (ka, a), (kb, b), old in PUBLISHED_PAIRS:
        rows.append({"where": where, "what": what, "a": a, "b": b, "old": old, "iv": one_seed_judge(ka, a, kb, b)})
    for r in rows:
        r["changed"] = r["iv"].verdict != r["old"]
    return rows


def table() -> str:
    rows = rejudge()
    changed = [r for r in rows if r["changed"]]
    where = {"both": "README, bench", "bench": "bench", "README": "README"}
    out = [f"{len(rows)} published verdicts with per-window data re-judged by `python bench/audit.py`: "
           f"{len(changed)} changed, {len(rows) - len(changed)} stand. Changed:", "",
           "| where | comparison | a vs b | published | re-judged: delta % [95% CI] verdict |",
           "|---|---|---|---|---|"]
    for r in changed:
        out.append(f"| {where[r['where']]} | {r['what']} | {r['a']} vs {r['b']} | {r['old']} | {iv_text(r['iv'], pct=False)} |")
    for w, what, which, old, new in UNSTORED:
        out.append(f"| {where[w]} | {what} | {which} | {old} | {new} |")
    return "\n".join(out) + "\n"


SECTION = "## Verdicts re-judged under the calibrated rule"


def check_table(text: str) -> list[str]:
    if SECTION not in text:
        return [f"bench/README.md has no section {SECTION!r}"]
    body = text.split(SECTION, 1)[1]
    want = table()
    if want not in body:
        return ["bench/README.md's re-judged table differs from `python bench/audit.py --table`:\n" + want]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="print the re-judged table and exit")
    p.add_argument("--cells", action="store_true", help="print the method table's recomputed cells and exit")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--bench-readme", default=str(ROOT / "bench" / "README.md"))
    args = p.parse_args(argv)
    try:
        if args.table:
            sys.stdout.write(table())
            return 0
        if args.cells:
            for k, (s, g) in method_cells().items():
                sys.stdout.write(f"| {k} | … | {s} | {g} |\n")
            return 0
        bad = check_method_table(Path(args.readme).read_text(encoding="utf-8"))
        bad += check_table(Path(args.bench_readme).read_text(encoding="utf-8"))
    except Missing as e:
        sys.stderr.write(f"audit: results file missing: {e}\n")
        return 2
    for b in bad:
        sys.stdout.write(f"MISMATCH {b}\n")
    n = len(method_cells())
    sys.stdout.write(f"audit: {n} method-table rows, {len(rejudge())} re-judged verdicts: "
                     + ("all match\n" if not bad else f"{len(bad)} mismatch(es)\n"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
