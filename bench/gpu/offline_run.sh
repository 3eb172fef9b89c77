#!/bin/bash
# bench/gpu/run.py on an offline GPU machine, with the wheels of offline_wheels.sh:
#
#     bench/gpu/offline_run.sh .whl RESULTS_DIR [run.py options...]
#
# Installs the wheels into /tmp/site (PYTHONPATH; the image's torch stays), records the
# environment, runs the CUDA IPC check and the acceptance run (the models in /dev/shm when
# it has 50 GB free), and leaves RESULTS_DIR/{results.json,summary.md,ipc.json,...} and
# RESULTS_DIR/res.tar.gz (everything, the daemons' logs too).
# Environment: BUDGET (run.py --budget-s, 465), RUN_TIMEOUT (kill after, 500 s),
# PSCALE (run.py --profile-scale, 0.6).
set -u
WHL=${1:?wheel directory}
RES=${2:?results directory}
shift 2
T0=$(date +%s)
mkdir -p "$RES"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHL"/*.whl > "$RES/pip.log" 2>&1 || { tail "$RES/pip.log"; exit 1; }
tar xzf "$WHL/cbcbox-trim.tar.gz" -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD CBCBOX_BUILD=avx2 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi; df -h /dev/shm /tmp; free -g; nproc
    python3 -c "import torch, diffusers, transformers, zmq, mip, msgspec, structlog, trident
print(torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__,
      torch.cuda.get_device_name(0))"
} > "$RES/env.txt" 2>&1
tail -3 "$RES/env.txt"
echo "setup $(( $(date +%s) - T0 )) s"
AV=$(df --output=avail -B1G /dev/shm | tail -1)
WD=/dev/shm/trident-models
[ "$AV" -lt 50 ] && WD=/tmp/trident-models
echo "models in $WD (/dev/shm: ${AV}G free)"
rm -rf /tmp/gpu-res  # a rerun on the same machine must not pack the last run's files
mkdir -p /tmp/gpu-res
timeout 100 python3 bench/gpu/ipc_check.py --out /tmp/gpu-res/ipc.json > "$RES/ipc.log" 2>&1
echo "ipc_check rc $? after $(( $(date +%s) - T0 )) s"
tail -25 "$RES/ipc.log"
timeout -s INT "${RUN_TIMEOUT:-500}" python3 bench/gpu/run.py --out /tmp/gpu-res --work-dir "$WD" \
    --budget-s "${BUDGET:-465}" --profile-scale "${PSCALE:-0.6}" "$@" > "$RES/run.log" 2>&1
echo "run.py rc $? after $(( $(date +%s) - T0 )) s"
cp /tmp/gpu-res/results.json /tmp/gpu-res/summary.md /tmp/gpu-res/ipc.json "$RES/" 2>/dev/null
tar czf "$RES/res.tar.gz" -C /tmp gpu-res 2>/dev/null
grep -E "built in|profiled in|served in|FAILED|request [0-9]|skipped|Error|OVER" "$RES/run.log" | head -60
