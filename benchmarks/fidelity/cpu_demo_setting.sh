#!/bin/bash
# One fidelity probe in the demo's CPU setting (10 000 Fashion-MNIST training images or 4096 photo crops,
# ndf 16, d 16, batch 256, multiclass, encoder lr 6e-4, decoder lr 4e-3, constant schedule, fp32),
# 300 iterations by default, evaluated every 100 on 1000 test images (512 crops for photos).
#     bash benchmarks/fidelity/cpu_demo_setting.sh fmnist|photos TAG [STEPS] [overrides...]  > TAG.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:?usage: cpu_demo_setting.sh fmnist|photos TAG [STEPS] [overrides...]}; tag=${2:?tag}; steps=${3:-300}
shift $(( $# < 3 ? $# : 3 ))
case $data in
    fmnist) sizes="--train-subset 10000 --test-n 1000" ;;
    photos) sizes="--train-subset 4096 --test-n 512" ;;
    *) echo "cpu_demo_setting.sh: data must be fmnist or photos, got $data" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086
exec ${PY:-.venv/bin/python} benchmarks/fidelity/probe.py --data "$data" --steps "$steps" --eval-every 100 $sizes \
    --tag "$tag" model.preset=csc_ctrl_32 model.ndf=16 model.nz=16 model.init=dcgan model.decoder_bn_gamma=0.5 \
    objective.mode=multiclass train.batch_size_per_worker=256 optim.encoder.lr=6e-4 optim.decoder.lr=4e-3 \
    optim.schedule=constant train.precision=fp32 "$@"
