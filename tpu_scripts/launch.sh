#!/usr/bin/env bash
# Starts one training run on every worker of a TPU VM or pod slice at once: the same command,
#   python -m jtranspeft.train --config CONFIG distributed.enabled=true output_dir=gs://... key=value...
# where distributed.enabled=true makes each process call jax.distributed.initialize(), which on a TPU
# VM finds the other workers by itself. Each worker runs it under nohup, detached from the ssh session,
# with its output in ~/jtranspeft-logs/<run>.log (latest.log points to it). Checkpoints and outputs go
# to output_dir, a GCS path every worker can write. In order, the gcloud commands:
#   1. a check on every worker: no training already running, and the virtual environment exists;
#   2. with --upload DIR: replace ~/jtranspeft-upload on every worker with a copy of the local DIR;
#   3. the launch itself.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=${CONFIG:-}
OUTPUT_DIR=${OUTPUT_DIR:-}
RUN_NAME=${RUN_NAME:-}
UPLOAD_DIR=${UPLOAD_DIR:-}
TRAIN_ENV=${TRAIN_ENV:-}
VENV=${VENV:-$DEFAULT_VENV}
ENV_ASSIGNMENTS=()
OVERRIDES=()

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [flags] [key=value ...]

Runs 'python -m jtranspeft.train --config CONFIG distributed.enabled=true output_dir=OUTPUT_DIR
key=value ...' on every worker at once, in the background, logging to ~/$REMOTE_LOG_DIR/RUN_NAME.log.

  --config FILE       CONFIG      config file on the workers (required), relative to the home
                                  directory: $REMOTE_SRC_DIR/configs/... after 'setup.sh --git',
                                  $REMOTE_UPLOAD_DIR/... with --upload
  --output-dir URL    OUTPUT_DIR  gs://bucket/path for checkpoints and outputs (required)
  --run-name NAME     RUN_NAME    name of the log file (default: the last part of OUTPUT_DIR)
  --upload DIR        UPLOAD_DIR  first copy the local directory DIR to ~/$REMOTE_UPLOAD_DIR on every
                                  worker, replacing an earlier upload (configs, small data files)
  --env KEY=VALUE     TRAIN_ENV   environment variable for the training processes; repeatable
                                  (TRAIN_ENV: space-separated KEY=VALUE words)
  --venv DIR          VENV        virtual environment made by setup.sh (default: $DEFAULT_VENV)
  key=value ...                   config overrides, passed on to jtranspeft.train as they are;
                                  also accepted after '--'

$COMMON_HELP

Examples:
  # a recipe from the cloned repository, data and checkpoints on GCS
  DRY_RUN=1 $SCRIPT_NAME --name my-tpu --zone us-central2-b \\
      --config $REMOTE_SRC_DIR/configs/quickstart.yaml --output-dir gs://my-bucket/runs/run1 \\
      data.source=gs://my-bucket/data/train.jsonl train.max_steps=1000
  # local configs uploaded first; an XLA/libtpu flag for the training processes
  $SCRIPT_NAME --upload configs --config $REMOTE_UPLOAD_DIR/my_recipe.yaml \\
      --output-dir gs://my-bucket/runs/run2 --env LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true
Then: logs.sh to follow the log, stop.sh to stop the run.
EOF
}

# Appends a KEY=VALUE environment assignment ($1) after checking its form.
add_env_assignment() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env/TRAIN_ENV takes KEY=VALUE, got '$1'"
  ENV_ASSIGNMENTS+=("$1")
}

# Appends a config override ($1) after checking its form; the two keys this script sets are refused.
add_override() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "expected a config override key=value, got '$1'"
  case "$1" in
    output_dir=*) die "give the output directory as --output-dir (or OUTPUT_DIR), not output_dir=" ;;
    distributed.enabled=*) die "$SCRIPT_NAME sets distributed.enabled=true itself" ;;
  esac
  OVERRIDES+=("$1")
}

read -r -a env_words <<<"$TRAIN_ENV"
for word in "${env_words[@]}"; do
  add_env_assignment "$word"
done

