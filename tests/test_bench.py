"""The benchmark suite (bench/) runs and checks its candidates, and bench/report.py turns its JSON into the
tables, the target verdicts and a plot. On a CPU this is a check that it works, not a measurement."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_suite_and_report(tmp_path):
    out = tmp_path / "bench.json"
    # the CPU-sized suite, even on a GPU machine: there the full suite is a measurement, not a test
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-x", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import report
    finally:
        sys.path.pop(0)
    png = tmp_path / "plot.png"
    text = report.main([str(out), "--png", str(png)])
    assert "### Targets" in text and "| 32/6/2/2 | ffn |" in text and "5-task ViT training step" in text
    assert png.stat().st_size > 10_000
