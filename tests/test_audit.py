"""bench/audit.py in CI: README.md's method table and the re-judged verdicts table in
bench/README.md match what bench/results/ gives under awqnb.analysis.stats (and a changed figure fails)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _audit(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "audit.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_published_figures_match_the_stored_results():
    p = _audit()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all match" in p.stdout


def test_a_changed_figure_or_verdict_fails(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(ln for ln in text.splitlines() if ln.startswith("| `awq_dh` |"))
    old = re.search(r"\d+\.\d{3} ± ", row).group(0)  # the first mean: its last digit changed
    fig = (old, old[:-4] + str((int(old[-4]) + 1) % 10) + old[-3:])
    for old, new in (fig, ("better", "within noise")):
        bad = tmp_path / f"README_{len(new)}.md"
        bad.write_text(text.replace(row, row.replace(old, new, 1)), encoding="utf-8")
        p = _audit("--readme", str(bad))
        assert p.returncode == 1, p.stdout + p.stderr
        assert "MISMATCH README method table, `awq_dh`" in p.stdout, p.stdout
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    bad = tmp_path / "bench_README.md"
    bad.write_text(bench.replace("| bench | SmolLM2 g64 | awq_dh vs llmc_gptq | better |",
                                 "| bench | SmolLM2 g64 | awq_dh vs llmc_gptq | worse |"), encoding="utf-8")
    p = _audit("--bench-readme", str(bad))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "re-judged table differs" in p.stdout
