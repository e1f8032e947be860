#!/usr/bin/env bash
# Launch lowbit training with torchrun, single or multi node.
#
#   NPROC=4 launch/torchrun.sh --transport ring --w-bits 2 --g-bits 3 --model minilm --steps 300
#   # two nodes, run on each with its NODE_RANK; PS with 2 servers among the 8 ranks:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=4 launch/torchrun.sh --transport ps --servers 2 ...
#   # survive failures: torchrun restarts the group, ranks resume from the last checkpoint
#   MAX_RESTARTS=3 NPROC=4 launch/torchrun.sh --transport ring --checkpoint-every 50 ...
#
# Environment: NPROC (ranks per node, default 2), NNODES (1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), MAX_RESTARTS (0), PYTHON (.venv/bin/python when present).
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK for every rank; gloo is used on CPU, NCCL on GPU.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-2}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m lowbit.train "$@"
