# Source on the lent GPU machine (device tool, carry [".whl"]) before any benchmark:
#     source benchmarks/gpu_env.sh
# Installs the offline wheel set built by ../shared/tools/gpu-wheels.sh (Ray, WebDataset, MLflow) into
# /tmp/site once per machine, puts it and the repo on PYTHONPATH, and keeps NVLink multicast off (the
# machine's rule: NCCL_NVLS_ENABLE=0 and friends).
if [ ! -f /tmp/site/.installed ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && touch /tmp/site/.installed || return 1
    else
        echo "gpu_env.sh: no .whl/ here and nothing installed in /tmp/site: carry .whl" >&2
        return 1
    fi
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
