#!/usr/bin/env bash
# Shows a training run's log (~/jtranspeft-logs/<run>.log, written by launch.sh) from worker 0, one
# worker, or all workers at once (each line then starts with the worker's host name). It follows the
# log (tail -F: across relaunches too, through latest.log) until Ctrl-C, unless --no-follow.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=${WORKER:-0}
RUN_NAME=${RUN_NAME:-latest}
TAIL_LINES=${TAIL_LINES:-100}
FOLLOW=${FOLLOW:-1}

usage() {
  cat <<EOF2
Usage: $SCRIPT_NAME [flags]

Prints the end of a training log on the workers and follows it (Ctrl-C stops following, not training).

  --worker N|all     WORKER      worker index, or all (default: 0)
  --run-name NAME    RUN_NAME    which run's log (default: latest, the newest launch)
  --lines N          TAIL_LINES  lines of history to print first (default: 100)
  --no-follow        FOLLOW=0    print and exit instead of following

$COMMON_HELP

Examples:
  DRY_RUN=1 $SCRIPT_NAME --name my-tpu --zone us-central2-b
  $SCRIPT_NAME --worker all --lines 20          # every worker, lines prefixed with its host name
  $SCRIPT_NAME --run-name run1 --no-follow      # an earlier run's log, worker 0
EOF2
}

while (($#)); do
  case "$1" in
    --worker | --worker=*) flag_value "$@"; WORKER=$VALUE ;;
    --run-name | --run-name=*) flag_value "$@"; RUN_NAME=$VALUE ;;
    --lines | --lines=*) flag_value "$@"; TAIL_LINES=$VALUE ;;
    --no-follow) FOLLOW=0 SHIFT=1 ;;
    *) parse_common_flag "$@" ;;
  esac
  shift "$SHIFT"
done

finish_common_settings
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "WORKER must be a worker index or 'all', got '$WORKER'"
[[ $TAIL_LINES =~ ^[0-9]+$ ]] || die "TAIL_LINES must be a number of lines, got '$TAIL_LINES'"
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME='$RUN_NAME' may hold only letters, digits, '.', '_' and '-'"

tail_command=(tail -n "$TAIL_LINES")
if is_true "$FOLLOW" FOLLOW; then
  tail_command+=(-F)
fi
tail_command+=("$REMOTE_LOG_DIR/$RUN_NAME.log")
remote_command=$(quote_words "${tail_command[@]}")
if [[ $WORKER == all ]]; then
  # sed -u: unbuffered, so followed lines appear as they come.
  # shellcheck disable=SC2016  # $(hostname) expands on the worker
  remote_command+=' | sed -u "s/^/$(hostname): /"'
fi
tpu_ssh "$WORKER" "$remote_command"
