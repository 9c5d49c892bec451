#!/usr/bin/env bash
# One call of the GPU campaign on a lent machine (benchmarks/GPU.md), from the repository root:
#     bash benchmarks/campaign/device_call.sh CALL BUDGET_S
# CALL 1 runs the stages env,kernels,tests; CALL 2 table1-v,gap-2k,cifar2 (any other CALL is taken as a stage list).
# Installs the carried wheels (.whl/, once per machine and commit), rebuilds CIFAR-10 from the carried data/ unless
# this machine has it, then runs the campaign into $OUT. It continues the campaign of this commit: from /tmp/campaign
# on a warm machine, else from benchmarks/results/gpu-campaign/ (call 1's returned files, copied there by the
# session before call 2), so call 1's measured rates and records survive a fresh machine.
set -uo pipefail
call=${1:?usage: device_call.sh CALL BUDGET_S}
budget=${2:?usage: device_call.sh CALL BUDGET_S}
case "$call" in
    1) stages=env,kernels,tests ;;
    2) stages=table1-v,gap-2k,cifar2 ;;
    *) stages=$call ;;
esac
site=/tmp/site
if ! cmp -s .whl/COMMIT "$site/.commit"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "device_call: installing .whl/ failed"; exit 3; }
    cp .whl/COMMIT "$site/.commit"
fi
export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
if [ ! -d /tmp/cifar/cifar-10-batches-py ]; then
    python3 data/build_cifar10.py /tmp/cifar >/dev/null || { echo "device_call: rebuilding CIFAR-10 failed"; exit 3; }
fi
prior=benchmarks/results/gpu-campaign
args=(--out "${OUT:?OUT is not set}" --stages "$stages" --budget-s "$budget" --data-root /tmp/cifar
      --work /tmp/campaign)
[ -f "$prior/campaign.json" ] && args+=(--prior "$prior")
exec python3 -m benchmarks.gpu_campaign "${args[@]}"
