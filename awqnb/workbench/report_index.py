"""`<output_dir>/index.html`: every report run found under `output_dir` (run.json, metrics.json,
and the claims of a sweep under way) with its headline numbers, newest first."""
from __future__ import annotations

import html
import logging
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Mapping

from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write
from awqnb.workbench.report import (METRICS_FILE, RUN_FILE, delta_words, manifest_ok, mean_sd, read_json_file,
                                    read_metrics)

log = logging.getLogger(__name__)


def find_runs(output_dir: str | Path) -> list[dict]:
    """Every run under `output_dir` (`<model>/<run>/` holding run.json or metrics.json), newest
    first: {dir, rel, run, model, state, error, started, notebook, html, ipynb, metrics}."""
    root = Path(output_dir)
    out = []
    for d in sorted(root.glob("*/*")):
        if d.name.startswith(".") or d.parent.name.startswith(".") or not d.is_dir():
            continue
        rec = read_json_file(d / RUN_FILE)
        has_metrics = (d / METRICS_FILE).is_file()
        if not rec and not has_metrics:
            continue
        metrics = None
        if has_metrics:
            try:
                metrics = read_metrics(d)
            except AwqnbError as e:
                log.warning("%s", e)
        nb = rec.get("notebook")
        html_f = d / f"{nb}.html" if nb else next(iter(sorted(d.glob("*.html"))), None)
        ipynb = d / f"{nb}.ipynb" if nb else next(iter(sorted(d.glob("*.ipynb"))), None)
        state = rec.get("state") or ("ok" if metrics else "unknown")
        if rec and not manifest_ok(d, rec):
            state = "incomplete"  # a file run.json lists is missing or cut short
        elif state == "ok" and metrics is None:
            state = "ok (no metrics.json)"
        out.append({"dir": d, "rel": d.relative_to(root).as_posix(), "run": d.name,
                    "model": rec.get("model") or d.parent.name, "state": state, "error": rec.get("error"),
                    "started": rec.get("started") or "", "notebook": nb,
                    "html": html_f if html_f is not None and html_f.is_file() else None,
                    "ipynb": ipynb if ipynb is not None and ipynb.is_file() else None, "metrics": metrics})
    _add_claims(root, out)
    out.sort(key=lambda r: (r["started"], r["run"]), reverse=True)
    return out


def claim_state(path: Path) -> str:
    """'running' while a sweep holds the claim on a run (its lock), 'interrupted' once nobody does."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "interrupted"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return "interrupted"
    except BlockingIOError:
        return "running"
    finally:
        os.close(fd)


def _add_claims(root: Path, runs: list[dict]) -> None:
    """Runs a sweep claimed (`<model>/.<run>.claim`, see awqnb.workbench.sweep): shown as running or
    interrupted; a finished run whose redo is under way says so in its state."""
    by_dir = {r["rel"]: r for r in runs}
    for c in sorted(root.glob("*/.*.claim")):
        rel = f"{c.parent.name}/{c.name[1:-len('.claim')]}"
        state = claim_state(c)
        info = read_json_file(c)
        if rel in by_dir:
            if state == "running" or by_dir[rel]["state"] != "ok":  # an unheld claim on a done run is spent
                by_dir[rel]["state"] += f" ({'rerunning' if state == 'running' else 'redo interrupted'})"
            continue
        runs.append({"dir": root / rel, "rel": rel, "run": rel.split("/", 1)[1], "model": info.get("model") or c.parent.name,
                     "state": state, "error": None, "started": info.get("started") or "",
                     "notebook": info.get("notebook"), "html": None, "ipynb": None, "metrics": None})


def _cell(v, fmt=None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if fmt:
        try:
            return fmt.format(v)
        except (TypeError, ValueError):
            pass
    return html.escape(str(v))


def _calib(c) -> str:
    if not c:
        return "—"
    if isinstance(c, Mapping):
        return html.escape(f"{c.get('dataset')} {c.get('n_calib')}×{c.get('seqlen')}")
    return html.escape(str(c))


def _bits(row) -> str:
    b, g = row.get("bits"), row.get("group_size")
    if b is None:
        return "—", "—"
    return f"W{b}", ("per-channel" if g == -1 else _cell(g))


def _units(m) -> str:
    """'8 windows' / '500 texts': what a perplexity is a mean over."""
    n = m.get("n_units")
    if n is None:
        return "—"
    what = "texts" if m.get("protocol") == "sample" else "windows"
    return f"{int(n)} {what}"


def _ppl(m, summ) -> str:
    """The report's headline number: mean ± sd over the calibration seeds (first-seed value for runs
    written before seeds were recorded)."""
    if summ:
        n = summ.get("n_seeds") or 1
        return f"{mean_sd(summ)}<br><small>over {n} seed{'s' if n != 1 else ''}</small>"
    return f"{_cell(m.get('ppl'), '{:.3f}')}<br><small>one run</small>"


def _delta(m, v) -> str:
    """The report's verdict against its baseline over the seeds (`awqnb.analysis.stats`); older runs:
    the first seed's Δ against FP."""
    if v is not None:
        return html.escape(delta_words(v)).replace("**", "") + f"<br><small>vs {html.escape(str(v.get('baseline')))}</small>"
    d = m.get("delta_pct")
    if d is None or (m.get("verdict") or m.get("winner")) == "(baseline)":  # (runs written before awqnb.analysis.stats: winner)
        return "—"
    return (f"{d:+.2f} [{_cell(m.get('ci_low'), '{:+.2f}')}, {_cell(m.get('ci_high'), '{:+.2f}')}]"
            "<br><small>vs fp, first seed</small>")