while (($#)); do
  case "$1" in
    --config | --config=*) flag_value "$@"; CONFIG=$VALUE ;;
    --output-dir | --output-dir=*) flag_value "$@"; OUTPUT_DIR=$VALUE ;;
    --run-name | --run-name=*) flag_value "$@"; RUN_NAME=$VALUE ;;
    --upload | --upload=*) flag_value "$@"; UPLOAD_DIR=$VALUE ;;
    --env | --env=*) flag_value "$@"; add_env_assignment "$VALUE" ;;
    --venv | --venv=*) flag_value "$@"; VENV=$VALUE ;;
    --) shift; for override in "$@"; do add_override "$override"; done; break ;;
    -*) parse_common_flag "$@" ;;
    *) add_override "$1"; SHIFT=1 ;;
  esac
  shift "$SHIFT"
done

finish_common_settings
require CONFIG --config
require OUTPUT_DIR --output-dir
[[ $OUTPUT_DIR == gs://?* ]] ||
  die "OUTPUT_DIR=$OUTPUT_DIR is not a gs:// path: every worker writes checkpoints there, so it must be shared storage"
if [[ -z $RUN_NAME ]]; then
  RUN_NAME=$OUTPUT_DIR
  while [[ $RUN_NAME == */ ]]; do RUN_NAME=${RUN_NAME%/}; done
  RUN_NAME=${RUN_NAME##*/}
fi
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME='$RUN_NAME' may hold only letters, digits, '.', '_' and '-'"
[[ -z $UPLOAD_DIR || -d $UPLOAD_DIR ]] || die "UPLOAD_DIR=$UPLOAD_DIR is not a directory"

# The remote commands below are printf templates: %s takes a value quoted for the worker's shell, and
# $(hostname) and $! are left for the worker's shell to expand.
python=$(shell_quote "$VENV/bin/python")
log_file="$REMOTE_LOG_DIR/$RUN_NAME.log" # safe characters only: RUN_NAME is checked above

# 1. Refuse to start a second run next to a live one (they would fight over the TPU), or without setup.
# shellcheck disable=SC2016
printf -v check_command '%s; %s' \
  "$(printf 'if pgrep -af %s; then echo "$(hostname): training is already running (above); stop it with stop.sh" >&2; exit 1; fi' \
    "$(shell_quote "$TRAIN_PROCESS_PATTERN")")" \
  "$(printf 'if [ ! -x %s ]; then echo "$(hostname): missing" %s "- run setup.sh" >&2; exit 1; fi' "$python" "$python")"
tpu_ssh all "$check_command"

# 2. The upload; removed first, so that scp creates the directory instead of a subdirectory in it.
if [[ -n $UPLOAD_DIR ]]; then
  tpu_ssh all "$(quote_words rm -rf "$REMOTE_UPLOAD_DIR")"
  tpu_scp "$UPLOAD_DIR" "$REMOTE_UPLOAD_DIR" --recurse
fi

# 3. The launch. Redirecting all three standard streams of the background process lets ssh end at once.
train_command=(nohup)
if ((${#ENV_ASSIGNMENTS[@]})); then
  train_command+=(env "${ENV_ASSIGNMENTS[@]}")
fi
train_command+=("$VENV/bin/python" -m jtranspeft.train --config "$CONFIG" distributed.enabled=true output_dir="$OUTPUT_DIR"
  "${OVERRIDES[@]}")
config=$(shell_quote "$CONFIG")
# shellcheck disable=SC2016
printf -v launch_command '%s; %s; %s' \
  "$(printf 'if [ ! -f %s ]; then echo "$(hostname): no config file" %s "(relative to the home directory)" >&2; exit 1; fi' "$config" "$config")" \
  "$(printf 'mkdir -p %s && ln -sfn %s %s || exit 1' "$REMOTE_LOG_DIR" "$RUN_NAME.log" "$REMOTE_LOG_DIR/latest.log")" \
  "$(printf '%s > %s 2>&1 < /dev/null & echo "$(hostname): training started (pid $!), log: ~/%s"' \
    "$(quote_words "${train_command[@]}")" "$log_file" "$log_file")"
tpu_ssh all "$launch_command"
info "follow the log with: logs.sh --name $TPU_NAME --zone $ZONE"
