#!/usr/bin/env bash
# GPU readiness in one command (under 8 minutes on one GPU): DenseNet-121 / ResNet-50 training
# throughput at 224 px (bf16, channels-last, with and without torch.compile), the data pipeline's rate
# with augmentation on the GPU and its ratio to the model, then the LCL and MPC step-time ratios.
#
#   bash benchmarks/gpu_check.sh              # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu-smoke  # every section on the CPU at toy sizes, in seconds
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  "$PY" gpu_check.py --cpu-smoke
  echo; echo "## lcl / label_query step time over the linear head (bench_heads)"
  "$PY" bench_heads.py --device cpu --configs resnet18:64:2 --steps 1 --repeats 1 --no-split
  echo; echo "## mpc step time over supervised (bench_regimes)"
  "$PY" bench_regimes.py --device cpu --backbone resnet18 --size 64 --batch 2 --steps 1 --repeats 1 --amp
else
  "$PY" gpu_check.py
  echo; echo "## lcl / label_query step time over the linear head (bench_heads, fp32)"
  "$PY" bench_heads.py --device cuda --configs densenet121:224:32,resnet50:224:32 --steps 10 --repeats 3 --no-split
  echo; echo "## mpc step time over supervised (bench_regimes, bf16 autocast)"
  "$PY" bench_regimes.py --device cuda --backbone densenet121 --size 224 --batch 32 --steps 10 --repeats 3 --amp
fi
