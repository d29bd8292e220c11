#!/bin/bash
# One device call for a fidelity screen: run it under $OUT (device tool), pack the JSON lines, table and
# pictures into one archive (the device returns at most 8 files).
#     bash benchmarks/fidelity/device_screen.sh VARIANTS_FILE NAME BUDGET_S [common overrides...]
set -uo pipefail
VARIANTS=$1 NAME=$2; export BUDGET=$3; shift 3
export CSCCTRL_FASHION_MNIST_DIR=${CSCCTRL_FASHION_MNIST_DIR:-.fmnist} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
work=/tmp/$NAME
mkdir -p "$work/pics"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
bash benchmarks/fidelity/screen.sh "$VARIANTS" "$work/runs" "$@" --pictures "$work/pics" | tee "$work/table.md"
tar czf "${OUT:-/tmp}/$NAME.tgz" -C /tmp "$NAME"
