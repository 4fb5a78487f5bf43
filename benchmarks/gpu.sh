#!/usr/bin/env bash
# The benchmark suites on a CUDA GPU: installs the CUDA build of JAX in its own venv, then runs
# benchmarks/run.py, benchmarks/state_space.py, benchmarks/float32.py and (on several GPUs)
# benchmarks/sharding.py, which write benchmarks/results/gpu_<card>.*, float32_gpu_<card>.* and
# state_space_gpu_<card>.* in the CPU runs' form.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e '.[bench]' 'jax[cuda12]'
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '_')
.venv-gpu/bin/python -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()'
.venv-gpu/bin/python benchmarks/run.py --all-threads --label "gpu_${card}" "$@"
# The state-space solver: "markov" and "markov-parallel" up to n = 10⁶ (target for the parallel
# value_and_grad at n = 10⁶: under 50 ms on one GPU), both forms in float32 and float64, draws.
.venv-gpu/bin/python benchmarks/state_space.py --all-threads --label "state_space_gpu_${card}"
# float32 accuracy of both forms (GPUs' fast precision): the same numbers as on a CPU, or not.
.venv-gpu/bin/python benchmarks/float32.py --all-threads --label "float32_gpu_${card}"
# Weak scaling of a sharded batch of curves over every GPU of the machine (1, 2, 4, … devices).
if [ "$(.venv-gpu/bin/python -c 'import jax; print(jax.device_count())')" -gt 1 ]; then
  .venv-gpu/bin/python benchmarks/sharding.py --all-threads --label "sharding_gpu_${card}"
fi
