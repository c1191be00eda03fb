#!/usr/bin/env bash
# The GPU measurement with the machine's own PyTorch and Triton (no install: the repository root goes on
# PYTHONPATH). Results go to $OUT when set (the device tool's output folder), else to bench/.
#   bash bench/gpu_session.sh quick      # one short session (<= 8 min on an H100/H200, see README): the bf16 ViT-B
#                                        # correctness tests, then bench/gpu_quick.py (gpu_quick.{json,md})
#   bash bench/gpu_session.sh quick --dry-run   # the same on a CPU at tiny shapes (what CI runs)
# Longer sessions, in stages that each fit a 10-minute command:
#   bash bench/gpu_session.sh tests      # bf16 kernels at ViT-B shapes vs float64, CUDA graphs, every test on GPU
#   bash bench/gpu_session.sh eager      # every benchmark except torch.compile
#   bash bench/gpu_session.sh compiled   # the torch.compile baselines (most of the compile time)
#   bash bench/gpu_session.sh report     # tables, targets with pass/fail, plot
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench}"
mkdir -p "$out"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
case "${1:-all}" in
  quick) shift
         status=0
         # one 10-minute command: the tests get at most 270 s, and gpu_quick.py measures until 480 s from the start
         # of this script, then writes what it has (it also writes after every step); no limits on a dry run
         case " $* " in *" --dry-run "*) tests_s=0 ;; *) tests_s=270 ;; esac  # timeout 0: none
         # correctness with one launch configuration per kernel (an FFN compiles 12 variants instead of 20); gpu_quick.py
         # then autotunes, as users get it, and checks each path it times against float64 first
         ASE_KERNELS_AUTOTUNE=0 timeout -k 10 "$tests_s" python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider \
           2>&1 | tee "$out/gpu_tests.log" | tail -15 \
           || { status=1; echo "gpu_session: tests/test_gpu.py failed, or was stopped at ${tests_s} s"; }
         budget=()
         [ "$tests_s" = 0 ] || budget=(--budget-s $((480 - SECONDS)))
         # a failed step or check: FAILED lines on stderr and atop gpu_quick.md, exit 1 (the table stays last)
         python3 -m bench.gpu_quick --out "$out" ${budget[@]+"${budget[@]}"} "$@" || status=1
         exit $status ;;
  tests) python3 -m pytest tests/test_gpu.py tests/test_routing.py tests/test_lowrank.py tests/test_ops.py \
           tests/test_modules.py -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
  eager) python3 -m pytest bench -q -x -p no:cacheprovider -k "not compiled" \
           --benchmark-json="$out/out-eager.json" 2>&1 | tail -5 ;;
  compiled) python3 -m pytest bench -q -x -p no:cacheprovider -k compiled \
              --benchmark-json="$out/out-compiled.json" 2>&1 | tail -5 ;;
  report) python3 bench/report.py "$out"/out-*.json --md "$out/RESULTS_gpu.md" --png "$out/results_gpu.png" ;;
  all) for stage in tests eager compiled report; do bash "$0" "$stage"; done ;;
  *) echo "usage: $0 quick [--dry-run]|tests|eager|compiled|report|all" >&2; exit 2 ;;
esac
