"""Progress of a report run seen from outside its kernel (awqnb.core.progress, workbench.execute):
the parent shows stages and the library's finer bars (blocks, evaluation windows); in a log file
as plain timestamped lines with a heartbeat while nothing changes, never a carriage return.
Ctrl-C during a run ends with the clean "interrupted … rerun" message, not the kernel's ZMQError."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from awqnb.core import progress
from awqnb.workbench import execute


def _write(path: Path, *events: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")


def test_library_bars_report_to_the_runner_even_when_disabled(tmp_path, monkeypatch):
    """Under a runner a nested bar its caller disabled (compare's quantize/evaluate) still reports."""
    prog = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(prog))
    for _ in progress.tqdm(range(3), desc="awq blocks", disable=True):
        pass
    events = [json.loads(line) for line in prog.read_text().splitlines()]
    assert events[-1] == {"bar": "awq blocks", "n": 3, "total": 3, "closed": True}
    monkeypatch.delenv(progress.ENV)
    assert progress.tqdm(range(3), disable=True).disable  # without a runner: tqdm as asked


def test_log_lines_with_heartbeat_and_no_carriage_return(tmp_path):
    prog = tmp_path / "p.jsonl"
    prog.touch()
    out = io.StringIO()
    with execute.follow_progress(prog, "none", "m"):
        pass  # 'none' shows nothing
    f = progress.follow(prog, prefix="tiny w4_g32", lines=progress.log_line(out), heartbeat_s=0.3, poll_s=0.05)
    with f:
        _write(prog, {"stage": "quantize and evaluate"}, {"bar": "compare", "n": 0, "total": 2, "closed": False},
               {"bar": "awq blocks", "n": 1, "total": 4, "closed": False})
        time.sleep(0.2)
        _write(prog, {"bar": "awq blocks", "n": 4, "total": 4, "closed": True})
        time.sleep(1.0)  # nothing changes: heartbeats
        _write(prog, {"bar": "ppl wikitext2", "n": 2, "total": 8, "closed": False})
        time.sleep(0.5)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tiny w4_g32 ")
    assert lines and all(stamp.match(ln) for ln in lines), text
    assert any("stage: quantize and evaluate" in ln for ln in lines), text
    assert any("awq blocks: 4/4 done" in ln for ln in lines), text
    beats = [ln for ln in lines if " running [" in ln]
    assert len(beats) >= 2, text
    assert "quantize and evaluate | compare 0/2" in beats[0], text  # elapsed, stage, open bars
    assert any("ppl wikitext2 2/8" in ln for ln in beats), text


def test_terminal_bars_show_blocks_and_a_moving_status(tmp_path):
    prog = tmp_path / "p.jsonl"
    prog.touch()
    made = []

    class Bar:
        def __init__(self, desc, total):
            self.desc, self.total, self.n, self.closed = desc, total, 0, False
            made.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    class Status:
        texts = []

        def set_description_str(self, s):
            self.texts.append(s)

    with progress.follow(prog, Bar, prefix="tiny", status=Status(), heartbeat_s=0.2, poll_s=0.05):
        _write(prog, {"stage": "quantize"}, {"bar": "awq blocks", "n": 2, "total": 4, "closed": False})
        time.sleep(0.6)
    assert [(b.desc, b.n, b.total) for b in made] == [("tiny quantize awq blocks", 2, 4)]
    assert made[0].closed
    assert len(Status.texts) >= 2 and "awq blocks 2/4" in Status.texts[-1]


def test_sweep_log_mode_draws_no_bars(monkeypatch, tmp_path):
    """Not a terminal: the sweep picks plain lines ('log'), and an unknown mode is refused."""
    from awqnb.core.errors import AwqnbError
    from awqnb.workbench import sweep
    from awqnb.workbench.grid import make_grid

    monkeypatch.setattr(sweep.notebook_run, "kernel_name", lambda *a: "python3")
    with pytest.raises(AwqnbError, match="unknown bars"):
        sweep.run_sweep(make_grid("tiny-random-llama", "rtn"), tmp_path / "o", bars="fancy")


NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "execution_count": None, "outputs": [],
         "source": "model: str = 'x'\nmethods: list[str] = ['rtn']\n"},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
         "source": "import os, time\nopen(os.environ['AWQNB_TEST_STARTED'], 'w').close()\ntime.sleep(120)\n"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_ctrl_c_is_one_clean_message(tmp_path):
    """SIGINT to `awqnb report` while its kernel runs a cell: the clean message, exit 130, and none
    of the kernel's ZMQError tracebacks (they go to its kernel log)."""
    nb = tmp_path / "sleep.ipynb"
    nb.write_text(json.dumps(NOTEBOOK))
    started = tmp_path / "started"
    env = {**os.environ, "AWQNB_TEST_STARTED": str(started)}
    p = subprocess.Popen([sys.executable, "-m", "awqnb.cli", "report", "--notebook", str(nb), "--models",
                          "tiny-random-llama", "--methods", "rtn", "--output-dir", str(tmp_path / "out")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not started.exists() and p.poll() is None:
        time.sleep(0.2)
    assert started.exists(), p.communicate(timeout=30)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "rerun the same command" in err, err
    assert "ZMQError" not in err and "Traceback" not in err, err
    assert "\r" not in err  # not a terminal: lines only
