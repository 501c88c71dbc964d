"""Stage a file too big for one transfer onto a GPU machine: split it into pieces under a size limit, and
print the commands that copy each piece into a stash directory on the device and join them there.

A remote runner that copies the working tree (and a few untracked folders) with every call, within a size
limit, cannot carry a model file of several hundred MB at once; files outside the tree persist on the
device while it stays warm. So: split here into folders of at most --limit bytes each, carry one folder per
call to copy its piece into --stash, then join the pieces and check the hash in the call that runs.

    python bench/stage.py FILE [--limit 60M] [--dir .stage] [--stash /tmp/stash] [--dest DEST_ON_DEVICE]

Writes DIR/1/, DIR/2/, … (one piece each) and prints, per call, the folder to carry and the command to run
there; the last command joins the pieces into DEST (default: STASH/FILE's name) and prints its sha256 (to
compare with the one printed here). DIR should be git-ignored (e.g. listed in .git/info/exclude), so the
pieces stay out of the tracked tree."""
from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text: str) -> int:
    """'60M' → 62914560 (K, M, G: powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in UNITS else ""
    return int(float(t[: len(t) - len(unit)]) * UNITS[unit])


def split(path: Path, limit: int, out: Path) -> list[Path]:
    """Pieces of at most `limit` bytes, out/1/<name>.part000, out/2/<name>.part001, …; returns them in order."""
    pieces, i = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(limit):
            d = out / str(i + 1)
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{path.name}.part{i:03d}"
            p.write_bytes(chunk)
            pieces.append(p)
            i += 1
    return pieces


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--limit", default="60M", help="largest piece (and carried folder): bytes, or with K/M/G")
    p.add_argument("--dir", type=Path, default=Path(".stage"), help="where the pieces go here (git-ignored)")
    p.add_argument("--stash", default="/tmp/stash", help="directory on the device that keeps the pieces")
    p.add_argument("--dest", default=None, help="the joined file on the device (default: STASH/<file name>)")
    args = p.parse_args(argv)
    if not args.file.is_file():
        p.error(f"{args.file}: no such file")
    pieces = split(args.file, size(args.limit), args.dir)
    dest = args.dest or f"{args.stash.rstrip('/')}/{args.file.name}"
    q = shlex.quote
    print(f"{args.file}: {len(pieces)} piece(s) under {args.dir}/, sha256 {sha256(args.file)}")
    for i, piece in enumerate(pieces, 1):
        print(f"call {i}: carry {piece.parent}  →  mkdir -p {q(args.stash)} && cp {q(str(piece))} {q(args.stash)}/")
    names = " ".join(q(f"{args.stash.rstrip('/')}/{pc.name}") for pc in pieces)
    print(f"then:  mkdir -p {q(str(Path(dest).parent))} && cat {names} > {q(dest)} && sha256sum {q(dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
