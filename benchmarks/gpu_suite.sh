#!/usr/bin/env bash
# The kernel and step benchmarks on one GPU, most telling first, each under its own time limit so
# that a failure or a slow part leaves the others' tables:
#   1. train_step.py   Pallas steps vs the bf16 floor and sparsify (its Triton decoder): d=640,
#                      then d=2304 (a stage each: on an H200 under 250 s and 185 s)
#   2. kernels.py      every Pallas (Triton) primitive: error against XLA, time against the floor
#   3. gpu_step_profile.py  the d=640 TopK step's kernels, idle gaps and host waits
#   4. top_k_blocks.py the top_k's Triton blocks: the sweep behind `gpu_blocks`, on this GPU
#   5. clt_depth.py    t(2L)/t(L): L = 4 -> 8 (default shape), then 9 -> 18 at F = 8192, B = 4096
#                      with its parts and the least ratio a kernel can give there
#   6. step_memory.py  the compiled step's temporary memory, as the GPU compiler plans it
#   7. train_step.py   the same rows with the sparse XLA paths (Pallas vs XLA on this GPU)
# Usage: bash benchmarks/gpu_suite.sh LOG_DIR [SECONDS]   (SECONDS: the whole run's budget, 480)
# On a machine without a package index, wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them
# where pip can reach PyPI) are installed first, into a folder of their own.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_suite.sh LOG_DIR [SECONDS]}
end=$(( $(date +%s) + ${2:-480} ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6  # the rest for sparsify's torch
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # allscope from this checkout

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: runs within both its limit and the budget
  local name=$1 limit=$2 left=$(( end - $(date +%s) - 5 ))
  shift 2
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped (budget spent)"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | grep -v -e "^WARNING: All log messages" -e "^I0000" \
    | tee "$out/$name.log"
  echo "== $name: rc ${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax, jaxlib, torch, triton; print('jax', jax.__version__, jaxlib.__version__, \
jax.devices(), '| torch', torch.__version__, '| triton', triton.__version__)"
stage train_step_640 260 python3 benchmarks/train_step.py --kernels pallas --d 640 --steps 10
stage train_step_2304 220 python3 benchmarks/train_step.py --kernels pallas --d 2304 --steps 5
stage kernels 100 python3 benchmarks/kernels.py --iters 20
stage step_profile 150 python3 benchmarks/gpu_step_profile.py
stage top_k_blocks 100 python3 benchmarks/top_k_blocks.py --seconds 25
stage clt_depth 80 python3 benchmarks/clt_depth.py --steps 10
stage clt_depth_18 150 python3 benchmarks/clt_depth.py --layers 9 --width 8192 --tokens 4096 \
  --steps 5 --profile
stage step_memory 90 python3 benchmarks/step_memory.py
stage train_step_xla 200 python3 benchmarks/train_step.py --kernels xla --steps 10
