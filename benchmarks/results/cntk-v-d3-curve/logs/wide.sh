#!/bin/bash
# After the FC runs: the validated 50,000-row solve again with a grid reaching above λ = 0.1.
while pgrep -f "logs-fc/fc.sh|logs-curve/solve.sh" > /dev/null; do sleep 20; done
cd <checkout>
L=~/runs/logs-curve
export CNTK_CIFAR_ROOT=<cifar root>
/usr/bin/time -v -o $L/wide.time <venv>/bin/cntk solve ~/runs/table1-v-d3.zarr --lambdas 0,0.01,0.1,0.3,1,3,10 --out ~/runs/report-val-wide --json > $L/wide.json 2> $L/wide.err
echo "wide rc=$? $(date -u +%FT%TZ)" >> $L/steps
