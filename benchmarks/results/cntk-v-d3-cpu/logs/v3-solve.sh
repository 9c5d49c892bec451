#!/bin/bash
# After the CNTK-V depth-3 Gram: the 50,000-row λ = 0 solve (the paper's protocol: no ridge).
set -u
cd <checkout>
export CNTK_CIFAR_ROOT=<cifar root>
B=<venv>/bin
L=~/runs/logs-v3
while ! grep -q "rc=0" $L/steps 2>/dev/null; do sleep 10; done
/usr/bin/time -v -o $L/solve.time $B/cntk solve ~/runs/table1-v-d3.zarr --no-validation --out ~/runs/table1-v-d3-report --json > $L/solve.json 2> $L/solve.err
echo "solve rc=$? $(date -u +%FT%TZ)" >> $L/steps
