#!/usr/bin/env bash
# One call of the GPU campaign on a lent machine (benchmarks/GPU.md), from the repository root:
#     bash benchmarks/campaign/device_call.sh CALL BUDGET_S
# CALL 1 runs the stages env,kernels,tests; CALL 2 table1-v,gap-2k,cifar2 (any other CALL is taken as a stage list).
# Installs the carried wheels (.whl/, once per machine and commit), rebuilds CIFAR-10 from the carried data/ unless
# this machine has it (a failed rebuild is said and the stages go on: kernels needs no data), then runs the campaign
# into $OUT for what is left of BUDGET_S (the install and the rebuild count against it). It continues the campaign
# of this commit: from /tmp/campaign on a warm machine, else from benchmarks/results/gpu-campaign/ (call 1's
# returned files, copied there by the session before call 2), so call 1's measured rates and records survive a
# fresh machine.
#
# The package is imported from the installed wheel, never from the checkout: the campaign and all its commands
# run with `python3 -P` (no script or current folder on sys.path) and PYTHONPATH=SITE:REPO, so `cntk_gram` resolves
# to SITE and `benchmarks` to the checkout.
#
# CPU mode (tests/test_campaign_layout.py runs it end to end): CAMPAIGN_REHEARSE=1 adds --rehearse;
# CAMPAIGN_TMP (default /tmp) holds site/, cifar/ and campaign/.
set -uo pipefail
call=${1:?usage: device_call.sh CALL BUDGET_S}
budget=${2:?usage: device_call.sh CALL BUDGET_S}
case "$call" in
    1) stages=env,kernels,tests ;;
    2) stages=table1-v,gap-2k,cifar2 ;;
    *) stages=$call ;;
esac
tmp=${CAMPAIGN_TMP:-/tmp}
site=$tmp/site cifar=$tmp/cifar
if ! cmp -s .whl/COMMIT "$site/.commit"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "device_call: installing .whl/ failed"; exit 3; }
    cp .whl/COMMIT "$site/.commit"
fi
export PYTHONPATH=$site:$PWD PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
if [ ! -d "$cifar/cifar-10-batches-py" ]; then
    python3 data/build_cifar10.py "$cifar" >/dev/null \
        || echo "device_call: rebuilding CIFAR-10 failed; the stages that need it will say so"
fi
prior=benchmarks/results/gpu-campaign
args=(--out "${OUT:?OUT is not set}" --stages "$stages" --budget-s "$((budget - SECONDS))" --data-root "$cifar"
      --work "$tmp/campaign")
[ -f "$prior/campaign.json" ] && args+=(--prior "$prior")
[ "${CAMPAIGN_REHEARSE:-0}" = 1 ] && args+=(--rehearse)
exec python3 -P -m benchmarks.gpu_campaign "${args[@]}"
