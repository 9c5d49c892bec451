#!/bin/bash
# Full CIFAR-10 FC NTK+NNGP Gram (code of the frozen worktree), then both solves with a λ grid reaching 10.
set -u
cd <checkout>
export CNTK_CIFAR_ROOT=<cifar root>
B=<venv>/bin
L=~/runs/logs-wide
GRID=0,1e-06,1e-05,0.0001,0.001,0.01,0.1,1,10
rm -rf ~/runs/fc-full.zarr
/usr/bin/time -v -o $L/gram.time $B/cntk run configs/paper/fc-full.yaml --store ~/runs/fc-full.zarr --json > $L/gram.json 2> $L/gram.err
echo "gram rc=$?" >> $L/steps
for k in ntk nngp; do
  /usr/bin/time -v -o $L/solve-$k.time $B/cntk solve ~/runs/fc-full.zarr --kernel $k-fc --lambdas $GRID --out ~/runs/fc-full-wide/$k --json > $L/solve-$k.json 2> $L/solve-$k.err
  echo "solve $k rc=$?" >> $L/steps
done
echo done >> $L/steps
