#!/bin/bash
# Run several fidelity probes side by side on one GPU and print a table of their last evaluation.
#     bash benchmarks/fidelity/screen.sh VARIANTS_FILE OUTDIR [common overrides...]
# BUDGET (env): seconds after which each probe is stopped (its evaluations so far are kept).
# VARIANTS_FILE: one variant per line, "TAG  --data fmnist|photos  override ...". Lines starting with # are skipped.
# Needs the Fashion-MNIST IDX files (CSCCTRL_FASHION_MNIST_DIR or Debian's dataset-fashion-mnist).
set -uo pipefail
VARIANTS=${1:?usage: screen.sh VARIANTS_FILE OUTDIR [overrides...]}
OUT=${2:?usage: screen.sh VARIANTS_FILE OUTDIR [overrides...]}
shift 2
mkdir -p "$OUT"
PY=${PY:-python3}
while read -r tag rest; do
    [[ -z "$tag" || "$tag" == \#* ]] && continue
    # shellcheck disable=SC2086
    timeout "${BUDGET:-100000}" $PY benchmarks/fidelity/probe.py --tag "$tag" $rest "$@" > "$OUT/$tag.jsonl" 2> "$OUT/$tag.err" &
done < "$VARIANTS"
wait
$PY benchmarks/fidelity/table.py "$OUT"/*.jsonl
