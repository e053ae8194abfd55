#!/usr/bin/env bash
# Stops the training run on every worker: SIGTERM to each `python -m jtranspeft.train` process (the
# trainer then finishes its step, writes a checkpoint to output_dir and exits; launching again with the
# same output_dir resumes), then SIGKILL for any still alive after --timeout seconds. A pod slice's run
# is one job across all workers, so it is stopped everywhere at once. A worker with nothing running
# says so; that is no error.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STOP_TIMEOUT=${STOP_TIMEOUT:-60}

usage() {
  cat <<EOF2
Usage: $SCRIPT_NAME [flags]

Stops the training processes (python -m jtranspeft.train) on all workers; the TPU VM keeps running.
On SIGTERM the trainer checkpoints to output_dir and exits; launch.sh with the same output_dir resumes.

  --timeout SECONDS  STOP_TIMEOUT  wait this long after SIGTERM before SIGKILL (default: 60)

$COMMON_HELP

Examples:
  DRY_RUN=1 $SCRIPT_NAME --name my-tpu --zone us-central2-b
  TPU_NAME=my-tpu ZONE=us-central2-b $SCRIPT_NAME --timeout 5
EOF2
}

while (($#)); do
  case "$1" in
    --timeout | --timeout=*) flag_value "$@"; STOP_TIMEOUT=$VALUE ;;
    *) parse_common_flag "$@" ;;
  esac
  shift "$SHIFT"
done

finish_common_settings
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds, got '$STOP_TIMEOUT'"

pattern=$(shell_quote "$TRAIN_PROCESS_PATTERN")
# A printf template: %s takes a value quoted for the worker's shell; $(hostname) and $(seq ...) are
# left for the worker's shell. Every branch ends in echo, so each worker exits 0.
# shellcheck disable=SC2016
printf -v remote_command '%s %s %s %s %s' \
  "$(printf 'if pkill -TERM -f %s; then' "$pattern")" \
  "$(printf 'for _ in $(seq %s); do pgrep -f %s > /dev/null || break; sleep 1; done;' "$STOP_TIMEOUT" "$pattern")" \
  "$(printf 'if pkill -KILL -f %s; then echo "$(hostname): killed after %s s"; else echo "$(hostname): stopped"; fi;' "$pattern" "$STOP_TIMEOUT")" \
  'else echo "$(hostname): no training process running";' \
  'fi'
tpu_ssh all "$remote_command"
