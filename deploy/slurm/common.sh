#!/usr/bin/env bash
# Helpers sourced by the sbatch scripts: walltime arithmetic and waiting for the scheduler file.
# Pure bash plus squeue; every function can be tried outside SLURM (tests/test_deploy.py does).

# SLURM duration ("[D-]HH:MM:SS", "MM:SS", "MM", "UNLIMITED") -> whole seconds on stdout.
duration_to_seconds() {
  local text=$1 days=0 rest h=0 m=0 s=0
  case $text in
    ""|UNLIMITED|INVALID|NOT_SET) echo 0; return ;;
  esac
  if [[ $text == *-* ]]; then days=${text%%-*}; rest=${text#*-}; else rest=$text; fi
  IFS=: read -r -a parts <<< "$rest"
  case ${#parts[@]} in
    1) if [[ $text == *-* ]]; then h=${parts[0]}; else m=${parts[0]}; fi ;;
    2) if [[ $text == *-* ]]; then h=${parts[0]}; m=${parts[1]}; else m=${parts[0]}; s=${parts[1]}; fi ;;
    3) h=${parts[0]}; m=${parts[1]}; s=${parts[2]} ;;
    *) echo "duration_to_seconds: cannot read '$text'" >&2; return 1 ;;
  esac
  echo $(( 10#$days * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

# Seconds left before SLURM kills this job (0 when unknown or unlimited).
slurm_seconds_left() {
  if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then
    echo $(( SLURM_JOB_END_TIME - $(date +%s) ))
    return
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]] && command -v squeue > /dev/null; then
    duration_to_seconds "$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %L)"
    return
  fi
  echo 0
}

# When SLURM kills this job, in epoch seconds (0 when unknown or unlimited). Read once at the start: near the end
# squeue says INVALID instead of the few seconds left.
slurm_end_time() {
  local left
  if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then echo "$SLURM_JOB_END_TIME"; return; fi
  left=$(slurm_seconds_left)
  if (( left > 0 )); then echo $(( $(date +%s) + left )); else echo 0; fi
}

# Worker lifetime in seconds: leave MARGIN for the last tile and STAGGER for the random spread
# (dask draws the real lifetime from lifetime +/- stagger), never below 60 s. 0 = no lifetime.
worker_lifetime_seconds() {
  local left=$1 margin=$2 stagger=$3
  if (( left <= 0 )); then echo 0; return; fi
  local lifetime=$(( left - margin - stagger ))
  (( lifetime < 60 )) && lifetime=60
  echo "$lifetime"
}

# Wait until FILE exists (the scheduler writes it once it listens); fail after TIMEOUT seconds.
wait_for_file() {
  local file=$1 timeout=$2 waited=0
  until [[ -s $file ]]; do
    if (( waited >= timeout )); then
      echo "no scheduler file $file after ${timeout}s: is the scheduler job running?" >&2
      return 1
    fi
    sleep 5
    waited=$(( waited + 5 ))
  done
}

# Wait until the scheduler job $1 has written its scheduler file $2, however long the job waits in the queue; fail
# as soon as the job has ended (or is gone) without writing it.
wait_for_scheduler() {
  local job=$1 file=$2 state said=""
  until [[ -s $file ]]; do
    state=$(squeue --noheader --states=all --jobs "$job" --format %T 2> /dev/null || true)
    case $state in
      PENDING|CONFIGURING|RUNNING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESIZING|SUSPENDED) ;;
      *) echo "the scheduler job $job ended (${state:-gone}) without writing $file: see its log in runs/slurm/" >&2
         return 1 ;;
    esac
    if [[ $state != "$said" ]]; then echo "waiting for the scheduler job $job ($state)" >&2; said=$state; fi
    sleep 2
  done
}

# TLS (deploy/README.md, "Security"): the flags of `dask scheduler` / `dask worker` for the cluster of scheduler
# file $1, in the array TLS_ARGS: the certificate and key that `cntk tls` keeps in the private folder beside that
# file (runs/scheduler.json -> runs/scheduler-tls/).
tls_dir() {
  local base
  base=$(basename "$1")
  echo "$(dirname "$1")/${base%.*}-tls"
}

# The scheduler's flags: its cluster's certificate, made unless there (launch.sh makes a fresh one per run), or
# made anew with a second argument --new. Empty with CNTK_TLS=off, the one switch that opts out (for your own
# secured cluster or network).
scheduler_tls_flags() {
  TLS_ARGS=()
  case ${CNTK_TLS:-on} in
    on) ;;
    off) return 0 ;;
    *) echo "CNTK_TLS must be 'on' or 'off', not '$CNTK_TLS'" >&2; return 2 ;;
  esac
  local dir
  dir=$(cntk tls "$@")
  TLS_ARGS=(--tls-ca-file "$dir/cert.pem" --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem")
}

# A worker's flags follow its scheduler: the certificate when the scheduler file holds a tls:// address.
worker_tls_flags() {
  TLS_ARGS=()
  grep -q '"address": *"tls://' "$1" || return 0
  local dir
  dir=$(tls_dir "$1")
  if [[ ! -s $dir/cert.pem || ! -s $dir/key.pem ]]; then
    echo "the scheduler in $1 uses TLS but $dir has no cert.pem and key.pem: it is made by the scheduler job" >&2
    return 1
  fi
  TLS_ARGS=(--tls-ca-file "$dir/cert.pem" --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem")
}

# True when every planned tile of the store $1 has its completion record (false while the store does not exist).
store_complete() {
  local status
  status=$(cntk status "$1" --json 2> /dev/null) || return 1
  [[ $status =~ \"tiles_done\":\ ([0-9]+).*\"tiles_total\":\ ([0-9]+) ]] || return 1
  (( BASH_REMATCH[1] == BASH_REMATCH[2] ))
}
