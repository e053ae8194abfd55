#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice: `gcloud compute tpus tpu-vm create` (capacity now, or an error),
# or with --queued a queued resource (`gcloud compute tpus queued-resources create`) that Cloud TPU
# fills when capacity frees up. The runtime (software) version follows from the accelerator's
# generation unless --version names one. Next step: setup.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-}
EXTRA_ARGS=()

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [flags] [-- extra gcloud flags]

Creates a Cloud TPU VM or pod slice (v4, v5e, v5p, v6e).

  --accelerator TYPE   ACCELERATOR         accelerator type (required): v4-8, v4-32, v5litepod-16,
                                           v5p-8, v6e-8, v6e-64, ...
  --version VERSION    RUNTIME_VERSION     TPU runtime version; default by generation:
                                             v4-*         tpu-ubuntu2204-base
                                             v5litepod-*  v2-alpha-tpuv5-lite
                                             v5p-*        v2-alpha-tpuv5
                                             v6e-*        v2-alpha-tpuv6e
  --spot               SPOT=1              Spot capacity: cheaper, may be preempted at any time
  --queued             QUEUED=1            request a queued resource instead of creating the VM now
  --queued-id ID       QUEUED_RESOURCE_ID  the queued resource's ID (default: the TPU name)
  -- FLAGS...                               passed on to gcloud as they are (--network=..., --labels=...)

$COMMON_HELP

Examples:
  # a v4-32 pod slice (4 workers), printed instead of created
  DRY_RUN=1 $SCRIPT_NAME --name my-tpu --zone us-central2-b --accelerator v4-32
  # a v6e-8 through the queue, on Spot capacity, settings from the environment
  export TPU_NAME=my-tpu ZONE=us-east5-b ACCELERATOR=v6e-8
  $SCRIPT_NAME --queued --spot
  # then wait until it is ACTIVE:
  gcloud compute tpus queued-resources describe my-tpu --zone us-east5-b
EOF
}

# The runtime version for an accelerator type's generation, or failure for a generation not listed.
default_runtime_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

while (($#)); do
  case "$1" in
    --accelerator | --accelerator=*) flag_value "$@"; ACCELERATOR=$VALUE ;;
    --version | --version=*) flag_value "$@"; RUNTIME_VERSION=$VALUE ;;
    --spot) SPOT=1 SHIFT=1 ;;
    --queued) QUEUED=1 SHIFT=1 ;;
    --queued-id | --queued-id=*) flag_value "$@"; QUEUED_RESOURCE_ID=$VALUE ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) parse_common_flag "$@" ;;
  esac
  shift "$SHIFT"
done

finish_common_settings
require ACCELERATOR --accelerator
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR") ||
    die "no default runtime version for ACCELERATOR=$ACCELERATOR (known: v4-*, v5litepod-*, v5p-*, v6e-*); pass --version or export RUNTIME_VERSION"
fi
SPOT_FLAGS=()
if is_true "$SPOT" SPOT; then
  SPOT_FLAGS=(--spot)
fi

if is_true "$QUEUED" QUEUED; then
  QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-$TPU_NAME}
  run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE_ID" --node-id="$TPU_NAME" "${LOCATION_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" "${SPOT_FLAGS[@]}" "${EXTRA_ARGS[@]}"
  info "queued; when 'gcloud compute tpus queued-resources describe $QUEUED_RESOURCE_ID --zone $ZONE' says ACTIVE, run setup.sh"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" "${SPOT_FLAGS[@]}" "${EXTRA_ARGS[@]}"
  info "next: setup.sh installs jtranspeft on every worker"
fi
