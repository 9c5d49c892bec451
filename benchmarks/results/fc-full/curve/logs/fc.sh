#!/bin/bash
# After the CNTK-V solves: the full FC NTK/NNGP store and its ridgeless learning curves.
while pgrep -f "logs-curve/solve.sh|logs-curve/wide.sh|logs-2k/run.sh" > /dev/null; do sleep 20; done
cd <checkout>
L=~/runs/logs-fc
export CNTK_CIFAR_ROOT=<cifar root>
date -u +%FT%TZ > $L/start
/usr/bin/time -v -o $L/gram.time <venv>/bin/cntk run configs/paper/fc-full.yaml --store ~/runs/fc-full.zarr --json > $L/gram.json 2> $L/gram.err
echo "gram rc=$? $(date -u +%FT%TZ)" >> $L/steps
/usr/bin/time -v -o $L/curve.time <venv>/bin/cntk solve ~/runs/fc-full.zarr --no-validation --train-sizes 1000,2000,5000,10000,20000,30000,40000,50000 --out ~/runs/report-fc-curve --json > $L/curve.json 2> $L/curve.err
echo "curve rc=$? $(date -u +%FT%TZ)" >> $L/steps
