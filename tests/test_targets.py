"""The static targets, held at the default ViT-B case as the inspection tool reports it (compile-only, no GPU).

One ASEMlp(768, 3072, 32/6/2/2, 5 tasks, placement ffn) forward+backward on 12,608 tokens (bench/inspect_kernels.py,
in a child process: this session interprets its kernels):

- issue 7: bf16 on sm_90 with every autotune configuration: launches, host syncs, spills, wgmma main loops;
- issue 19: every target GPU (sm_80 ... sm_120) and every dtype (bf16, fp16, fp32 with IEEE dots, fp32 with TF32
  allowed), each launch compiled with the first configuration that survives its pruning for that GPU: no spills,
  shared memory within the GPU's block limit, MMA main loops exactly where the precision allows tensor cores.
  The whole product (6 targets x 4 dtypes, every configuration) takes ~15 minutes cold on 2 cores, so CI takes
  six rows that name every target once and every dtype at least once, chosen where each dtype is tightest (fp32
  on the 99 KB parts, TF32 on sm_80's mma.sync path); ``python -m bench.sweep_targets`` runs the whole product.

Host time is reported by the tool but not held here: timings belong in benchmarks.
"""

import json

import pytest
from test_inspect_kernels import _run

MAX_LAUNCHES = 14  # 27 before issue 7; a bare timm Mlp makes 6


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("targets") / "vit_b.json"
    proc = _run("--host-rounds", "0", "--json", str(path), timeout=900)
    assert proc.returncode == 0, f"inspect_kernels failed:\n{proc.stderr[-4000:]}"
    with open(path) as f:
        return json.load(f)


def test_no_host_syncs(vit_b):
    assert vit_b["summary"]["syncs"]["total"] == 0, vit_b["syncs"]


def test_at_most_14_device_launches(vit_b):
    s = vit_b["summary"]
    assert s["launches"] <= MAX_LAUNCHES, (s["triton"], [o["op"] for o in vit_b["torch_ops"]])


def test_no_variant_spills(vit_b):
    spilling = [(v["kernel"], v["role"], v["config"], v["spill_store"]) for v in vit_b["variants"]
                if v["spill_store"] or v["spill_load"]]
    assert not spilling, spilling


def test_every_gemm_main_loop_runs_wgmma(vit_b):
    gemms = [v for v in vit_b["variants"] if v["kernel"] in ("_expand_kernel", "_shrink_kernel")]
    assert gemms and all(v["hgmma_in_loop"] for v in gemms), [(v["role"], v["config"]) for v in gemms]


# (target, dtype) rows compiled in CI (see the module docstring); "tf32" is fp32 with --tf32
TARGET_ROWS = [("sm_80", "tf32"), ("sm_86", "fp32"), ("sm_89", "bf16"), ("sm_90", "fp32"), ("sm_100", "fp16"),
               ("sm_120", "fp32")]
GEMM_KERNELS = ("_expand_kernel", "_shrink_kernel", "_wgrad_kernel", "_route_fwd_kernel", "_route_bwd_kernel")


@pytest.fixture(scope="module", params=[pytest.param(r, id=f"{r[0]}-{r[1]}") for r in TARGET_ROWS])
def target_row(request, tmp_path_factory):
    target, dtype = request.param
    path = tmp_path_factory.mktemp("targets") / f"{target}-{dtype}.json"
    flags = ["--dtype", "fp32", "--tf32"] if dtype == "tf32" else ["--dtype", dtype]
    proc = _run("--target", target, *flags, "--first-config", "--host-rounds", "0", "--json", str(path), timeout=900)
    assert proc.returncode == 0, f"inspect_kernels --target {target} {dtype} failed:\n{proc.stderr[-4000:]}"
    with open(path) as f:
        return dtype, json.load(f)


def test_target_compiles_without_spills(target_row):
    _, report = target_row
    spilling = [(v["role"], v["tile"], v["spill_store"], v["spill_load"]) for v in report["variants"]
                if v["spill_store"] or v["spill_load"]]
    assert not spilling, (report["target"], spilling)


def test_target_shared_memory_fits(target_row):
    _, report = target_row
    limit = report["gpu"]["smem_per_block"]
    over = [(v["role"], v["tile"], v["smem"]) for v in report["variants"]
            if v["smem"] > limit or v["programs_per_sm"] < 1]
    assert not over, (report["target"], limit, over)
    assert report["summary"]["launches"] <= MAX_LAUNCHES


def test_target_tensor_cores_follow_the_precision(target_row):
    """16-bit and TF32 GEMM variants run MMA instructions in their main loops; IEEE fp32 ones run none."""
    dtype, report = target_row
    gemms = [v for v in report["variants"] if v["kernel"] in GEMM_KERNELS]
    mma = {(v["role"], v["tile"]): bool(v["hgmma_in_loop"] or v["hmma_in_loop"] or v["utcmma_in_loop"]) for v in gemms}
    if dtype == "fp32":
        assert not any(v["hgmma"] or v["hmma"] or v["utcmma"] for v in gemms), mma
    else:
        assert gemms and all(mma.values()), mma
