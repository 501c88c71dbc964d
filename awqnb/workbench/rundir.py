"""Runs of a sweep on disk: a run's state, its claim (an advisory lock), committing its files into
place (`run.json` last), and the index rewritten under a lock of its own.

A run is built in a hidden temporary directory, its `run.json` (with the size of every file it
lists) is written last, and the directory is renamed into place, so a half-written run never shows
as done. A run is claimed with an advisory lock on `<out>/<model>/.<name>.claim` (flock: released
by the kernel when its holder dies, so an interrupted sweep leaves no stale lock).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, current_umask, is_write_error, temp_prefix, write_error_text
from awqnb.workbench import report_index
from awqnb.workbench.grid import RunSpec
from awqnb.workbench.report import RUN_FILE, clean_json, manifest_ok, read_json_file

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".claim"
INDEX_LOCK = ".index.lock"


def run_state(run_dir: Path) -> str | None:
    """'ok' / 'failed' / ... for a complete run directory; None when absent or incomplete."""
    rec = read_json_file(run_dir / RUN_FILE)
    if not rec.get("complete") or not manifest_ok(run_dir, rec):
        return None
    return rec.get("state")


class Claim:
    """An advisory lock on one run (see the module docstring)."""

    def __init__(self, out: Path, spec: RunSpec):
        self.path = out / spec.model_dir / f".{spec.name}{CLAIM_SUFFIX}"
        self.spec = spec
        self.fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())

    def try_acquire(self, sweep_id: str, block: bool = False) -> bool:
        """Take the claim (waiting for its holder to let go when `block`); False if someone holds it."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        info = {"model": self.spec.model, "run": self.spec.name, "run_id": self.spec.run_id, "sweep": sweep_id,
                "notebook": self.spec.notebook.stem, "parameters": self.spec.params, "host": socket.gethostname(),
                "pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(clean_json(info)).encode(), 0)
        return True

    def release(self, done: bool) -> None:
        """Let go; a finished run's claim file goes (an interrupted one stays: the index shows it)."""
        if self.fd is None:
            return
        try:
            mine = os.fstat(self.fd).st_ino == self.path.stat().st_ino  # not a newer claim someone else made
        except OSError:
            mine = False
        if done and mine:
            self.path.unlink(missing_ok=True)
        fd, self.fd = self.fd, None  # forgotten before closing: a Ctrl-C in between must not close it twice
        os.close(fd)


@contextmanager
def index_lock(out: Path, remove: bool = False):
    """The index lock; remove: delete its file before letting go (a sweep that leaves nothing).
    A waiter that then gets the lock of the deleted file sees it is not the current one and retries."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == path.stat().st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
        if remove:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def write_index(out: Path) -> Path:
    """`report_index.write_index` under a lock: the last writer has seen every run moved in before it."""
    with index_lock(out):
        return report_index.write_index(out)


def commit(out: Path, spec: RunSpec, result: Mapping[str, Any], sweep_id: str) -> Path:
    """Write a run's files into a temporary directory, `run.json` last (with every file's size),
    then rename it into `<out>/<model>/<name>` (an older attempt there is moved aside first).
    A failed write (disk full) leaves nothing of the run and keeps an older attempt: AwqnbError."""
    model_dir = out / spec.model_dir
    tmp = old = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(spec.name), dir=model_dir))
        os.chmod(tmp, 0o777 & ~current_umask())
        sizes = {}
        for rel, data in sorted(result["files"].items()):
            p = (tmp / rel).resolve()
            if tmp.resolve() not in p.parents or rel == RUN_FILE:
                log.warning("%s: ignoring returned file %r", spec.rel, rel)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            sizes[rel] = len(data)
        rec = dict(result["record"])
        rec.update(run_id=spec.run_id, identity=spec.identity, sweep=sweep_id, files=sizes, complete=True,
                   committed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write(tmp / RUN_FILE, json.dumps(clean_json(rec), indent=1))
        dest = model_dir / spec.name
        if dest.exists():  # named like a temporary: if we die before the swap, the next sweep puts it back
            old = model_dir / (temp_prefix(spec.name, "old") + uuid.uuid4().hex[:8])
            dest.rename(old)
        tmp.rename(dest)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (model_dir / spec.name).exists():
            old.rename(model_dir / spec.name)
        if isinstance(e, Exception) and is_write_error(e):
            raise AwqnbError(f"could not write run {spec.rel} into {out} ({write_error_text(e)}); nothing of it "
                             "was kept. Free some space and rerun the same command (complete runs are "
                             "skipped).") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
