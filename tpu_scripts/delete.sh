#!/usr/bin/env bash
# Deletes the TPU VM or pod slice, without asking (gcloud --quiet); with --queued, deletes the queued
# resource made by `create.sh --queued` instead, and with it (--force) the TPU VM it holds. Everything
# on the workers' disks goes with it; what launch.sh wrote to output_dir on GCS stays.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=${QUEUED:-0}
QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-}

usage() {
  cat <<EOF2
Usage: $SCRIPT_NAME [flags]

Deletes the TPU VM, or with --queued the queued resource and its TPU VM. Does not ask first.

  --queued           QUEUED=1            delete the queued resource (for VMs made by create.sh --queued)
  --queued-id ID     QUEUED_RESOURCE_ID  the queued resource's ID (default: the TPU name)

$COMMON_HELP

Examples:
  DRY_RUN=1 $SCRIPT_NAME --name my-tpu --zone us-central2-b
  TPU_NAME=my-tpu ZONE=us-east5-b $SCRIPT_NAME --queued
EOF2
}

while (($#)); do
  case "$1" in
    --queued) QUEUED=1 SHIFT=1 ;;
    --queued-id | --queued-id=*) flag_value "$@"; QUEUED_RESOURCE_ID=$VALUE ;;
    *) parse_common_flag "$@" ;;
  esac
  shift "$SHIFT"
done

finish_common_settings
if is_true "$QUEUED" QUEUED; then
  run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE_ID:-$TPU_NAME}" "${LOCATION_FLAGS[@]}" --quiet --force
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet
fi
