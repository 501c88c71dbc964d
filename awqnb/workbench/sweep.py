"""Sweeps: a grid of report runs, each known by the hash of its config, run in this process or on Ray.

A grid (awqnb.workbench.grid) expands to `RunSpec`s, each known by the SHA-256 of everything that
decides its result; its directory is `<out>/<model>/<tag>_<id>/` (awqnb.workbench.rundir).

Resume: a run whose directory holds a complete `run.json` in state 'ok' is skipped (`force` redoes
it); a failed or interrupted run is redone. A run is built in a hidden temporary directory, its
`run.json` (with the size of every file it lists) is written last, and the directory is renamed into
place, so a half-written run never shows as done.

Two sweeps may share an output directory: a run is claimed with an advisory lock on
`<out>/<model>/.<name>.claim` (flock: released by the kernel when its holder dies, so an
interrupted sweep leaves no stale lock). A sweep that finds a run claimed waits for the other
sweep's result instead of computing it twice; the index is rewritten under a lock of its own.
Locks are local to one file system: sweeps on different hosts sharing a network directory may
both compute a run (the second result replaces the first, nothing is lost).

Executors: 'local' runs the notebooks one after another here; 'ray' submits each run as a Ray task
with its resource request (`cpus_per_run`, `gpus_per_run`, fractions allowed) and lets Ray schedule
and retry it (`max_retries`, for crashed workers: a failing notebook is a result, not retried). The
task returns the run's files to the driver, which commits them: the cluster needs no shared disk.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping

from awqnb.core.errors import AwqnbError
from awqnb.core.files import clean_stale, is_write_error, temp_prefix, write_error_text
from awqnb.workbench import notebook_run, report_index
from awqnb.workbench.execute import BARS, execute_run, failed_result, make_payload
from awqnb.workbench.grid import Grid, RunSpec, expand
from awqnb.workbench.ray_runner import check_ray, run_ray
from awqnb.workbench.report import RUN_FILE, read_json_file
from awqnb.workbench.rundir import INDEX_LOCK, Claim, commit, index_lock, run_state, write_index

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


# --- the sweep ------------------------------------------------------------------------------

@dataclass
class SweepRun:
    """One run of a sweep as it ended: state 'ok' / 'failed' / 'interrupted', whether it was
    skipped (already complete) or finished by another sweep, its directory and error."""
    spec: RunSpec
    state: str
    dir: Path | None
    error: str | None = None
    skipped: bool = False
    by_other: bool = False

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class SweepResult:
    index: Path
    runs: list[SweepRun]
    sweep_id: str
    seconds: float

    @property
    def failed(self) -> list[SweepRun]:
        return [r for r in self.runs if not r.ok]

    @property
    def executed(self) -> list[SweepRun]:
        return [r for r in self.runs if not r.skipped and not r.by_other]


def _outcome_from_disk(out: Path, spec: RunSpec, **kw) -> SweepRun:
    d = out / spec.model_dir / spec.name
    rec = read_json_file(d / RUN_FILE)
    return SweepRun(spec, run_state(d) or "interrupted", d if d.exists() else None, rec.get("error"), **kw)


def _committed(d: Path):
    rec = read_json_file(d / RUN_FILE)
    return rec.get("sweep"), rec.get("committed")



class _Committer:
    """Commits results, releases claims, keeps the index current."""

    def __init__(self, out: Path, sweep_id: str, bar, total: int):
        self.out, self.sweep_id, self.bar, self.total, self.n = out, sweep_id, bar, total, 0

    def __call__(self, spec: RunSpec, claim: Claim, result: Mapping) -> SweepRun:
        try:
            d = commit(self.out, spec, result, self.sweep_id)
        finally:
            claim.release(done=True)
        rec = result["record"]
        self.n += 1
        if rec.get("state") != "ok":
            log.error("run %s failed: %s", spec.rel, rec.get("error"))
        else:
            log.info("run %d/%d ok: %s (%.1f s)", self.n, self.total, spec.rel, rec.get("seconds") or 0)
        self.bar.update(1)
        try:
            write_index(self.out)
        except OSError as e:
            log.error("could not update %s: %s", self.out / "index.html", e)
        return SweepRun(spec, rec.get("state") or "failed", d, rec.get("error"))


def run_sweep(grid: Grid, output_dir: str | Path = "reports", executor: str = "local", *, force: bool = False,
              ray_address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float | None = None,
              max_retries: int = 1, hide_code: bool = False, timeout: int | None = None, bars: str | None = None,
              ray_num_cpus: int | None = None) -> SweepResult:
    """Run every run of `grid` that is not complete yet into `output_dir`; see the module docstring.

    Everything that can be checked is checked before the first run (grid, kernel, Ray address and
    resources). A failing run is kept and does not stop the others; KeyboardInterrupt stops the
    sweep (runs done so far stay; the rest show as interrupted) and is re-raised.
    bars: 'std' (terminal bars), 'ray' (Ray's progress display), 'log' (plain timestamped lines
    with a heartbeat at least every 30 s: a log file), 'none'; default: by executor on a terminal,
    'log' when stderr is not one.
    """
    if executor not in EXECUTORS:
        raise AwqnbError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}.")
    t0 = time.perf_counter()
    specs = expand(grid)
    notebook_run.kernel_name()
    out = Path(output_dir)
    from awqnb.model.saving import check_writable  # local: this module loads without torch

    check_writable(out)  # a file in the way, read-only or full: refused before any notebook starts
    env: dict[str, str] = {}
    if executor == "ray":
        gpus = check_ray(ray_address, cpus_per_run, gpus_per_run, ray_num_cpus)
        if gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only task must not reach for a GPU Ray gave someone else
    if bars is None:  # bars redraw in place on a terminal; a log file gets plain lines
        bars = ("ray" if executor == "ray" else "std") if sys.stderr.isatty() else "log"
    if bars not in BARS:
        raise AwqnbError(f"unknown bars {bars!r}; use one of {', '.join(BARS)}.")
    sweep_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    # what this sweep adds around its runs, taken away again if it cannot finish (disk full)
    made = [p for p in (out, *out.parents) if not p.exists()]
    existed = {p: p.exists() for p in [out / INDEX_LOCK, out / "index.html"] + [out / s.model_dir for s in specs]}
    for d in {out / s.model_dir for s in specs}:
        clean_stale(d)  # runs of sweeps that were killed while committing
    clean_stale(tempfile.gettempdir(), legacy=True, runs=True)  # their work directories

    from tqdm.std import tqdm as std_tqdm

    results: dict[str, SweepRun] = {}
    todo: list[tuple[RunSpec, Claim]] = []
    waiting: list[tuple[RunSpec, tuple]] = []
    claims: list[Claim] = []
    bar = committer = saved = None
    aborted = interrupted = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        if existed[out / "index.html"]:  # a second name for the index as it is (no space needed): put back on failure
            saved = out / (temp_prefix("index.html", "old") + uuid.uuid4().hex[:8])
            try:
                os.link(out / "index.html", saved)
            except OSError:
                saved = None
        for spec in specs:
            d = out / spec.model_dir / spec.name
            before = _committed(d)
            if not force and run_state(d) == "ok":
                results[spec.run_id] = _outcome_from_disk(out, spec, skipped=True)
                continue
            claim = Claim(out, spec)
            if not claim.try_acquire(sweep_id):
                waiting.append((spec, before))
            elif _committed(d) != before and run_state(d) == "ok":  # another sweep finished it just now
                claim.release(done=True)
                results[spec.run_id] = _outcome_from_disk(out, spec, by_other=True)
            else:
                todo.append((spec, claim))
                claims.append(claim)
        log.info("sweep %s: %d run(s): %d complete (skipped), %d to run, %d claimed by another sweep; executor %s",
                 sweep_id, len(specs), len(results), len(todo), len(waiting), executor)
        bar = std_tqdm(total=len(specs), initial=len(results), desc="sweep runs", file=sys.stderr,
                       dynamic_ncols=True, disable=bars in ("none", "log"))
        committer = _Committer(out, sweep_id, bar, len(todo) + len(waiting))
        write_index(out)
        pending = todo
        run = run_ray if executor == "ray" else _run_local
        while pending or waiting:
            for r in run(pending, committer, bars, hide_code, timeout, env, cpus_per_run,
                         gpus if executor == "ray" else 0, max_retries):
                results[r.spec.run_id] = r
            pending = []
            # runs another sweep holds: wait for its result; if it was interrupted, run it here
            for spec, before in waiting:
                d = out / spec.model_dir / spec.name
                claim = Claim(out, spec)
                claim.try_acquire(sweep_id, block=True)
                if run_state(d) is not None and _committed(d) != before:
                    claim.release(done=True)
                    results[spec.run_id] = _outcome_from_disk(out, spec, by_other=True)
                    bar.update(1)
                else:  # the other sweep was interrupted: run it here
                    claims.append(claim)
                    pending.append((spec, claim))
            waiting = []
    except KeyboardInterrupt:
        interrupted = True
        for claim in claims:
            claim.release(done=False)
        log.warning("sweep %s interrupted: %d of %d run(s) complete; rerun the same command to finish it",
                    sweep_id, sum(1 for r in results.values() if r.state in ("ok", "failed")), len(specs))
        raise
    except Exception as e:  # e.g. the disk filled up: complete runs stay, nothing else of this sweep does
        aborted = True
        for claim in claims:
            claim.release(done=True)
        _take_back(out, made, existed, saved, committer.n if committer is not None else 0)
        saved = None
        if is_write_error(e):
            raise AwqnbError(f"could not write under {out} ({write_error_text(e)}); runs completed before are "
                             "kept, nothing else of this sweep is. Free some space and rerun the same "
                             "command.") from e
        raise
    finally:
        if bar is not None:
            bar.close()
        if not aborted:
            try:
                index = write_index(out)
            except OSError as e:
                if not interrupted:  # (the interruption in flight says more)
                    raise AwqnbError(f"could not write {out / 'index.html'} ({write_error_text(e)}); every run "
                                     "is complete, rerun the same command to write the index.") from e
                index = out / "index.html"
        if saved is not None:
            saved.unlink(missing_ok=True)
    runs = [results.get(s.run_id) or SweepRun(s, "interrupted", None, None) for s in specs]
    res = SweepResult(index, runs, sweep_id, time.perf_counter() - t0)
    if res.failed:
        log.warning("%d of %d run(s) failed", len(res.failed), len(runs))
    return res


def _take_back(out: Path, made: list[Path], existed: Mapping[Path, bool], saved: Path | None,
               committed: int) -> None:
    """After a failed sweep: put back the index as it was (`saved`: its second name) if no run was
    committed, else bring it up to date; remove what the sweep added that holds no run (an index of
    nothing, its lock, empty model directories, the folders it made)."""
    try:
        if committed == 0 and saved is not None:
            with index_lock(out):
                os.replace(saved, out / "index.html")
        elif committed or (report_index.find_runs(out) if out.is_dir() else []) or existed.get(out / "index.html"):
            write_index(out)
        else:
            with index_lock(out, remove=not existed.get(out / INDEX_LOCK)):
                (out / "index.html").unlink(missing_ok=True)
    except OSError as e:  # still full: the index stays as it is (whole: written atomically)
        log.debug("could not update %s: %s", out / "index.html", e)
    finally:
        if saved is not None:
            saved.unlink(missing_ok=True)
    for p, was in existed.items():
        if not was and p.name != "index.html" and p.name != INDEX_LOCK:
            try:
                p.rmdir()  # only if empty
            except OSError:
                pass
    for p in made:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break


def _run_local(pending, committer, bars, hide_code, timeout, env, cpus, gpus, max_retries) -> Iterable[SweepRun]:
    for spec, claim in pending:
        log.info("run %d/%d starting: %s", committer.n + 1, committer.total, spec.rel)
        try:
            result = execute_run(make_payload(spec, bars, hide_code, timeout, env))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001  trouble outside the notebook must not stop the sweep
            log.error("run %s could not run: %s: %s", spec.rel, type(e).__name__, e)
            result = failed_result(spec, f"{type(e).__name__}: {e}")
        yield committer(spec, claim, result)
