"""Atomic file writes: outputs appear whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8, or bytes) to a temporary file next to `path`, then rename it
    into place; the temporary file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, what: str, missing_hint: str, bad_hint: str):
    """The JSON document in `path`; AwqnbError naming `what` and what to do if it is missing or not JSON."""
    import json

    from .errors import AwqnbError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise AwqnbError(f"{what} {path} does not exist{missing_hint}.") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AwqnbError(f"{what} {path} is not JSON ({e}){bad_hint}.") from e


def read_yaml_mapping(path: str | Path, what: str, shape: str) -> dict:
    """A YAML file that must hold a mapping (empty → {}); AwqnbError naming `what` otherwise
    (`shape` says what the mapping should contain)."""
    import yaml

    from .errors import AwqnbError

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AwqnbError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(doc, dict):
        raise AwqnbError(f"{what} {path} must be a YAML mapping {shape}.")
    return doc
