"""Atomic file writes: outputs appear whole or not at all; temporaries say whose they are.

Every temporary awqnb writes is named `.<name>.tmp-<host>-<pid>-<random>` (a directory or file next
to its destination; `.<name>.old-…` for a replaced output on its way out, `awqnb-run-<host>-<pid>-…`
for a sweep run's work directory in the system temp folder), where <host> is a short hash of the
host name and <pid> the writing process. A process killed by SIGKILL cannot clean up, so the next
run does (`clean_stale`): a temporary of this host whose process is gone is removed, and a
replaced output whose replacement never arrived is put back. A temporary of another host (a shared
network directory) is removed only once nothing in it changed for `STALE_AGE_S`; a live writer's
never is.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from awqnb.core.errors import AwqnbError

log = logging.getLogger(__name__)

# A temporary nobody has touched for a day is abandoned: awqnb writes its outputs in minutes.
STALE_AGE_S = 24 * 3600
RUN_PREFIX = "awqnb-run-"
_TAGGED = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_RUN = re.compile(rf"^{RUN_PREFIX}(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-[A-Za-z0-9_]+$")
# before temporaries carried their writer: `.<name>.tmp-XXXXXXXX` (mkdtemp) and `awqnb-run-XXXXXXXX`
_LEGACY = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")
_LEGACY_RUN = re.compile(rf"^{RUN_PREFIX}[a-z0-9_]{{8}}$")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def host_tag() -> str:
    """Six hex digits naming this host in temporary names (a pid means something only on its host)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """`.<name>.<kind>-<host>-<pid>-`: the prefix of a temporary (mkdtemp/mkstemp add the rest)."""
    return f".{name}.{kind}-{host_tag()}-{os.getpid()}-"


def run_prefix() -> str:
    """`awqnb-run-<host>-<pid>-`: the prefix of a sweep run's work directory in the temp folder."""
    return f"{RUN_PREFIX}{host_tag()}-{os.getpid()}-"


def _newest_mtime(p: Path) -> float:
    """The latest modification time of `p` and, for a directory, of anything under it."""
    newest = p.lstat().st_mtime
    if p.is_dir() and not p.is_symlink():
        for root, dirs, files in os.walk(p):
            for n in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
                except OSError:
                    pass
    return newest


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether process `pid` runs on this host (a zombie does not) and, given `since` (a time its
    writer was known to be alive), started no later than that: a process that started afterwards
    only reuses a dead writer's pid."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): signal 0 says whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    boot = _boot_time()
    if since is not None and boot is not None:
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if started > since + 2:  # (btime has whole seconds)
            return False
    return True


def _stale(entry: Path, host: str | None, pid: int | None, now: float) -> bool:
    try:
        newest = _newest_mtime(entry)
    except OSError:
        return False  # gone already, or unreadable: not ours to judge
    if host == host_tag() and pid is not None:
        return not process_alive(pid, since=newest)
    return now - newest > STALE_AGE_S  # another host's (or an old awqnb's): by age alone


def clean_stale(directory: str | Path, name: str | None = None, legacy: bool = False,
                runs: bool = False) -> list[Path]:
    """Remove the temporaries of dead awqnb processes in `directory` (not below it); returns what
    was removed or restored. name: only those of this output name. legacy: also the untagged
    temporary directories of older awqnb versions, by age. runs: the sweep runs' work directories
    (`awqnb-run-…`, in the system temp folder) instead of outputs' temporaries. A replaced output
    (`.<name>.old-…`) whose writer died before its replacement arrived is renamed back to
    `<name>`. Never raises: cleaning up must not stop the work it precedes."""
    d = Path(directory)
    done: list[Path] = []
    try:
        entries = list(os.scandir(d))
    except OSError:
        return done
    now = time.time()
    for e in entries:
        m = (_RUN if runs else _TAGGED).match(e.name)
        if m is not None:
            base = m.groupdict().get("base")
            if name is not None and base != name:
                continue
            host, pid = m["host"], int(m["pid"])
        elif (legacy and name is None and (_LEGACY_RUN if runs else _LEGACY).match(e.name)
              and e.is_dir(follow_symlinks=False)):
            base, host, pid = None, None, None
        else:
            continue
        p = Path(e.path)
        if not _stale(p, host, pid, now):
            continue
        try:
            if m is not None and m.groupdict().get("kind") == "old" and not (d / base).exists():
                p.rename(d / base)  # killed between moving the old output aside and the new one in
                log.warning("restored %s (a replacement of it was interrupted)", d / base)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            continue  # another cleaner got there first
        except OSError as err:
            log.debug("could not remove stale %s: %s", p, err)
            continue
        done.append(p)
    if done:
        log.info("removed %d temporary file(s) of interrupted awqnb runs in %s", len(done), d)
    return done


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8, or bytes) to a temporary file next to `path`, then rename it
    into place; the temporary file is removed if anything fails (a killed writer's, by the next
    write of the same path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, name=path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; give it normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_write_error(e: BaseException) -> bool:
    """An error of writing to disk: OSError (full, read-only, permissions) or safetensors' own
    SafetensorError, which is what its writer raises for those."""
    if isinstance(e, OSError):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:
        return False
    return isinstance(e, SafetensorError)


def write_error_text(e: BaseException) -> str:
    """The reason of a write error in a few words: 'No space left on device'."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)  # safetensors: "Error while serializing: I/O error: …"
    return m.group(1) if m else text


def read_json(path: str | Path, what: str, missing_hint: str, bad_hint: str):
    """The JSON document in `path`; AwqnbError naming `what` and what to do if it is missing or not JSON."""
    import json

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

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise AwqnbError(f"{what} {path} is not UTF-8 text (a binary file?); give a YAML mapping {shape}.") from e
    except (OSError, yaml.YAMLError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise AwqnbError(f"cannot read {what} {path}: {first}") from e
    if not isinstance(doc, dict):
        raise AwqnbError(f"{what} {path} must be a YAML mapping {shape}.")
    return doc
