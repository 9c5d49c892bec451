#!/bin/bash
# Full CIFAR-10 CNTK-V depth-3 Gram on the CPU (frozen worktree), resumable: rerun this script to continue.
set -u
cd <checkout>
export CNTK_CIFAR_ROOT=<cifar root>
B=<venv>/bin
L=~/runs/logs-v3
n=$(ls $L | grep -c '^gram-.*\.time$')
/usr/bin/time -v -o $L/gram-$n.time $B/cntk run $L/table1-v-d3-cpu.yaml --store ~/runs/table1-v-d3.zarr --json > $L/gram-$n.json 2> $L/gram-$n.err
echo "gram-$n rc=$? $(date -u +%FT%TZ)" >> $L/steps
