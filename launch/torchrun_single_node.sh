#!/usr/bin/env bash
# One machine, N processes (one per GPU; on CPU, gloo processes). Usage:
#   NPROC=8 STRATEGY=fsdp launch/torchrun_single_node.sh configs/recipes/llava-1.5-7b.yaml runs/llava [overrides...]
set -euo pipefail
RECIPE=${1:?recipe yaml}; OUT=${2:?run dir}; shift 2
exec torchrun --standalone --nproc_per_node="${NPROC:-8}" \
  -m vlmtrain run "$RECIPE" --out "$OUT" --strategy "${STRATEGY:-fsdp}" --resume "$@"
