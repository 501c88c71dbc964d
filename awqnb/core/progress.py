"""Progress of a notebook run, seen from outside the kernel.

A report runs in a Jupyter kernel, so its tqdm bars would be notebook widgets nobody watching the
terminal can see. When the runner sets `$AWQNB_PROGRESS_FILE`, the library's bars (`progress.tqdm`,
what `pipeline`, `evaluate` and `compare` use) and the notebook's `stage(...)` marks append one JSON
line each to that file instead: {"stage": ...} or {"bar": desc, "n": n, "total": total, "closed": bool}.
Under a runner every library bar reports, those its caller disabled included (`disable` means "draw
nothing here", and nothing is drawn in the kernel): nested bars (a method's blocks, an evaluation's
windows inside the comparison) are what the runner shows between the coarse ticks.

The runner tails the file (`follow`) and shows it where its user is: bars on a terminal (or Ray's
progress display) with a status line that moves every second, or plain timestamped lines in a log
file (a stage starting, a bar finishing, and a heartbeat at least every `heartbeat_s` with the elapsed
time, the stage and the open bars' counts). Without the variable, `progress.tqdm` is plain
`tqdm.auto.tqdm`.

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
        if getattr(self, "_awqnb_closed", False):  # tqdm's close() draws once more: already reported
            return True
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
    """`tqdm.auto.tqdm`, or an event-writing bar when a runner watches ($AWQNB_PROGRESS_FILE); under a
    runner `disable` is ignored (the bar is drawn by the runner, not here; see the module docstring)."""
    if os.environ.get(ENV):
        kwargs["disable"] = False
        return _EventBar(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)


def stage(name: str) -> None:
    """Mark the start of a stage of the run ("awq: quantize", "fp: evaluate")."""
    _emit({"stage": str(name)})


def watching() -> bool:
    """True when a runner tails this process's progress (the notebook may then turn bars on)."""
    return bool(os.environ.get(ENV))


def _clock(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def log_line(stream=None) -> Callable[[str], None]:
    """A `lines` writer for `follow`: one timestamped line per call on `stream` (default stderr), no
    carriage returns (what a log file wants)."""
    import sys
    from datetime import datetime

    def write(text: str) -> None:
        f = stream if stream is not None else sys.stderr
        f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n".replace("\r", ""))
        f.flush()

    return write


class follow:
    """Tail a progress file in a thread and show it, as a context manager around the notebook run.

    Bars (a terminal): `make_bar(desc, total)` (any tqdm-like class: `tqdm.std.tqdm`,
    `ray.experimental.tqdm_ray.tqdm`) draws each bar; `status`, if given (a tqdm-like object with
    `set_description_str`), shows "elapsed, stage, open bars" and is refreshed every second, so the
    screen moves while a long step reports nothing. Bars are closed on exit.
    Lines (a log file): with `lines` (a callable taking one line of text, e.g. `log_line()`), nothing
    is drawn: a line when a stage starts, one when a bar finishes, and a heartbeat (elapsed, stage,
    open bars' counts) whenever `heartbeat_s` passed without a line.

    prefix: put before every bar's description and line (which run it belongs to).
    """

    def __init__(self, path: str | Path, make_bar: Callable | None = None, prefix: str = "", poll_s: float = 0.25,
                 *, lines: Callable[[str], None] | None = None, status=None, heartbeat_s: float = 30.0):
        self.path, self.make_bar, self.prefix, self.poll_s = Path(path), make_bar, prefix, poll_s
        self.lines, self.status, self.heartbeat_s = lines, status, float(heartbeat_s)
        self._stop = threading.Event()
        self._bars: dict[str, object] = {}
        self._counts: dict[str, tuple[str, int, int | None]] = {}  # key → (label, n, total): what lines report
        self._stage = ""
        self._t0 = self._last_line = self._last_status = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="awqnb-progress", daemon=True)

    def __enter__(self):
        self._t0 = self._last_line = time.monotonic()
        self._say("started")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()  # the last lines written before the kernel finished
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._counts.clear()
        return False

    # --- showing ---
    def _label(self, *parts: str) -> str:
        return " ".join(s for s in (self.prefix, *parts) if s)

    def summary(self) -> str:
        """elapsed, stage and the open bars' counts: what a heartbeat says."""
        bars = "; ".join(f"{label} {n}/{total if total is not None else '?'}"
                         for label, n, total in self._counts.values())
        text = f"[{_clock(time.monotonic() - self._t0)}] {self._stage or 'starting'}"
        return text + (f" | {bars}" if bars else "")

    def _say(self, text: str) -> None:
        if self.lines is not None:
            self.lines(self._label(text) if text else self._label())
            self._last_line = time.monotonic()

    def _tick(self) -> None:
        now = time.monotonic()
        if self.lines is not None and now - self._last_line >= self.heartbeat_s:
            self._say(f"running {self.summary()}")
        if self.status is not None and now - self._last_status >= min(1.0, self.heartbeat_s):
            self._last_status = now
            try:
                self.status.set_description_str(self._label(self.summary()))
            except Exception:  # noqa: BLE001  a display that went away: progress is a courtesy
                self.status = None

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
            self._tick()
            self._stop.wait(self.poll_s)

    def _handle(self, ev: dict) -> None:
        if "stage" in ev:
            self._stage = str(ev["stage"])
            self._say(f"stage: {self._stage}")
            return
        desc = str(ev.get("bar", ""))
        key = f"{self._stage}|{desc}"
        total = ev.get("total")
        total = int(total) if total is not None else None
        n = int(ev.get("n") or 0)
        label = " ".join(s for s in (self._stage, desc) if s)
        self._counts[key] = (desc or label, n, total)
        if self.make_bar is not None and self.lines is None:
            bar = self._bars.get(key)
            if bar is None:
                bar = self._bars[key] = self.make_bar(desc=self._label(label), total=total)
            if n > bar.n:
                bar.update(n - bar.n)
        if ev.get("closed"):
            self._counts.pop(key, None)
            bar = self._bars.pop(key, None)
            if bar is not None:
                bar.close()
            self._say(f"{desc or label}: {n}/{total if total is not None else n} done "
                      f"[{_clock(time.monotonic() - self._t0)}]")
