# shellcheck shell=bash disable=SC2034  # the settings here are used by the scripts that source this file
# Sourced by every tpu_scripts/*.sh, never run on its own. It holds what the scripts share:
#   - settings: every one has a flag (`--zone Z` or `--zone=Z`) and an environment variable (ZONE);
#     the flag wins over the variable, and a missing required setting is an error naming both;
#   - `run`, which runs a command, or under DRY_RUN=1 prints it as one line `+ cmd arg...` (arguments
#     shell-quoted, so the line can be pasted back into a shell) and runs nothing;
#   - the gcloud commands the scripts are made of (`tpu_ssh`, `tpu_scp`), and the layout the scripts
#     keep on every worker, relative to the home directory where a gcloud ssh command starts.

SCRIPT_NAME=${0##*/}

# Layout on every worker (relative to the home directory).
REMOTE_LOG_DIR=jtranspeft-logs        # <run>.log per launch, latest.log -> the newest
REMOTE_UPLOAD_DIR=jtranspeft-upload   # launch.sh --upload DIR lands here
REMOTE_SRC_DIR=jtranspeft-src         # setup.sh --git clones here
DEFAULT_VENV=jtranspeft-venv          # setup.sh creates it; launch.sh runs its python
# An extended regex for pgrep/pkill -f that matches `python -m jtranspeft.train ...` but not the shell
# that runs the pgrep, whose own command line holds this pattern and not the text it matches.
TRAIN_PROCESS_PATTERN='[j]transpeft[.]train( |$)'

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
DRY_RUN=${DRY_RUN:-0}

COMMON_HELP="Settings every script takes (flag, or environment variable):
  --name NAME        TPU_NAME    name of the TPU VM or pod slice (required)
  --zone ZONE        ZONE        zone, e.g. us-central2-b (required)
  --project PROJECT  PROJECT     Google Cloud project (default: gcloud's configured project)
  --dry-run          DRY_RUN=1   print the commands, one per line as '+ gcloud ...', run nothing
  -h, --help                     this help
Flags may be written '--zone Z' or '--zone=Z'; a flag wins over its environment variable.
Remote paths are relative to the home directory on each worker."

info() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

# True for 1/true/yes/on, false for 0/false/no/off/empty; anything else is an error naming $2.
is_true() {
  case "${1,,}" in
    1 | true | yes | on) return 0 ;;
    0 | false | no | off | '') return 1 ;;
    *) die "$2 must be 1 or 0 (true/false), got '$1'" ;;
  esac
}

# Fails unless the variable named $1 is set; $2 is its flag, e.g. require TPU_NAME --name.
require() {
  [[ -n ${!1:-} ]] || die "$1 is not set: pass $2 or export $1 (see $SCRIPT_NAME --help)"
}

# One argument quoted for a POSIX shell: left bare when it has only safe characters, else in single
# quotes, so "a b" prints as 'a b' and reaches a remote shell as one word. Of a --flag=value only the
# value is quoted (--command='ls -l'): the same word to a shell, and easier to read.
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(shell_quote "${BASH_REMATCH[2]}")"
  else
    printf '%s' "${1@Q}"
  fi
}

# All arguments quoted and joined by spaces: one command line.
quote_words() {
  local word line=""
  for word in "$@"; do
    line+="${line:+ }$(shell_quote "$word")"
  done
  printf '%s' "$line"
}

# Runs a command; under DRY_RUN=1 prints it instead, as '+ ' and its quoted arguments on one line.
run() {
  if is_true "$DRY_RUN" DRY_RUN; then
    printf '+ %s\n' "$(quote_words "$@")"
    return 0
  fi
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH (install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install)"
  info "+ $(quote_words "$@")"
  "$@"
}

# The value of the flag in $1, given as "--flag=VALUE" or "--flag VALUE" ($2): sets VALUE, and SHIFT
# to the number of arguments the flag took.
flag_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  elif (($# >= 2)); then
    VALUE=$2
    SHIFT=2
  else
    die "$1 needs a value"
  fi
}

# The flags every script takes; sets SHIFT. An unknown argument is an error. Each script calls this
# from its own parsing loop for whatever it does not handle itself, and defines `usage`.
parse_common_flag() {
  case "$1" in
    --name | --name=*) flag_value "$@"; TPU_NAME=$VALUE ;;
    --zone | --zone=*) flag_value "$@"; ZONE=$VALUE ;;
    --project | --project=*) flag_value "$@"; PROJECT=$VALUE ;;
    --dry-run) DRY_RUN=1 SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see $SCRIPT_NAME --help)" ;;
  esac
}

# Checks the settings every script needs and builds LOCATION_FLAGS (--zone=Z [--project=P]), which
# follows the resource name in every gcloud command.
finish_common_settings() {
  require TPU_NAME --name
  require ZONE --zone
  LOCATION_FLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION_FLAGS+=(--project="$PROJECT")
  fi
}

# Runs the shell command $2 on worker $1 (an index, or "all": every worker at once).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker="$1" --command="$2"
}

# Copies the local path $1 to $2 (relative to the home directory) on every worker; more gcloud flags
# (--recurse) may follow.
tpu_scp() {
  local source=$1 destination=$2
  shift 2
  run gcloud compute tpus tpu-vm scp "$source" "$TPU_NAME:$destination" "${LOCATION_FLAGS[@]}" --worker=all "$@"
}
