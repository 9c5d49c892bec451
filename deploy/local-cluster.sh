#!/usr/bin/env bash
# A real multi-process Dask cluster on this machine (loopback): one scheduler and N CPU workers,
# each in its own process, the same shape as the SLURM and compose set-ups. Handy to try
# `cntk submit` / `cntk status` / `cntk cancel` before going to a cluster.
#
#   deploy/local-cluster.sh start [N_WORKERS] [DIR]   # scheduler file: DIR/scheduler.json
#   deploy/local-cluster.sh stop [DIR]
#
# Workers retire after CNTK_WORKER_LIFETIME (default none) +/- CNTK_LIFETIME_STAGGER and the
# nanny starts a fresh process (--lifetime-restart), as a long-running cluster would.
# TLS is on, as on every cluster deploy/ starts: a fresh certificate per start in DIR/scheduler-tls/, which the
# `cntk` commands given DIR/scheduler.json find; CNTK_TLS=off opts out (deploy/README.md, "Security").
set -euo pipefail
source "$(dirname "$0")/slurm/common.sh"
action=${1:?usage: deploy/local-cluster.sh start [N_WORKERS] [DIR] | stop [DIR]}

start() {
  local n_workers=${1:-2} dir=${2:-runs/local-cluster}
  mkdir -p "$dir"
  rm -f "$dir/scheduler.json"
  scheduler_tls_flags "$dir/scheduler.json" --new
  local protocol=tcp
  (( ${#TLS_ARGS[@]} )) && protocol=tls
  nohup dask scheduler --host "$protocol://127.0.0.1" --port "${CNTK_SCHEDULER_PORT:-0}" --no-dashboard \
    --scheduler-file "$dir/scheduler.json" "${TLS_ARGS[@]}" > "$dir/scheduler.log" 2>&1 &
  echo $! > "$dir/scheduler.pid"
  for (( waited = 0; waited < 60; waited++ )); do
    [[ -s $dir/scheduler.json ]] && break
    kill -0 "$(cat "$dir/scheduler.pid")" 2> /dev/null || break  # it exited: no use waiting
    sleep 1
  done
  [[ -s $dir/scheduler.json ]] || { echo "scheduler did not start; see $dir/scheduler.log" >&2; exit 1; }
  local lifetime_args=()
  if [[ -n ${CNTK_WORKER_LIFETIME:-} ]]; then
    lifetime_args=(--lifetime "$CNTK_WORKER_LIFETIME" --lifetime-stagger "${CNTK_LIFETIME_STAGGER:-0s}"
                   --lifetime-restart)
  fi
  worker_tls_flags "$dir/scheduler.json"
  NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1} nohup dask worker --scheduler-file "$dir/scheduler.json" \
    --host 127.0.0.1 --nworkers "$n_workers" --nthreads 1 --no-dashboard --death-timeout 60 \
    "${lifetime_args[@]}" "${TLS_ARGS[@]}" > "$dir/workers.log" 2>&1 &
  echo $! > "$dir/workers.pid"
  echo "scheduler file: $dir/scheduler.json"
}

stop() {
  local dir=${1:-runs/local-cluster} name
  for name in workers scheduler; do
    if [[ -s $dir/$name.pid ]]; then
      kill "$(cat "$dir/$name.pid")" 2> /dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
  rm -f "$dir/scheduler.json"
}

case $action in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "unknown action '$action': use start or stop" >&2; exit 2 ;;
esac