def index_html(runs: list[dict], root: Path) -> str:
    head = ("run", "state", "model", "method", "bits", "group size", "calibration", "dataset", "protocol",
            "seqlen", "units", "ppl: mean ± sd", "Δ % [95% CI]: verdict")
    rows = []
    for r in runs:
        link = r["html"] or r["ipynb"]
        name = html.escape(r["run"])
        run_cell = f'<a href="{html.escape(link.relative_to(root).as_posix())}">{name}</a>' if link else name
        extras = []
        if r["ipynb"] and r["html"]:
            extras.append(f'<a href="{html.escape(r["ipynb"].relative_to(root).as_posix())}">ipynb</a>')
        if r["metrics"]:
            extras.append(f'<a href="{html.escape(r["rel"])}/{METRICS_FILE}">metrics</a>')
        run_cell += (" <small>(" + ", ".join(extras) + ")</small>") if extras else ""
        if r["notebook"]:
            run_cell += f'<br><small>{html.escape(r["notebook"])}</small>'  # which report this run is
        state = html.escape(r["state"])
        cls = {"ok": "ok", "running": "running", "interrupted": "interrupted"}.get(r["state"], "failed")
        results = (r["metrics"] or {}).get("results") or []
        if not results:
            err = f'<br><small>{html.escape(r["error"])}</small>' if r["error"] else ""
            what = ("no perplexity results (see the report)" if r["metrics"] else
                    "in progress" if r["state"] == "running" else
                    "not finished: rerun the sweep to complete it" if r["state"] == "interrupted" else "no metrics")
            rows.append(f'<tr class="{cls}"><td>{run_cell}</td><td>{state}{err}</td><td>{html.escape(r["model"])}</td>'
                        + f'<td colspan="{len(head) - 3}">{what}</td></tr>')
            continue
        doc = r["metrics"]
        summ = {(s.get("label"), s.get("dataset")): s for s in doc.get("seed_summary") or []}
        verd = {(v.get("label"), v.get("dataset")): v for v in doc.get("verdicts") or []}
        fp_what = doc.get("baseline")
        verdict_base = next((v.get("baseline") for v in verd.values() if v.get("baseline")), None)
        for i, m in enumerate(results):
            bits, gs = _bits(m)
            key = (m.get("label") or m.get("method"), m.get("dataset"))
            method = _cell(m.get("method"))
            if key[0] == "fp" and fp_what:
                method += f"<br><small>{html.escape(str(fp_what))}</small>"  # what the baseline is
            delta = "(baseline)" if key[0] == verdict_base else _delta(m, verd.get(key))
            first = f"<td>{run_cell}</td><td>{state}</td>" if i == 0 else "<td></td><td></td>"
            rows.append(
                f'<tr class="{cls}">{first}<td>{_cell(m.get("model"))}</td><td>{method}</td>'
                f"<td>{bits}</td><td>{gs}</td><td>{_calib(m.get('calibration'))}</td><td>{_cell(m.get('dataset'))}</td>"
                f"<td>{_cell(m.get('protocol'))}</td><td>{_cell(m.get('seqlen'))}</td><td class=num>{_units(m)}</td>"
                f"<td class=num>{_ppl(m, summ.get(key))}</td><td>{delta}</td></tr>")
    now = datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "\n".join(rows) if rows else f'<tr><td colspan="{len(head)}">no runs yet</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>awqnb reports</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.failed td {{ background: #fff1f0; }} tr.running td {{ background: #eef6ff; }}
tr.interrupted td {{ background: #fff8e6; }}
</style></head><body>
<h1>awqnb reports</h1>
<p>{len(runs)} run(s) under <code>{html.escape(str(root))}</code>, newest first; written {now}.
Perplexity as in each report's summary: the mean ± sd over the calibration seeds of a mean over the
units listed (evaluation windows or texts, with protocol and seqlen), so a number here is comparable only
with one of the same units; Δ % and its verdict are against the report's baseline (RTN when it ran) over
the seeds, with a 95% interval (<code>awqnb.analysis.stats</code>): better / worse are beyond the noise.
FP is the model as loaded: what it is, under its name.</p>
<table><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


def write_index(output_dir: str | Path) -> Path:
    """(Re)write `output_dir/index.html` atomically from every run found; returns its path."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    return atomic_write(root / "index.html", index_html(find_runs(root), root))
