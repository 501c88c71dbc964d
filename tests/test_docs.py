"""The README and docs/ describe the code that exists: every module is in README's Layout, every
`from awqnb... import ...` line in them imports, every `awqnb/...` path they name exists."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sec = text.split("\n## Layout\n", 1)[1]
    return sec.split("\n## ", 1)[0]


def test_layout_lists_every_module():
    layout = _layout()
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^- `(\w+)/` — .*(?:\n  .*)*", layout, re.M)}
    missing = []
    for f in sorted((ROOT / "awqnb").rglob("*.py")):
        rel = f.relative_to(ROOT / "awqnb")
        if rel.name == "__init__.py" and len(rel.parts) < 3 or rel.name == "__main__.py":
            continue
        if len(rel.parts) == 1:
            if f"`{rel.name}`" not in layout:
                missing.append(str(rel))
            continue
        entry = lines.get(rel.parts[0], "")
        if f"`{rel.stem}`" not in entry:
            missing.append(str(rel))
    assert not missing, f"README Layout does not name: {missing}"


IMPORT = re.compile(r"^from (awqnb[\w.]*) import ([\w, ]+?)(?:\s+#.*)?$", re.M)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_imports_in_docs_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    found = IMPORT.findall(text)
    bad = []
    for mod, names in found:
        m = importlib.import_module(mod)
        for n in (x.split(" as ")[0].strip() for x in names.split(",")):
            if n and not hasattr(m, n) and importlib.util.find_spec(f"{mod}.{n}") is None:
                bad.append(f"from {mod} import {n}")
    assert not bad, f"{doc.name}: {bad}"
    if doc.name == "README.md":
        assert found, "the README shows library imports: the check must see them"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_in_docs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    paths = set(re.findall(r"`(awqnb/[\w/]+\.py)`", text)) | set(re.findall(r"`(awqnb/[\w/]+/)`", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
