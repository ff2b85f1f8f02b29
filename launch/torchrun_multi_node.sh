#!/usr/bin/env bash
# Run the same command on every node (c10d rendezvous; no node ranks to hand out). Usage on each node:
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi_node.sh RECIPE OUT [overrides...]
# --resume makes a restarted job continue from each stage's last checkpoint (also on a different node count
# when the stage uses data.split: stride and keeps its global batch).
set -euo pipefail
RECIPE=${1:?recipe yaml}; OUT=${2:?run dir (shared filesystem)}; shift 2
exec torchrun --nnodes="${NNODES:?number of nodes}" --nproc_per_node="${NPROC:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-vlmtrain}" \
  -m vlmtrain run "$RECIPE" --out "$OUT" --strategy "${STRATEGY:-fsdp}" --resume "$@"
