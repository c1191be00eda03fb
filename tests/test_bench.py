"""The benchmark suite (bench/) runs and checks its candidates, and bench/report.py turns its JSON into the
tables, the target verdicts and a plot. On a CPU this is a check that it works, not a measurement."""

import json
import os
import subprocess
import sys

import pytest

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


def _report():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import report
    finally:
        sys.path.pop(0)
    return report


def test_report_names_a_missing_or_empty_json(tmp_path, capsys):
    report = _report()
    empty = tmp_path / "empty.json"
    empty.write_text("")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"benchmarks": []}')
    for path, expected in [(tmp_path / "absent.json", "no such file"), (empty, "empty or not JSON"),
                           (foreign, "no benchmark measured anything")]:
        with pytest.raises(SystemExit) as stop:
            report.main([str(path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"{path}" in err and expected in err and "Traceback" not in err


def test_report_labels_the_cpu_ase_column_as_the_torch_fallback(tmp_path):
    report = _report()
    cell = dict(config="32/6/2/2", placement="ffn", pass_="fwd+bwd", ms=1.0)
    rows = [{"name": f"bench_ffn[{impl}]", "extra_info": dict(cell, impl=impl)} for impl in report.IMPLS]
    data = {"machine_info": {"cpu": {"brand_raw": "some CPU"}}, "benchmarks": rows}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    assert "| ase (torch fallback, CPU) |" in report.main([str(path)])
    data["machine_info"] = {"gpu": "NVIDIA H100"}
    path.write_text(json.dumps(data))
    text = report.main([str(path)])
    assert "| ase |" in text and "fallback" not in text


def test_gpu_quick_session_dry_run(tmp_path):
    """bash bench/gpu_session.sh quick --dry-run: the short GPU session's own entry point and code on the CPU at tiny
    shapes (kernels under the interpreter), so that a bug a CPU can find never costs device minutes."""
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "quick", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()  # tests/test_gpu.py ran first (no GPU here)
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert data["dry_run"] is True and data["complete"] is True and data["errors"] == data["skipped"] == []
    cells = {(r["config"], r["path"], r["mode"]) for r in data["ffn"]}
    assert cells == {(c, p, m) for c in ("32/6/2/2", "16/3/1/4") for p in ("fused", "cublas")
                     for m in ("eager", "graphed")}
    assert all(r["ms"] > 0 and r["bare_ms"] > 0 and r["rel_err"] <= 1e-4 for r in data["ffn"])  # checked, then timed
    assert len(data["memory"]) == 4 and all(r["ase_mb"] > 0 and r["bare_mb"] > 0 for r in data["memory"])
    assert [r["impl"] for r in data["vit_step"]] == ["ase", "plain"] and data["vit_step"][0]["vs_plain"] > 0
    assert len(data["profile"]["rows"]) == 10 and any("moe_lora_ffn" in r["name"] for r in data["profile"]["rows"])
    table = (tmp_path / "gpu_quick.md").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())  # the table is printed last


def test_gpu_quick_writes_what_it_has_when_the_budget_is_spent(tmp_path):
    """Past its time budget gpu_quick measures nothing more, lists the steps it skipped and still writes its files
    (the short GPU session stops at 8 minutes so that a 10-minute command returns them)."""
    command = [sys.executable, "-m", "bench.gpu_quick", "--dry-run", "--budget-s", "0", "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert data["skipped"] == ["ffn 32/6/2/2", "ffn 16/3/1/4", "vit ase", "vit plain", "profile"]
    assert data["complete"] is True and data["ffn"] == data["vit_step"] == [] and data["profile"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_quick.json", "gpu_quick.md"]
    assert "skipped (budget): vit ase" in proc.stdout


def test_gpu_quick_device_busy_merges_overlaps_and_counts_gaps():
    """The profile's idle share, which no CPU run reaches: kernels [0, 10] and [5, 20] (overlapping, two streams),
    a gap, then [30, 40]: busy 30 us of a 40 us span; events on another device are ignored."""
    from types import SimpleNamespace

    from bench.gpu_quick import _device_busy

    def event(device, start, end):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [event("cuda", 30, 40), event("cpu", 0, 100), event("cuda", 0, 10), event("cuda", 5, 20)]
    assert _device_busy(events, "cuda") == dict(launches=3, busy_us=30, span_us=40, idle_share=0.25)
    assert _device_busy(events[1:2], "cuda") is None
