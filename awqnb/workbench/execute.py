"""One run of a sweep, executed: plain data in (the payload: notebook source, parameters), plain data
out (its run record and files), so it runs the same in this process and as a Ray task on any node."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from awqnb.core import progress
from awqnb.core.files import clean_stale, run_prefix
from awqnb.workbench import notebook_run
from awqnb.workbench.grid import RunSpec


# How the parent shows a run's progress (`bars`): 'std' tqdm bars on a terminal, with a status line
# refreshed every second; 'ray' Ray's progress display; 'log' plain timestamped lines (a log file:
# no carriage returns), with a heartbeat at least every HEARTBEAT_S; 'none' nothing.
BARS = ("std", "ray", "log", "none")
HEARTBEAT_S = 30.0


def _make_bar(kind: str):
    if kind == "ray":
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return lambda desc, total: ray_tqdm(desc=desc, total=total)
    from tqdm.std import tqdm as std_tqdm

    return lambda desc, total: std_tqdm(desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


def follow_progress(path: Path, bars: str, label: str, heartbeat_s: float = HEARTBEAT_S):
    """The `progress.follow` context that shows a run's progress file as `bars` says (see BARS)."""
    if bars == "none":
        return nullcontext()
    if bars == "log":
        return progress.follow(path, prefix=label, lines=progress.log_line(), heartbeat_s=heartbeat_s)
    status = None
    if bars == "std":
        from tqdm.std import tqdm as std_tqdm

        status = std_tqdm(total=None, bar_format="{desc}", desc=label, leave=False, file=sys.stderr,
                          dynamic_ncols=True)
    return _Closing(progress.follow(path, _make_bar(bars), prefix=label, status=status, heartbeat_s=heartbeat_s),
                    status)


class _Closing:
    """`follow`, then the status bar closed after it."""

    def __init__(self, inner, status):
        self.inner, self.status = inner, status

    def __enter__(self):
        return self.inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            if self.status is not None:
                self.status.close()


def execute_run(payload: Mapping[str, Any]) -> dict:
    """Run one notebook in a private temporary directory; return {"record": run.json fields,
    "files": {relative path: bytes}} (executed notebook, HTML, metrics.json, anything else it
    wrote). Plain data in and out, so it runs the same here and as a Ray task on any node. The work
    directory is `awqnb-run-<host>-<pid>-…`; a killed run's is removed by the next run on its host."""
    clean_stale(tempfile.gettempdir(), legacy=True, runs=True)
    with tempfile.TemporaryDirectory(prefix=run_prefix()) as work:
        work = Path(work)
        nb_in = work / "in" / payload["notebook_file"]
        nb_in.parent.mkdir()
        nb_in.write_text(payload["notebook_source"], encoding="utf-8")
        run_dir = work / "run"
        run_dir.mkdir()
        prog = work / "progress.jsonl"
        prog.touch()
        env = {progress.ENV: str(prog), **(payload.get("env") or {})}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            with follow_progress(prog, payload.get("bars", "std"), payload.get("label", ""),
                                 payload.get("heartbeat_s", HEARTBEAT_S)):
                rec = notebook_run.execute_into(nb_in, run_dir, payload["params"], model=payload["model"],
                                                methods=payload["params"].get("methods") or [],
                                                hide_code=payload.get("hide_code", False), timeout=payload.get("timeout"),
                                                kernel_log=work / "kernel.log")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        rec["host"] = socket.gethostname()
        files = {f.relative_to(run_dir).as_posix(): f.read_bytes() for f in sorted(run_dir.rglob("*")) if f.is_file()}
        return {"record": rec, "files": files}


def make_payload(spec: RunSpec, bars: str, hide_code: bool, timeout, env: Mapping[str, str]) -> dict:
    return {"notebook_file": spec.notebook.name, "notebook_source": spec.notebook.read_text(encoding="utf-8"),
            "params": spec.params, "model": spec.model, "bars": bars, "hide_code": hide_code, "timeout": timeout,
            "label": f"{spec.model} {spec.name.rsplit('_', 1)[0]}", "env": dict(env)}


def failed_result(spec: RunSpec, error: str) -> dict:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"record": {"state": "failed", "model": spec.model, "methods": spec.methods, "notebook": spec.notebook.stem,
                       "parameters": spec.params, "started": now, "finished": now, "error": error},
            "files": {}}
