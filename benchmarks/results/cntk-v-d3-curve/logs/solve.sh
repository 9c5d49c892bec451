#!/bin/bash
# Full-size CNTK-V depth-3 solves on the 50,000/10,000 store, one after another.
cd <checkout>
S=~/runs/table1-v-d3.zarr
L=~/runs/logs-curve
export CNTK_CIFAR_ROOT=<cifar root>
date -u +%FT%TZ > $L/start
/usr/bin/time -v -o $L/one.time <venv>/bin/cntk solve $S --no-validation --out ~/runs/report-one --json > $L/one.json 2> $L/one.err
echo "one rc=$? $(date -u +%FT%TZ)" >> $L/steps
/usr/bin/time -v -o $L/curve.time <venv>/bin/cntk solve $S --no-validation --force --train-sizes 1000,2000,5000,10000,20000,30000,40000,50000 --out ~/runs/report-curve --json > $L/curve.json 2> $L/curve.err
echo "curve rc=$? $(date -u +%FT%TZ)" >> $L/steps
/usr/bin/time -v -o $L/val.time <venv>/bin/cntk solve $S --train-sizes 1000,2000,5000,10000,20000,30000,40000,50000 --out ~/runs/report-val --json > $L/val.json 2> $L/val.err
echo "val rc=$? $(date -u +%FT%TZ)" >> $L/steps
