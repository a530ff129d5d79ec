#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (multi-host JAX needs all of them).
#
#   launch/tpu_vm.sh NAME ZONE "python -m metaphorstar_jax.demo"
#   launch/tpu_vm.sh NAME ZONE "python -m metaphorstar_jax.train \
#       --config=configs/tfq_grpo_7b.py --config.distributed.auto=True ..."
#
# The repository is copied to each worker first; with --config.distributed.auto=True the trainer
# and evaluator call jax.distributed.initialize(), which discovers the slice by itself.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND..." >&2
  exit 2
fi
name=$1 zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$repo" "$name":~/ >/dev/null
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/$(basename "$repo") && pip install -q -e . 'jax[tpu]' && $*"
