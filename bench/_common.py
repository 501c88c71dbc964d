"""What every topic script writes, and where: `bench/results/<topic>/<date>_<device>_<model>[_<what>]/`
(date: UTC, YYYY-MM-DD; device: `cpu` or the GPU's short name, `h200`, `a100`, …), with `command.txt` (the
command line, to run again) and `environment.json` (Python, platform, package versions, GPU) beside the results."""
from __future__ import annotations

import datetime as _dt
import json
import re
import shlex
import sys
from pathlib import Path

from awqnb.model.provenance import versions

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag(device=None) -> str:
    """'cpu', or the GPU's name shortened: 'NVIDIA H200' → 'h200', 'NVIDIA A100-SXM4-80GB' → 'a100'."""
    import torch

    dev = str(device or "auto")
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cpu"):
        return "cpu"
    if dev.startswith("mps"):
        return "mps"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        return "gpu"  # a GPU run's provenance read on a machine without one (a merge)
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else dev  # or a GPU's name
    name = name.lower().replace("nvidia", "").replace("geforce", "")
    m = re.search(r"\b([a-z]{1,3}\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def run_dir(topic: str, model: str, device=None, what: str | None = None) -> Path:
    """The default output directory of one run: bench/results/<topic>/<date>_<device>_<model>[_<what>]."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    model = re.sub(r"[^A-Za-z0-9.-]+", "-", str(model)).strip("-") or "model"
    name = f"{date}_{device_tag(device)}_{model}" + (f"_{what}" if what else "")
    return RESULTS / topic / name


def environment(device=None) -> dict:
    """Python, platform, package versions and the GPU (awqnb's one versions()), and the run's device."""
    env = {"versions": versions()}
    if device is not None:
        env["device"] = str(device)
    return env


def write_run_info(out, device=None, argv=None) -> Path:
    """Write command.txt and environment.json into `out` (created); returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv if argv is None else argv)
    (out / "command.txt").write_text("python " + shlex.join(argv) + "\n")
    (out / "environment.json").write_text(json.dumps(environment(device), indent=1) + "\n")
    return out
