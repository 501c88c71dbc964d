"""bench/audit.py in CI: README.md's method table and the re-judged verdicts table in
bench/README.md match what bench/results/ gives under awqnb.stats (and a changed figure fails)."""
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


def test_a_changed_figure_or_verdict_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import audit  # in-process: the results files are read once

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(ln for ln in text.splitlines() if ln.startswith("| `awq_dh` |"))
    for old, new in (("24.810 ± 0.112", "24.809 ± 0.112"), ("better", "within noise")):
        bad = tmp_path / f"README_{len(new)}.md"
        bad.write_text(text.replace(row, row.replace(old, new, 1)), encoding="utf-8")
        assert audit.main(["--readme", str(bad)]) == 1
        out = capsys.readouterr().out
        assert "MISMATCH README method table, `awq_dh`" in out, out
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    bad = tmp_path / "bench_README.md"
    bad.write_text(bench.replace("| bench | SmolLM2 g64 | awq_dh vs llmc_gptq | better |",
                                 "| bench | SmolLM2 g64 | awq_dh vs llmc_gptq | worse |"), encoding="utf-8")
    assert audit.main(["--bench-readme", str(bad)]) == 1
    assert "re-judged table differs" in capsys.readouterr().out
