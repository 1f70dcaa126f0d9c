#!/usr/bin/env bash
# `make test-slurm`: start a one-node Slurm from this folder's files, run tests/test_slurm_real.py against it,
# and stop every daemon this script started (on success, failure or Ctrl-C). Daemons that were already
# running are used and left running. Needs root (it installs Slurm's Debian packages when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
pidfiles=(/run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid)
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
already=()
for f in "${pidfiles[@]}"; do alive "$f" && already+=("$f"); done

stop_started() {
  # jobs the test left (it failed or was stopped part-way): their processes outlive slurmd otherwise
  if alive /run/slurmctld.pid && [[ " ${already[*]-} " != *" /run/slurmctld.pid "* ]]; then
    scancel --name cilbench-ci_slurm 2>/dev/null || true
    for _ in $(seq 1 40); do [ -z "$(squeue -h --name cilbench-ci_slurm 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do   # reverse order of start
    [[ " ${already[*]-} " == *" $f "* ]] && continue
    if alive "$f"; then
      pid=$(cat "$f"); kill -TERM "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
  done
}
trap stop_started EXIT

start=$(date +%s)
bash .ci/slurm/setup-single-node.sh
CILBENCH_SLURM_TEST=1 "$python" -m pytest tests/test_slurm_real.py -p no:cacheprovider -q
echo "test-slurm: $(( $(date +%s) - start )) s (cluster start included)"
