#!/usr/bin/env bash
# The benchmark suite on a CUDA GPU: installs the CUDA build of JAX in its own venv, then runs
# benchmarks/run.py, which writes benchmarks/results/gpu_<card>.json and .png in the CPU run's form.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e '.[bench]' 'jax[cuda12]'
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '_')
.venv-gpu/bin/python -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()'
.venv-gpu/bin/python benchmarks/run.py --all-threads --label "gpu_${card}" "$@"
