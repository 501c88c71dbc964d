"""Progress of a notebook run, seen from outside the kernel.

A report runs in a Jupyter kernel, so its tqdm bars would be notebook widgets nobody watching the
terminal can see. When the runner sets `$AWQNB_PROGRESS_FILE`, the library's bars (`progress.tqdm`,
what `pipeline` and `evaluate` use) and the notebook's `stage(...)` marks append one JSON line each
to that file instead: {"stage": ...} or {"bar": desc, "n": n, "total": total, "closed": bool}. The
runner tails the file (`follow`) and draws the bars where its user is: a terminal, or Ray's
progress display. Without the variable, `progress.tqdm` is plain `tqdm.auto.tqdm`.

The file holds JSON only; nothing read from it is executed.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

ENV = "AWQNB_PROGRESS_FILE"


def _emit(event: dict) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        # one short append per event: whole lines, even with two writers
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
    except OSError:
        pass  # progress is a courtesy; never fail a run over it


class _EventBar(_std_tqdm):
    """A tqdm whose every refresh becomes an event line (rate-limited by tqdm's own mininterval)."""

    def __init__(self, *args, **kwargs):
        kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115  closed in close()
        kwargs.setdefault("mininterval", 0.5)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        _emit({"bar": self.desc or "", "n": self.n, "total": self.total, "closed": False})
        return True

    def close(self):
        if not getattr(self, "disable", True) and not getattr(self, "_awqnb_closed", False):
            self._awqnb_closed = True
            _emit({"bar": self.desc or "", "n": self.n, "total": self.total, "closed": True})
        f = self.fp
        super().close()
        if not f.closed:
            f.close()


def tqdm(*args, **kwargs):
    """`tqdm.auto.tqdm`, or an event-writing bar when a runner watches ($AWQNB_PROGRESS_FILE)."""
    if os.environ.get(ENV) and not kwargs.get("disable", False):
        return _EventBar(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)


def stage(name: str) -> None:
    """Mark the start of a stage of the run ("awq: quantize", "fp: evaluate")."""
    _emit({"stage": str(name)})


def watching() -> bool:
    """True when a runner tails this process's progress (the notebook may then turn bars on)."""
    return bool(os.environ.get(ENV))


class follow:
    """Tail a progress file in a thread and draw its bars with `make_bar(desc, total)` (any
    tqdm-like class: `tqdm.std.tqdm`, `ray.experimental.tqdm_ray.tqdm`). Used as a context
    manager around the notebook run; bars are closed on exit.

    prefix: put before every bar's description (which run it belongs to).
    """

    def __init__(self, path: str | Path, make_bar: Callable, prefix: str = "", poll_s: float = 0.25):
        self.path, self.make_bar, self.prefix, self.poll_s = Path(path), make_bar, prefix, poll_s
        self._stop = threading.Event()
        self._bars: dict[str, object] = {}
        self._stage = ""
        self._thread = threading.Thread(target=self._run, name="awqnb-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()  # the last lines written before the kernel finished
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        return False

    # --- reading ---
    _pos = 0
    _buf = ""

    def _drain(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._pos)
                chunk = f.read()
                self._pos = f.tell()
        except OSError:
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self._handle(ev)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain()
            time.sleep(self.poll_s)

    def _handle(self, ev: dict) -> None:
        if "stage" in ev:
            self._stage = str(ev["stage"])
            return
        desc = str(ev.get("bar", ""))
        key = f"{self._stage}|{desc}"
        bar = self._bars.get(key)
        if bar is None:
            label = " ".join(s for s in (self.prefix, self._stage, desc) if s)
            total = ev.get("total")
            bar = self.make_bar(desc=label, total=int(total) if total is not None else None)
            self._bars[key] = bar
        n = int(ev.get("n") or 0)
        if n > bar.n:
            bar.update(n - bar.n)
        if ev.get("closed"):
            bar.close()
            del self._bars[key]
