"""bench/inspect_kernels.py, the GPU-less inspection tool, runs at small shapes and reports sane numbers.

The tool runs in a child process: this session's kernels are interpreted (TRITON_INTERPRET=1), the tool's are
compiled. One autotune configuration per kernel (--first-config) keeps it to seconds once Triton's cache is warm.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dim", "64", "--hidden", "256", "--images", "5", "--tokens", "16", "--tasks", "5", "--experts", "8",
         "--top-k", "2", "--shared", "1", "--rank", "2", "--first-config", "--host-reps", "3", "--host-rounds", "2"]


def _run(*args, timeout=240, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ASE_KERNELS_BACKEND")} | env_vars
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "bench.inspect_kernels", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "report.json"
    proc = _run(*SMALL, "--json", str(path))
    assert proc.returncode == 0, f"inspect_kernels failed:\n{proc.stderr[-4000:]}"
    with open(path) as f:
        return json.load(f), proc.stdout


def test_every_launch_is_compiled_and_counted(report):
    data, _ = report
    s = data["summary"]
    assert s["triton"]["fwd"] > 0 and s["triton"]["bwd"] > 0, s["triton"]
    # pass 1 (recorded, compiled) and pass 2 (counted) see the same launches
    assert s["recorded_launches"] == s["triton"]["total"] == len(data["launches"])
    assert s["launches"] == s["triton"]["total"] + s["torch_ops"]["total"]
    assert s["torch_ops"]["total"] == len(data["torch_ops"]) > 0
    assert s["syncs"]["total"] == len(data["syncs"])
    ids = {v["id"] for v in data["variants"]}
    for launch in data["launches"]:
        assert launch["configs"] and {c["variant"] for c in launch["configs"]} <= ids, launch["kernel"]
        assert all(c["programs"] > 0 for c in launch["configs"]), launch["kernel"]
        assert launch["bytes"] > 0 and launch["floor_us"] > 0, launch["kernel"]
        assert launch["phase"] in ("fwd", "bwd")


def test_variants_have_compiler_facts(report):
    data, _ = report
    for v in data["variants"]:
        assert 0 < v["regs"] <= 255, v
        assert v["spill_store"] >= 0 and v["spill_load"] >= 0 and v["smem"] >= 0, v
        assert v["programs_per_sm"] >= 1, v  # every variant fits an H100 SM
    assert any(v["hgmma_in_loop"] for v in data["variants"]), "no wgmma main loop compiled for sm_90"


def test_tables_and_json_agree(report):
    data, stdout = report
    assert json.loads(json.dumps(data)) == data
    for heading in ("## Compiled variants", "## Launches", "## Torch device ops", "## Host syncs"):
        assert heading in stdout
    assert f"**{data['summary']['launches']}**" in stdout
    assert 0 < data["host"]["ase_us"]["min"] <= data["host"]["ase_us"]["median"]
    assert 0 < data["host"]["bare_us"]["min"] <= data["host"]["bare_us"]["median"]
    assert len(data["host"]["bare_ops"]) >= 4  # fc1, GELU, fc2 forward; at least one GEMM backward


def _fails_in_one_line(proc):
    """The tool exited non-zero with a single 'inspect_kernels: error:' line on stderr."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inspect_kernels: error:"), proc.stderr


@pytest.mark.parametrize("args", [pytest.param(["--experts", "0"], id="zero-experts"),
                                  pytest.param(["--target", "sm_70"], id="bad-target"),
                                  pytest.param(["--experts", "4", "--top-k", "4", "--shared", "2"], id="k+S>N")])
def test_bad_options_fail_in_one_line(args):
    _fails_in_one_line(_run(*args, timeout=60))


@pytest.mark.parametrize("env", [pytest.param(dict(TRITON_INTERPRET="1"), id="interpreter"),
                                 pytest.param(dict(ASE_KERNELS_BACKEND="torch"), id="torch-backend")])
def test_environment_that_bypasses_the_kernels_is_refused(env):
    _fails_in_one_line(_run(*SMALL, timeout=60, **env))


# (regs, warps, smem bytes) -> programs per SM and limit, as the static H100 analysis computed them
@pytest.mark.parametrize("regs,warps,smem,want", [
    pytest.param(173, 8, 99328, (1, "regs"), id="173regs-8warps"),
    pytest.param(158, 4, 99328, (2, "smem"), id="158regs-96KB"),
    pytest.param(128, 4, 37888, (4, "regs"), id="128regs-4warps"),
    pytest.param(96, 4, 17408, (5, "regs"), id="96regs-4warps"),
    pytest.param(64, 4, 50176, (4, "smem"), id="64regs-49KB"),
])
def test_programs_per_sm(regs, warps, smem, want, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # bench/ is not an installed package
    from bench.kernel_inspect import roofline

    assert roofline.programs_per_sm(regs, warps, smem) == want


# the same variant on other targets: sm_86 has 100 KB of shared memory and 1,536 threads per SM, sm_80 164 KB
@pytest.mark.parametrize("target,regs,warps,smem,want", [
    pytest.param("sm_86", 128, 4, 49152, (2, "smem"), id="sm_86-48KB"),
    pytest.param("sm_86", 32, 4, 0, (12, "threads"), id="sm_86-threads"),
    pytest.param("sm_86", 64, 4, 102400, (0, "smem"), id="sm_86-over-block-limit"),
    pytest.param("sm_80", 128, 4, 49152, (3, "smem"), id="sm_80-48KB"),
    pytest.param("sm_120", 200, 8, 16384, (1, "regs"), id="sm_120-200regs-8warps"),
])
def test_programs_per_sm_per_target(target, regs, warps, smem, want, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from bench.kernel_inspect import roofline

    assert roofline.programs_per_sm(regs, warps, smem, roofline.GPUS[target]) == want


def test_every_target_compiles_with_the_bundled_ptxas(monkeypatch):
    """Triton's own ptxas accepts every target the tool offers, under the name Triton gives it (sm_90a, ...)."""
    monkeypatch.syspath_prepend(ROOT)
    from bench.kernel_inspect import cubin, hooks, roofline

    names = {t: cubin.compilable(hooks.arch(t)) for t in roofline.GPUS}
    assert set(names) == {"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"}
    assert all(ok for ok, _ in names.values()), names


def test_sync_detector_sees_read_backs_only(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    import torch

    from bench.kernel_inspect.torch_side import SyncDetector

    detector = SyncDetector(ROOT)
    t = torch.tensor([1, 2, 3])
    with detector:
        t.sum().item(), bool(t[0]), int(t[0]), t.tolist(), t.nonzero(), t[t > 1], torch.repeat_interleave(t)
        t.repeat_interleave(2), t.to(torch.float32), t + 1, t[1:], t.sum()  # none of these reads back
    assert [s["what"] for s in detector.syncs] == ["item", "__bool__", "__int__", "tolist", "nonzero", "__getitem__",
                                                   "repeat_interleave"]
    assert all(s["where"].startswith("tests/test_inspect_kernels.py:") for s in detector.syncs), detector.syncs
