#!/usr/bin/env bash
# The stacks pyproject.toml admits, tested: builds a venv with one torch and one triton (plus the project's own
# dependencies, resolved by pip against pyproject.toml's bounds) and runs, there,
#   1. the kernel tests under Triton's interpreter: tests/test_NAME.py for every ase_kernels/kernels/NAME.py, with
#      every dtype they are parametrized over on a CPU (fp32, fp16, and bf16 where the harness teaches the
#      interpreter bf16), and tests/test_kernels_compile.py (every kernel compiled for sm_80 and sm_90);
#   2. the sm_90 inspection of the ViT-B FFN forward+backward (python -m bench.inspect_kernels --target sm_90).
#
#   bash tests/compat.sh TORCH TRITON [VENV_DIR]      e.g. bash tests/compat.sh 2.11.0 3.6.0
#
# VENV_DIR defaults to /tmp/ase-compat/torchTORCH-tritonTRITON and is reused when it already holds that stack.
# Downloads go through pip's own cache (torch with its CUDA libraries is a few GB the first time). NUMPY=SPEC
# pins numpy (e.g. NUMPY='==2.3.5'); without it, triton < 3.8 gets numpy<2.4: their interpreter turns a scalar
# tensor into an int with int() on a one-element array (a loop bound such as `range(0, NUM_TASKS)`), which numpy 2.4
# refuses (seen with triton 3.1.0 and 3.6.0; 3.8 squeezes the array first). Not run by CI, which tests the pinned
# stack; the README says which stacks passed and when.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: bash tests/compat.sh TORCH TRITON [VENV_DIR]   (e.g. 2.11.0 3.6.0)" >&2
  exit 2
fi
torch_v=$1 triton_v=$2
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${3:-/tmp/ase-compat/torch$torch_v-triton$triton_v}"
numpy_spec="${NUMPY:-}"
triton_minor=$(echo "$triton_v" | cut -d. -f2)
if [ -z "$numpy_spec" ] && [ "${triton_v%%.*}" = 3 ] && [ "$triton_minor" -lt 8 ]; then numpy_spec="<2.4"; fi

if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
# torchvision X.Y matches torch 2.(Y-15) (0.20 <-> 2.5, 0.26 <-> 2.11, 0.29 <-> 2.14); pip picks the patch release
# whose torch requirement is the one asked for
minor=$(echo "$torch_v" | cut -d. -f2)
# pyproject.toml's dependencies, not the project itself (whose build would write build/ into the work tree): pip
# still refuses a pair outside their bounds
mapfile -t deps < <("$venv/bin/python" -c "import sys, tomllib; print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))\
['project']['dependencies']))" "$root/pyproject.toml")
if [ ${#deps[@]} -eq 0 ]; then echo "compat.sh: no dependencies read from $root/pyproject.toml" >&2; exit 2; fi
"$venv/bin/pip" install --progress-bar off -q "torch==$torch_v" "triton==$triton_v" "torchvision==0.$((minor + 15)).*" \
  "numpy${numpy_spec}" "${deps[@]}" pytest hypothesis
"$venv/bin/python" -c "import torch, triton, numpy, sys; print('stack: python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

cd "$root"
# the working tree, not the copy pip installed, is what runs
export PYTHONPATH="$root" PYTHONDONTWRITEBYTECODE=1
unset ASE_KERNELS_BACKEND
tests=()
for kernel in ase_kernels/kernels/*.py; do
  name=$(basename "$kernel" .py)
  if [ -f "tests/test_$name.py" ]; then tests+=("tests/test_$name.py"); fi
done
tests+=(tests/test_kernels_compile.py)
status=0
echo "== kernel tests under the interpreter: ${tests[*]}"
TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" || status=1
echo "== sm_90 inspection of the ViT-B FFN"
(unset TRITON_INTERPRET; "$venv/bin/python" -m bench.inspect_kernels --target sm_90 > "$venv/inspect_sm_90.md") \
  && tail -n 25 "$venv/inspect_sm_90.md" || status=1
echo "== torch $torch_v + triton $triton_v: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
