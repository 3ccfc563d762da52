#!/usr/bin/env bash
# Wheels for benchmarks/gpu_suite.sh on a GPU machine without a package index whose image holds
# JAX (CUDA), torch, Triton, flax, optax and orbax: the rest of allscope's imports on the train
# path, and eai-sparsify with what it imports that such an image lacks. Versions as they ran on
# an H200 (27 Nov). Run where pip reaches PyPI, then bring .whl/ along; gpu_suite.sh installs it.
# Usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   (the GPU machine's Python; default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
pkgs=(grain==0.2.18 array-record==0.8.6 tensorboardX==2.6.5 zstandard==0.25.0 portpicker==1.6.0
      defusedxml==0.7.1 eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
ls .whl
