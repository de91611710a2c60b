#!/usr/bin/env bash
# The main job: a 2-rank CPU training demo (gloo, synthetic data) showing synced BN statistics.
source "$(dirname "$0")/env.sh"
exec torchrun --nproc-per-node 2 examples/train_demo.py "$@"
